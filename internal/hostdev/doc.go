// Package hostdev is the broker's view of a real host PCI device: it implements
// broker.Device on top of internal/pci (sysfs), internal/vfio (the device fd) and
// internal/dmabuf (the exported buffers).
//
// [Open] optionally binds the device to vfio-pci first ("managed binding", off by default)
// and puts its previous driver back on [Device.Close]. It turns memory decode on, so that
// buffers exported afterwards are live.
//
// # Descriptor lifetime
//
// A [Device] owns one vfio.Device, and through it the device fd and its share of the VFIO
// group and container (or iommufd). Every [Device.Export] returns a *dmabuf.Buffer that the
// caller owns; closing it revokes nothing. [Device.Close] is idempotent.
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
package hostdev
