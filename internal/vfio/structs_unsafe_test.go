package vfio

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestUAPI compares every mirrored struct and constant with test/uapi/linux-7.2.txt,
// which test/uapi prints from the Linux 7.2 source's own uapi headers and checks in the
// rig. It also fails for a mirror declared in this package but missing here.
func TestUAPI(t *testing.T) {
	testutil.CheckUAPI(t, testutil.UAPISpec{
		Dir:     ".",
		Headers: []string{"linux/vfio.h", "linux/pci_regs.h"},
		Structs: []testutil.Mirror{
			{C: "vfio_group_status", Go: groupStatus{}, Fields: "argsz flags"},
			{C: "vfio_device_info", Go: deviceInfo{}, Fields: "argsz flags num_regions num_irqs cap_offset pad"},
			{C: "vfio_region_info", Go: regionInfo{}, Fields: "argsz flags index cap_offset size offset"},
			{C: "vfio_info_cap_header", Go: infoCapHeader{}, Fields: "id version next"},
			{C: "vfio_region_info_cap_sparse_mmap", Go: capSparseMmap{}, Fields: "header nr_areas reserved", Flex: sparseMmapArea{}},
			{C: "vfio_region_sparse_mmap_area", Go: sparseMmapArea{}, Fields: "offset size"},
			{C: "vfio_region_info_cap_type", Go: capType{}, Fields: "header type subtype"},
			{C: "vfio_irq_info", Go: irqInfo{}, Fields: "argsz flags index count"},
			{C: "vfio_irq_set", Go: irqSet{}, Fields: "argsz flags index start count", Flex: uint8(0)},
			{C: "vfio_device_feature", Go: featureHeader{}, Fields: "argsz flags", Flex: uint8(0)},
			{C: "vfio_device_feature_dma_buf", Go: featureDMABuf{}, Fields: "region_index open_flags flags nr_ranges", Flex: regionDMARange{}},
			{C: "vfio_region_dma_range", Go: regionDMARange{}, Fields: "offset length"},
			{C: "vfio_device_bind_iommufd", Go: bindIOMMUFD{}, Fields: "argsz flags iommufd out_devid token_uuid_ptr"},
			{C: "vfio_device_attach_iommufd_pt", Go: attachIOMMUFDPT{}, Fields: "argsz flags pt_id pasid"},
			{C: "vfio_device_detach_iommufd_pt", Go: detachIOMMUFDPT{}, Fields: "argsz flags pasid"},
		},
		Composites: []testutil.Composite{
			{Go: irqSetEventfd{}, Header: "vfio_irq_set", Data: "Eventfd"},
			// The proposed struct vfio_device_feature_dma_buf_revoke is not in 7.2; only
			// where its data begins can be checked.
			{Go: featureDMABufRevoke{}, Header: "vfio_device_feature", Data: "DMABufFD"},
		},
		Consts:      kernelConsts,
		Absent:      absentConsts,
		NotMirrored: notMirrored,
	})
}

// Each constructor sets argsz to the kernel's sizeof of its struct (plus the data that
// follows, for the composites).
func TestConstructorsSetArgsz(t *testing.T) {
	size := func(tag string) uint32 { return uint32(testutil.UAPIStruct(t, tag).Size) }
	if got := newGroupStatus().Argsz; got != size("vfio_group_status") {
		t.Errorf("newGroupStatus().Argsz = %d, want %d", got, size("vfio_group_status"))
	}
	if got := newIRQInfo(4); got.Argsz != size("vfio_irq_info") || got.Index != 4 {
		t.Errorf("newIRQInfo(4) = %+v", got)
	}
	if got := newFeatureHeader(0x5000b); got.Argsz != size("vfio_device_feature") || got.Flags != 0x5000b {
		t.Errorf("newFeatureHeader = %+v", got)
	}
	irqSet4 := size("vfio_irq_set") + 4 // one s32 eventfd
	if got := newIRQSetEventfd(VFIO_PCI_REQ_IRQ_INDEX, 9); got.Header != (irqSet{Argsz: irqSet4, Flags: 0x24, Index: 4, Start: 0, Count: 1}) || got.Eventfd != 9 {
		t.Errorf("newIRQSetEventfd(REQ, 9) = %+v", got)
	}
	if got := newIRQSetNone(VFIO_PCI_ERR_IRQ_INDEX); got != (irqSet{Argsz: size("vfio_irq_set"), Flags: 0x21, Index: 3, Start: 0, Count: 0}) {
		t.Errorf("newIRQSetNone(ERR) = %+v", got)
	}
	revoke := size("vfio_device_feature") + 4 // the proposed { __s32 dmabuf_fd; }
	if got := newFeatureDMABufRevoke(7); got.Header != (featureHeader{Argsz: revoke, Flags: 0x2000d}) || got.DMABufFD != 7 {
		t.Errorf("newFeatureDMABufRevoke(7) = %+v", got)
	}
	if got := newBindIOMMUFD(5); got.Argsz != size("vfio_device_bind_iommufd") || got.IOMMUFD != 5 || got.Flags != 0 {
		t.Errorf("newBindIOMMUFD(5) = %+v", got)
	}
	if got := newAttachIOMMUFDPT(2); got.Argsz != size("vfio_device_attach_iommufd_pt") || got.PtID != 2 {
		t.Errorf("newAttachIOMMUFDPT(2) = %+v", got)
	}
	f := newDMABufFeature(2)
	if want := size("vfio_device_feature") + size("vfio_device_feature_dma_buf") + 2*size("vfio_region_dma_range"); f.hdr.Argsz != want || uint32(len(f.buf)) != want || len(f.ranges) != 2 {
		t.Errorf("newDMABufFeature(2): argsz %d, %d bytes, %d ranges; want %d, %d, 2", f.hdr.Argsz, len(f.buf), len(f.ranges), want, want)
	}
	if f := newDMABufFeature(0); f.ranges != nil || uint32(len(f.buf)) != size("vfio_device_feature")+size("vfio_device_feature_dma_buf") {
		t.Errorf("newDMABufFeature(0): %d bytes, ranges %v", len(f.buf), f.ranges)
	}
}

func TestInfoBufferAligned(t *testing.T) {
	for _, n := range []uint32{0, 1, 24, 31, 32, 33, 100} {
		ib := newInfoBuffer[regionInfo](n)
		if want := max(n, 32); uint32(len(ib.buf)) != want {
			t.Errorf("newInfoBuffer(%d): %d bytes, want %d", n, len(ib.buf), want)
		}
		if p := uintptr(unsafe.Pointer(&ib.buf[0])); p%8 != 0 || unsafe.Pointer(ib.hdr) != unsafe.Pointer(&ib.buf[0]) {
			t.Errorf("newInfoBuffer(%d): buffer at %#x not 8-aligned or not aliasing hdr", n, p)
		}
		ib.hdr.Size = 0x1122334455667788
		if ib.buf[16] != 0x88 || ib.buf[23] != 0x11 {
			t.Errorf("hdr.Size does not land at bytes 16-23: % x", ib.buf[16:24])
		}
	}
}
