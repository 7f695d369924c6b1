// Package vfio drives VFIO PCI devices through the kernel's uAPI
// (include/uapi/linux/vfio.h, Linux 7.2): opening a device by PCI address, reading its
// info and regions (with the capability chain), config space access, reset, feature
// probes, and exporting BAR ranges as dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF, Linux 6.19+).
//
// # Opening
//
// [Open] finds the device in sysfs and opens it one of two ways ([Mode]):
//
//   - group: /dev/vfio/N joined to a /dev/vfio/vfio container with the type1v2 IOMMU, then
//     VFIO_GROUP_GET_DEVICE_FD. The group chardev opens only once system-wide, so the
//     group and its container are shared by every device of the group this process opens.
//   - cdev: /dev/vfio/devices/vfioN, bound to an iommufd (VFIO_DEVICE_BIND_IOMMUFD) and
//     attached to an IOAS. One iommufd and IOAS serve every cdev device of the process.
//
// "auto" picks cdev when the kernel has it (CONFIG_VFIO_DEVICE_CDEV, /dev/iommu) and the
// group path otherwise. The shared objects live in a process-wide, reference-counted
// registry: the last [Device.Close] of a group's devices closes the group and container,
// the last cdev device closes the iommufd. A device can be open only once per process.
//
// A caller may instead bring its own iommufd and IOAS ([OpenOptions].IOMMUFD and IOAS):
// the device is then opened in cdev mode and attached to that address space, which is
// how a client that owns a DMA engine makes a brokered dma-buf reachable by it (map the
// dma-buf into the same IOAS with iommufd.FD.MapFile). That iommufd stays the caller's.
//
// # Interrupt notifiers
//
// [Device.SetIRQEventfd] registers an eventfd for an IRQ index (VFIO_DEVICE_SET_IRQS);
// the two that matter to a broker are VFIO_PCI_REQ_IRQ_INDEX, the kernel asking for the
// device back (driver unbind or hot-unplug waits for the last device fd to close and
// re-asks every 10 s), and VFIO_PCI_ERR_IRQ_INDEX, AER errors (PCI Express devices only).
// The kernel holds its own reference to the eventfd; the registration lasts until
// [Device.ClearIRQ] or the close of the device fd, so it must be renewed after
// [Device.Reopen].
//
// # Descriptor lifetime
//
// A [Device] owns its device fd. Every descriptor is O_CLOEXEC (device fds from a group
// always are; dma-buf exports get O_CLOEXEC added). [Device.ExportDMABuf] returns a new
// dma-buf file that the caller owns; closing it revokes nothing, and the dma-buf lives on
// while any process or importer holds a reference. Eventfds passed to
// [Device.SetIRQEventfd] and dma-bufs passed to [Device.RevokeDMABuf] are borrowed for the
// call. [Device.Close] is idempotent.
//
// # Revocation
//
// Revocation is device-wide: the kernel has no uAPI to revoke one dma-buf (Linux 7.2).
// [Device.DMABufRevokeSupported] probes for the proposed per-buffer revoke
// (VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE, feature 13) and [Device.RevokeDMABuf] uses it
// where a future kernel has it.
//
//   - Clearing PCI_COMMAND_MEMORY ([Device.SetMemoryEnable](false)), a reset
//     ([Device.Reset]), or a power-state change revokes every dma-buf of the device
//     temporarily: setting memory decode again un-revokes them, but importers that were
//     revoked (iommufd) never map again by themselves and must map anew. A dma-buf
//     exported while memory decode is off is born revoked.
//   - The last close of the device fd revokes every dma-buf of the device for good: the
//     fds stay valid, but attaching or mapping them fails with ENODEV forever.
//     [Device.Reopen] closes and reopens the device fd (keeping group, container or
//     iommufd) exactly to do that; [Device.Close] does it too.
//
// # Keeping fds across restarts
//
// With [OpenOptions.Keeper] (the systemd fd store, in mmiobrokerd) every fd Open opens —
// device, group and container, or iommufd — is kept outside the process too, and the next
// run's Open takes them back ([Device.Restored]): the device was never closed, so its
// dma-bufs stayed live. For the last close to still revoke, a kept copy is forgotten
// before this process closes its own, and Reopen opens the device again only once the
// kept copy is really gone: systemd closes dropped fds asynchronously, after it answered.
// The cdev path shows it (binding a second open of a device fails with EINVAL while
// another is open); the group path shows it through the container (a group cannot leave
// its container while one of its devices is open), which Reopen can use while the device
// is the only one of its group open in this process. With several devices of one group
// open, a group-mode Reopen under a Keeper cannot tell, and may reopen while the old file
// still exists: then the old dma-bufs are revoked only until memory decode is set again.
// [Device.Detach] closes this process's fds and leaves the kept ones.
//
// # Errors
//
// Errors are *[Error] values naming the device and operation
// ("vfio 0000:00:03.0: export-dma-buf: …"). They keep the errno of a failed ioctl
// (errors.Is(err, unix.ENODEV)) and also match its errdefs class (EINVAL is
// errdefs.ErrInvalidArgument, ENOTTY errdefs.ErrNotSupported, …). A missing feature is a
// *[FeatureError], which matches errdefs.ErrNotSupported.
package vfio
