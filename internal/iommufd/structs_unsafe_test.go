package iommufd

import (
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestUAPI compares every mirrored struct and constant with test/uapi/linux-7.2.txt,
// which test/uapi prints from the Linux 7.2 source's own uapi headers and checks in the
// rig. It also fails for a mirror declared in this package but missing here.
func TestUAPI(t *testing.T) {
	testutil.CheckUAPI(t, testutil.UAPISpec{
		Dir:     ".",
		Headers: []string{"linux/iommufd.h"},
		Structs: []testutil.Mirror{
			{C: "iommu_ioas_alloc", Go: ioasAlloc{}, Fields: "size flags out_ioas_id"},
			{C: "iommu_destroy", Go: destroy{}, Fields: "size id"},
			{C: "iommu_ioas_map_file", Go: ioasMapFile{}, Fields: "size flags ioas_id fd start length iova"},
			{C: "iommu_ioas_unmap", Go: ioasUnmap{}, Fields: "size ioas_id iova length"},
		},
		Consts: map[string]uint64{
			"IOMMU_DESTROY":             uint64(IOMMU_DESTROY),
			"IOMMU_IOAS_ALLOC":          uint64(IOMMU_IOAS_ALLOC),
			"IOMMU_IOAS_MAP":            uint64(IOMMU_IOAS_MAP),
			"IOMMU_IOAS_UNMAP":          uint64(IOMMU_IOAS_UNMAP),
			"IOMMU_IOAS_MAP_FILE":       uint64(IOMMU_IOAS_MAP_FILE),
			"IOMMU_IOAS_MAP_FIXED_IOVA": uint64(MapFixedIOVA),
			"IOMMU_IOAS_MAP_WRITEABLE":  uint64(MapWriteable),
			"IOMMU_IOAS_MAP_READABLE":   uint64(MapReadable),
		},
		// In the file for docs/kernel.md; this package does not use them.
		NotMirrored: []string{"IOMMU_IOAS_IOVA_RANGES", "IOMMU_OPTION"},
	})
}

// Each constructor sets size to the kernel's sizeof of its struct.
func TestConstructorsSetSize(t *testing.T) {
	size := func(tag string) uint32 { return uint32(testutil.UAPIStruct(t, tag).Size) }
	if got := newIOASAlloc().Size; got != size("iommu_ioas_alloc") {
		t.Errorf("newIOASAlloc().Size = %d", got)
	}
	if got := newDestroy(7); got.Size != size("iommu_destroy") || got.ID != 7 {
		t.Errorf("newDestroy(7) = %+v", got)
	}
	if got := newIOASMapFile().Size; got != size("iommu_ioas_map_file") {
		t.Errorf("newIOASMapFile().Size = %d", got)
	}
	if got := newIOASUnmap(1, 2, 3); got.Size != size("iommu_ioas_unmap") || got.IOASID != 1 || got.IOVA != 2 || got.Length != 3 {
		t.Errorf("newIOASUnmap = %+v", got)
	}
}
