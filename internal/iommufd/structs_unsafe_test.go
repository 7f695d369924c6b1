package iommufd

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

var checkLayout = testutil.CheckLayout

// field names a field of a mirrored struct: its Go offset, and the kernel's.
func field(name string, got, want uintptr) testutil.Field {
	return testutil.Field{Name: name, Got: got, Want: want}
}

// Sizes and offsets from kernel-uapi.md §1.3 and §5.1 (printed from the Linux 7.2 headers).
func TestLayout(t *testing.T) {
	var a ioasAlloc
	checkLayout(t, "iommu_ioas_alloc", unsafe.Sizeof(a), 12,
		field("size", unsafe.Offsetof(a.Size), 0),
		field("flags", unsafe.Offsetof(a.Flags), 4),
		field("out_ioas_id", unsafe.Offsetof(a.OutIOASID), 8))
	var d destroy
	checkLayout(t, "iommu_destroy", unsafe.Sizeof(d), 8,
		field("size", unsafe.Offsetof(d.Size), 0),
		field("id", unsafe.Offsetof(d.ID), 4))
	var m ioasMapFile
	checkLayout(t, "iommu_ioas_map_file", unsafe.Sizeof(m), 40,
		field("size", unsafe.Offsetof(m.Size), 0),
		field("flags", unsafe.Offsetof(m.Flags), 4),
		field("ioas_id", unsafe.Offsetof(m.IOASID), 8),
		field("fd", unsafe.Offsetof(m.FD), 12),
		field("start", unsafe.Offsetof(m.Start), 16),
		field("length", unsafe.Offsetof(m.Length), 24),
		field("iova", unsafe.Offsetof(m.IOVA), 32))
	var u ioasUnmap
	checkLayout(t, "iommu_ioas_unmap", unsafe.Sizeof(u), 24,
		field("size", unsafe.Offsetof(u.Size), 0),
		field("ioas_id", unsafe.Offsetof(u.IOASID), 4),
		field("iova", unsafe.Offsetof(u.IOVA), 8),
		field("length", unsafe.Offsetof(u.Length), 16))
}

func TestConstructorsSetSize(t *testing.T) {
	if got := newIOASAlloc().Size; got != 12 {
		t.Errorf("newIOASAlloc().Size = %d", got)
	}
	if got := newDestroy(7); got.Size != 8 || got.ID != 7 {
		t.Errorf("newDestroy(7) = %+v", got)
	}
	if got := newIOASMapFile().Size; got != 40 {
		t.Errorf("newIOASMapFile().Size = %d", got)
	}
	if got := newIOASUnmap(1, 2, 3); got.Size != 24 || got.IOASID != 1 || got.IOVA != 2 || got.Length != 3 {
		t.Errorf("newIOASUnmap = %+v", got)
	}
}
