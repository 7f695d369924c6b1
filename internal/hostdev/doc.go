// Package hostdev is the broker's view of a real host PCI device: it implements
// broker.Device on top of internal/pci (sysfs), internal/vfio (the device fd) and
// internal/dmabuf (the exported buffers).
//
// [Open] optionally binds the device to vfio-pci first ("managed binding", off by default)
// and puts its previous driver back on [Device.Close]. It turns memory decode on, so that
// buffers exported afterwards are live, and registers the kernel's notifiers (below).
//
// # Kernel notices
//
// The kernel never takes a device away from an open VFIO fd: a driver unbind or a
// hot-unplug blocks until the last device fd is closed, and asks the owner to let go
// through the device request notifier (VFIO_PCI_REQ_IRQ_INDEX), again every 10 s. The AER
// error notifier (VFIO_PCI_ERR_IRQ_INDEX, PCI Express devices only) reports uncorrectable
// errors. Open registers an eventfd for each and [Device.Notices] delivers what they
// signal as [Notice] values ([NoticeRelease], [NoticeError]); on NoticeRelease the owner
// should end the device's leases and Close the device, which lets the unbind complete at
// once. A device without a notifier (a conventional PCI device has no AER one) works
// without it; [Device.Notifier] says which are registered.
//
// # Descriptor lifetime
//
// Every descriptor has one owner:
//
//   - A [Device] owns one vfio.Device, and through it the device fd and its share of the
//     VFIO group and container (or iommufd), from Open to Close. [Device.Revoke] replaces
//     the device fd (vfio.Device.Reopen).
//   - A Device owns one eventfd per registered notifier (EFD_CLOEXEC|EFD_NONBLOCK, read by
//     one goroutine each through the runtime poller, so a waiting reader holds no OS
//     thread), from Open to Close. The kernel holds its own reference to each eventfd
//     while it is registered, which lasts until the device fd is closed: Revoke registers
//     the same eventfds again on the reopened fd. Close closes the device fd first (the
//     kernel lets go of the eventfds, a pending unbind completes), then the eventfds,
//     which ends the goroutines, and then closes the Notices channel.
//   - Every [Device.Export] returns a *dmabuf.Buffer that the caller owns; closing it
//     revokes nothing. [Device.RevokeBuffers] borrows a duplicate of each buffer's fd for
//     the call.
//
// [Device.Close] is idempotent.
//
// # Revocation
//
// Linux 7.2 revokes dma-bufs per device, never per buffer. [Device.Revoke] kills every
// buffer exported so far for good: it clears memory decode (revoking them at once,
// synchronously with the importers), closes and reopens the device fd (the last close of a
// VFIO device revokes its dma-bufs permanently) and sets memory decode again, so buffers
// exported afterwards are live. [Device.Close] also revokes everything for good.
// The permanence relies on this process holding the only device fd: a copy kept elsewhere
// (another process, the systemd fd store) would make the reopen not the last close.
//
// [Device.RevokeBuffers] revokes chosen buffers only, through the proposed per-buffer
// revoke (VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE), when a kernel has it; elsewhere it returns
// an error matching errdefs.ErrNotSupported and the caller falls back to Revoke.
package hostdev
