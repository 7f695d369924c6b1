package vfio

import (
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/ioctl"
)

// Request numbers from docs/kernel.md §10, and their _IO(';', 100+n) derivation.
func TestRequestNumbers(t *testing.T) {
	const base = 100
	for _, tt := range []struct {
		name string
		got  uintptr
		n    uintptr
		want uintptr
	}{
		{"VFIO_GET_API_VERSION", VFIO_GET_API_VERSION, 0, 0x3b64},
		{"VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION, 1, 0x3b65},
		{"VFIO_SET_IOMMU", VFIO_SET_IOMMU, 2, 0x3b66},
		{"VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS, 3, 0x3b67},
		{"VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER, 4, 0x3b68},
		{"VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER, 5, 0x3b69},
		{"VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD, 6, 0x3b6a},
		{"VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO, 7, 0x3b6b},
		{"VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO, 8, 0x3b6c},
		{"VFIO_DEVICE_GET_IRQ_INFO", VFIO_DEVICE_GET_IRQ_INFO, 9, 0x3b6d},
		{"VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS, 10, 0x3b6e},
		{"VFIO_DEVICE_RESET", VFIO_DEVICE_RESET, 11, 0x3b6f},
		{"VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE, 17, 0x3b75},
		{"VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD, 18, 0x3b76},
		{"VFIO_DEVICE_ATTACH_IOMMUFD_PT", VFIO_DEVICE_ATTACH_IOMMUFD_PT, 19, 0x3b77},
		{"VFIO_DEVICE_DETACH_IOMMUFD_PT", VFIO_DEVICE_DETACH_IOMMUFD_PT, 20, 0x3b78},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
		if io := ioctl.IO(';', base+tt.n); io != tt.want {
			t.Errorf("_IO(';', %d) = %#x, want %#x (%s)", base+tt.n, io, tt.want, tt.name)
		}
	}
	if got := uint32(VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF); got != 0x5000b {
		t.Errorf("PROBE|GET|DMA_BUF = %#x, want 0x5000b", got)
	}
}
