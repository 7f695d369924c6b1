package iommufd

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// Sizes and offsets from docs/kernel.md §1.3 and §5.1 (printed from the Linux 7.2 headers).
func TestLayout(t *testing.T) {
	var a ioasAlloc
	testutil.CheckLayout(t, "iommu_ioas_alloc", unsafe.Sizeof(a), 12,
		testutil.Offset("size", unsafe.Offsetof(a.Size), 0),
		testutil.Offset("flags", unsafe.Offsetof(a.Flags), 4),
		testutil.Offset("out_ioas_id", unsafe.Offsetof(a.OutIOASID), 8))
	var d destroy
	testutil.CheckLayout(t, "iommu_destroy", unsafe.Sizeof(d), 8,
		testutil.Offset("size", unsafe.Offsetof(d.Size), 0),
		testutil.Offset("id", unsafe.Offsetof(d.ID), 4))
	var m ioasMapFile
	testutil.CheckLayout(t, "iommu_ioas_map_file", unsafe.Sizeof(m), 40,
		testutil.Offset("size", unsafe.Offsetof(m.Size), 0),
		testutil.Offset("flags", unsafe.Offsetof(m.Flags), 4),
		testutil.Offset("ioas_id", unsafe.Offsetof(m.IOASID), 8),
		testutil.Offset("fd", unsafe.Offsetof(m.FD), 12),
		testutil.Offset("start", unsafe.Offsetof(m.Start), 16),
		testutil.Offset("length", unsafe.Offsetof(m.Length), 24),
		testutil.Offset("iova", unsafe.Offsetof(m.IOVA), 32))
	var u ioasUnmap
	testutil.CheckLayout(t, "iommu_ioas_unmap", unsafe.Sizeof(u), 24,
		testutil.Offset("size", unsafe.Offsetof(u.Size), 0),
		testutil.Offset("ioas_id", unsafe.Offsetof(u.IOASID), 4),
		testutil.Offset("iova", unsafe.Offsetof(u.IOVA), 8),
		testutil.Offset("length", unsafe.Offsetof(u.Length), 16))
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
