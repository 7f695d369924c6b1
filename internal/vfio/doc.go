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
// # Descriptor lifetime
//
// A [Device] owns its device fd. Every descriptor is O_CLOEXEC (device fds from a group
// always are; dma-buf exports get O_CLOEXEC added). [Device.ExportDMABuf] returns a new
// dma-buf file that the caller owns; closing it revokes nothing, and the dma-buf lives on
// while any process or importer holds a reference. [Device.Close] is idempotent.
//
// # Revocation
//
// Revocation is device-wide: the kernel has no uAPI to revoke one dma-buf (Linux 7.2).
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
// # Errors
//
// Errors are *[Error] values naming the device and operation
// ("vfio 0000:00:03.0: export-dma-buf: …"). They keep the errno of a failed ioctl
// (errors.Is(err, unix.ENODEV)) and also match its errdefs class (EINVAL is
// errdefs.ErrInvalidArgument, ENOTTY errdefs.ErrNotSupported, …). A missing feature is a
// *[FeatureError], which matches errdefs.ErrNotSupported.
package vfio
