package ioctl

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// Request numbers from docs/kernel.md §10 (printed from the Linux 7.2 headers).
func TestEncoding(t *testing.T) {
	const vfio, kvm, dmabuf = ';', 0xae, 'b'
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"VFIO_GET_API_VERSION", IO(vfio, 100), 0x3b64},
		{"VFIO_CHECK_EXTENSION", IO(vfio, 101), 0x3b65},
		{"VFIO_SET_IOMMU", IO(vfio, 102), 0x3b66},
		{"VFIO_GROUP_GET_STATUS", IO(vfio, 103), 0x3b67},
		{"VFIO_GROUP_SET_CONTAINER", IO(vfio, 104), 0x3b68},
		{"VFIO_GROUP_GET_DEVICE_FD", IO(vfio, 106), 0x3b6a},
		{"VFIO_DEVICE_GET_INFO", IO(vfio, 107), 0x3b6b},
		{"VFIO_DEVICE_GET_REGION_INFO", IO(vfio, 108), 0x3b6c},
		{"VFIO_DEVICE_RESET", IO(vfio, 111), 0x3b6f},
		{"VFIO_DEVICE_FEATURE", IO(vfio, 117), 0x3b75},
		{"VFIO_DEVICE_BIND_IOMMUFD", IO(vfio, 118), 0x3b76},
		{"VFIO_DEVICE_ATTACH_IOMMUFD_PT", IO(vfio, 119), 0x3b77},
		{"VFIO_DEVICE_DETACH_IOMMUFD_PT", IO(vfio, 120), 0x3b78},
		{"IOMMU_DESTROY", IO(vfio, 0x80), 0x3b80},
		{"IOMMU_IOAS_ALLOC", IO(vfio, 0x81), 0x3b81},
		{"IOMMU_IOAS_UNMAP", IO(vfio, 0x86), 0x3b86},
		{"IOMMU_IOAS_MAP_FILE", IO(vfio, 0x8f), 0x3b8f},
		{"DMA_BUF_IOCTL_SYNC", IOW(dmabuf, 0, 8), 0x40086200},
		{"DMA_BUF_SET_NAME_B", IOW(dmabuf, 1, 8), 0x40086201},
		{"DMA_BUF_SET_NAME_A", IOW(dmabuf, 1, 4), 0x40046201},
		{"DMA_BUF_IOCTL_EXPORT_SYNC_FILE", IOWR(dmabuf, 2, 8), 0xc0086202},
		{"DMA_BUF_IOCTL_IMPORT_SYNC_FILE", IOW(dmabuf, 3, 8), 0x40086203},
		{"KVM_GET_API_VERSION", IO(kvm, 0), 0xae00},
		{"KVM_CHECK_EXTENSION", IO(kvm, 3), 0xae03},
		{"KVM_SET_USER_MEMORY_REGION", IOW(kvm, 0x46, 32), 0x4020ae46},
		{"KVM_SET_USER_MEMORY_REGION2", IOW(kvm, 0x49, 160), 0x40a0ae49},
		{"KVM_CREATE_GUEST_MEMFD", IOWR(kvm, 0xd4, 64), 0xc040aed4},
		{"KVM_CREATE_DEVICE", IOWR(kvm, 0xe0, 12), 0xc00caee0},
		{"KVM_SET_DEVICE_ATTR", IOW(kvm, 0xe1, 24), 0x4018aee1},
		{"KVM_ENABLE_CAP", IOW(kvm, 0xa3, 104), 0x4068aea3},
		// Cross-checks against x/sys/unix, which takes its numbers from the C headers.
		{"FS_IOC_GETFLAGS", IOR('f', 1, 8), unix.FS_IOC_GETFLAGS},
		{"FS_IOC_SETFLAGS", IOW('f', 2, 8), unix.FS_IOC_SETFLAGS},
		{"PERF_EVENT_IOC_ENABLE", IO('$', 0), unix.PERF_EVENT_IOC_ENABLE},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
}

func TestDecode(t *testing.T) {
	tests := []struct {
		req                uintptr
		dir, typ, nr, size uintptr
	}{
		{0x3b8f, DirNone, ';', 0x8f, 0},
		{0x40a0ae49, DirWrite, 0xae, 0x49, 160},
		{0xc00caee0, DirRead | DirWrite, 0xae, 0xe0, 12},
		{unix.FS_IOC_GETFLAGS, DirRead, 'f', 1, 8},
		{IOC(3, 0xff, 0xff, MaxSize), 3, 0xff, 0xff, MaxSize},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%#x", tt.req), func(t *testing.T) {
			if got := Dir(tt.req); got != tt.dir {
				t.Errorf("Dir = %d, want %d", got, tt.dir)
			}
			if got := Type(tt.req); got != tt.typ {
				t.Errorf("Type = %#x, want %#x", got, tt.typ)
			}
			if got := Nr(tt.req); got != tt.nr {
				t.Errorf("Nr = %#x, want %#x", got, tt.nr)
			}
			if got := Size(tt.req); got != tt.size {
				t.Errorf("Size = %d, want %d", got, tt.size)
			}
			if got := IOC(tt.dir, tt.typ, tt.nr, tt.size); got != tt.req {
				t.Errorf("IOC(decoded) = %#x, want %#x", got, tt.req)
			}
		})
	}
}

func TestIOCTruncatesFields(t *testing.T) {
	// Fields wider than their width must not spill into neighbours.
	if got, want := IOC(DirNone, 0x1ff, 0x1ff, 0), IOC(DirNone, 0xff, 0xff, 0); got != want {
		t.Errorf("IOC with wide type/nr = %#x, want %#x", got, want)
	}
	if got := Size(IOC(DirWrite, 1, 1, MaxSize+1)); got != 0 {
		t.Errorf("size MaxSize+1 encodes as %d, want 0 (truncated)", got)
	}
}
