package vfio

// Request numbers (include/uapi/linux/vfio.h): _IO(VFIO_TYPE=';', VFIO_BASE=100 + n).
// VFIO encodes no argument size; the argument carries its own argsz.
const (
	VFIO_GET_API_VERSION          uintptr = 0x3b64 // container: returns VFIO_API_VERSION
	VFIO_CHECK_EXTENSION          uintptr = 0x3b65 // container or group: arg = extension id by value
	VFIO_SET_IOMMU                uintptr = 0x3b66 // container: arg = IOMMU type by value
	VFIO_GROUP_GET_STATUS         uintptr = 0x3b67 // group: struct vfio_group_status
	VFIO_GROUP_SET_CONTAINER      uintptr = 0x3b68 // group: *int32 container (or iommufd) fd
	VFIO_GROUP_UNSET_CONTAINER    uintptr = 0x3b69 // group
	VFIO_GROUP_GET_DEVICE_FD      uintptr = 0x3b6a // group: NUL-terminated device name; returns an fd
	VFIO_DEVICE_GET_INFO          uintptr = 0x3b6b // device: struct vfio_device_info
	VFIO_DEVICE_GET_REGION_INFO   uintptr = 0x3b6c // device: struct vfio_region_info
	VFIO_DEVICE_GET_IRQ_INFO      uintptr = 0x3b6d // device: struct vfio_irq_info
	VFIO_DEVICE_SET_IRQS          uintptr = 0x3b6e // device: struct vfio_irq_set
	VFIO_DEVICE_RESET             uintptr = 0x3b6f // device: no argument
	VFIO_DEVICE_FEATURE           uintptr = 0x3b75 // device: struct vfio_device_feature + data
	VFIO_DEVICE_BIND_IOMMUFD      uintptr = 0x3b76 // cdev: struct vfio_device_bind_iommufd (Linux 6.6)
	VFIO_DEVICE_ATTACH_IOMMUFD_PT uintptr = 0x3b77 // cdev: struct vfio_device_attach_iommufd_pt (Linux 6.6)
	VFIO_DEVICE_DETACH_IOMMUFD_PT uintptr = 0x3b78 // cdev: struct vfio_device_detach_iommufd_pt (Linux 6.6)
)

// Container API version and IOMMU types (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU ids).
const (
	VFIO_API_VERSION   = 0
	VFIO_TYPE1_IOMMU   = 1
	VFIO_TYPE1v2_IOMMU = 3
	VFIO_NOIOMMU_IOMMU = 8
)

// vfio_group_status.flags.
const (
	VFIO_GROUP_FLAGS_VIABLE        = 1 << 0
	VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
)

// vfio_device_info.flags.
const (
	VFIO_DEVICE_FLAGS_RESET = 1 << 0 // the device supports VFIO_DEVICE_RESET
	VFIO_DEVICE_FLAGS_PCI   = 1 << 1 // a vfio-pci device
	VFIO_DEVICE_FLAGS_CAPS  = 1 << 7 // the info has a capability chain
)

// vfio_region_info.flags.
const (
	VFIO_REGION_INFO_FLAG_READ  = 1 << 0
	VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
	VFIO_REGION_INFO_FLAG_MMAP  = 1 << 2
	VFIO_REGION_INFO_FLAG_CAPS  = 1 << 3
)

// Region capability ids (vfio_info_cap_header.id in a region info chain).
const (
	VFIO_REGION_INFO_CAP_SPARSE_MMAP   = 1
	VFIO_REGION_INFO_CAP_TYPE          = 2
	VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
)

// vfio-pci region indexes (enum in include/uapi/linux/vfio.h); indexes from
// VFIO_PCI_NUM_REGIONS on are device specific.
const (
	VFIO_PCI_BAR0_REGION_INDEX   = 0
	VFIO_PCI_BAR5_REGION_INDEX   = 5
	VFIO_PCI_ROM_REGION_INDEX    = 6
	VFIO_PCI_CONFIG_REGION_INDEX = 7
	VFIO_PCI_VGA_REGION_INDEX    = 8
	VFIO_PCI_NUM_REGIONS         = 9
)

// vfio-pci IRQ indexes.
const (
	VFIO_PCI_INTX_IRQ_INDEX = 0
	VFIO_PCI_MSI_IRQ_INDEX  = 1
	VFIO_PCI_MSIX_IRQ_INDEX = 2
	// VFIO_PCI_ERR_IRQ_INDEX is the AER error notifier: the kernel signals it when the
	// device reports an uncorrectable PCIe error. vfio-pci offers it only for PCI Express
	// devices (GET_IRQ_INFO fails with EINVAL for conventional PCI ones).
	VFIO_PCI_ERR_IRQ_INDEX = 3
	// VFIO_PCI_REQ_IRQ_INDEX is the device request notifier: the kernel signals it when it
	// wants the device back (driver unbind, hot-unplug) and re-signals every 10 s until the
	// last device fd is closed.
	VFIO_PCI_REQ_IRQ_INDEX = 4
	VFIO_PCI_NUM_IRQS      = 5
)

// vfio_irq_info.flags.
const (
	VFIO_IRQ_INFO_EVENTFD    = 1 << 0
	VFIO_IRQ_INFO_MASKABLE   = 1 << 1
	VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
	VFIO_IRQ_INFO_NORESIZE   = 1 << 3
)

// vfio_irq_set.flags: one DATA type and one ACTION.
const (
	VFIO_IRQ_SET_DATA_NONE      = 1 << 0 // no data: perform the action now (count 0 with TRIGGER: disable the index)
	VFIO_IRQ_SET_DATA_BOOL      = 1 << 1 // data is count u8 booleans
	VFIO_IRQ_SET_DATA_EVENTFD   = 1 << 2 // data is count s32 eventfds (-1 unassigns)
	VFIO_IRQ_SET_ACTION_MASK    = 1 << 3
	VFIO_IRQ_SET_ACTION_UNMASK  = 1 << 4
	VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5 // kernel -> user signalling
)

// vfio_device_feature.flags: the low 16 bits name the feature.
const (
	VFIO_DEVICE_FEATURE_MASK  = 0xffff
	VFIO_DEVICE_FEATURE_GET   = 1 << 16
	VFIO_DEVICE_FEATURE_SET   = 1 << 17
	VFIO_DEVICE_FEATURE_PROBE = 1 << 18
)

// Device features.
const (
	// VFIO_DEVICE_FEATURE_DMA_BUF exports BAR ranges as a dma-buf (Linux 6.19).
	VFIO_DEVICE_FEATURE_DMA_BUF = 11
	// VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE is the proposed per-dma-buf revoke feature (SET
	// only, data struct { __s32 dmabuf_fd; }), from v3 (June 2026) of Matt Evans's
	// unmerged series "vfio/pci: DMABUF mmap and explicit revoke"; Linux 7.2 answers
	// ENOTTY.
	VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE = 13
)

// PCI configuration space registers (include/uapi/linux/pci_regs.h).
const (
	PCI_VENDOR_ID      = 0x00
	PCI_DEVICE_ID      = 0x02
	PCI_COMMAND        = 0x04
	PCI_COMMAND_MEMORY = 0x2 // enable response in memory space
	PCI_COMMAND_MASTER = 0x4 // enable bus mastering (the device may DMA)
)
