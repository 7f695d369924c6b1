package vfio

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// Sizes and offsets from docs/kernel.md §1-§3 and §10 (printed from the Linux 7.2
// headers), checked once more against include/uapi/linux/vfio.h of 7.2.13.
func TestLayout(t *testing.T) {
	var gs groupStatus
	testutil.CheckLayout(t, "vfio_group_status", unsafe.Sizeof(gs), 8,
		testutil.Offset("argsz", unsafe.Offsetof(gs.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(gs.Flags), 4))

	var di deviceInfo
	testutil.CheckLayout(t, "vfio_device_info", unsafe.Sizeof(di), 24,
		testutil.Offset("argsz", unsafe.Offsetof(di.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(di.Flags), 4),
		testutil.Offset("num_regions", unsafe.Offsetof(di.NumRegions), 8),
		testutil.Offset("num_irqs", unsafe.Offsetof(di.NumIRQs), 12),
		testutil.Offset("cap_offset", unsafe.Offsetof(di.CapOffset), 16),
		testutil.Offset("pad", unsafe.Offsetof(di.Pad), 20))

	var ri regionInfo
	testutil.CheckLayout(t, "vfio_region_info", unsafe.Sizeof(ri), 32,
		testutil.Offset("argsz", unsafe.Offsetof(ri.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(ri.Flags), 4),
		testutil.Offset("index", unsafe.Offsetof(ri.Index), 8),
		testutil.Offset("cap_offset", unsafe.Offsetof(ri.CapOffset), 12),
		testutil.Offset("size", unsafe.Offsetof(ri.Size), 16),
		testutil.Offset("offset", unsafe.Offsetof(ri.Offset), 24))

	var ch infoCapHeader
	testutil.CheckLayout(t, "vfio_info_cap_header", unsafe.Sizeof(ch), 8,
		testutil.Offset("id", unsafe.Offsetof(ch.ID), 0),
		testutil.Offset("version", unsafe.Offsetof(ch.Version), 2),
		testutil.Offset("next", unsafe.Offsetof(ch.Next), 4))

	var sm capSparseMmap
	testutil.CheckLayout(t, "vfio_region_info_cap_sparse_mmap", unsafe.Sizeof(sm), 16,
		testutil.Offset("header", unsafe.Offsetof(sm.Header), 0),
		testutil.Offset("nr_areas", unsafe.Offsetof(sm.NrAreas), 8),
		testutil.Offset("reserved", unsafe.Offsetof(sm.Reserved), 12))

	var sa sparseMmapArea
	testutil.CheckLayout(t, "vfio_region_sparse_mmap_area", unsafe.Sizeof(sa), 16,
		testutil.Offset("offset", unsafe.Offsetof(sa.Offset), 0),
		testutil.Offset("size", unsafe.Offsetof(sa.Size), 8))

	var ct capType
	testutil.CheckLayout(t, "vfio_region_info_cap_type", unsafe.Sizeof(ct), 16,
		testutil.Offset("header", unsafe.Offsetof(ct.Header), 0),
		testutil.Offset("type", unsafe.Offsetof(ct.Type), 8),
		testutil.Offset("subtype", unsafe.Offsetof(ct.Subtype), 12))

	var ii irqInfo
	testutil.CheckLayout(t, "vfio_irq_info", unsafe.Sizeof(ii), 16,
		testutil.Offset("argsz", unsafe.Offsetof(ii.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(ii.Flags), 4),
		testutil.Offset("index", unsafe.Offsetof(ii.Index), 8),
		testutil.Offset("count", unsafe.Offsetof(ii.Count), 12))

	var is irqSet
	testutil.CheckLayout(t, "vfio_irq_set", unsafe.Sizeof(is), 20,
		testutil.Offset("argsz", unsafe.Offsetof(is.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(is.Flags), 4),
		testutil.Offset("index", unsafe.Offsetof(is.Index), 8),
		testutil.Offset("start", unsafe.Offsetof(is.Start), 12),
		testutil.Offset("count", unsafe.Offsetof(is.Count), 16))

	var ie irqSetEventfd
	testutil.CheckLayout(t, "vfio_irq_set+s32", unsafe.Sizeof(ie), 24,
		testutil.Offset("header", unsafe.Offsetof(ie.Header), 0),
		testutil.Offset("data[0]", unsafe.Offsetof(ie.Eventfd), 20))

	var fr featureDMABufRevoke
	testutil.CheckLayout(t, "vfio_device_feature+vfio_device_feature_dma_buf_revoke", unsafe.Sizeof(fr), 12,
		testutil.Offset("header", unsafe.Offsetof(fr.Header), 0),
		testutil.Offset("dmabuf_fd", unsafe.Offsetof(fr.DMABufFD), 8))

	var fh featureHeader
	testutil.CheckLayout(t, "vfio_device_feature", unsafe.Sizeof(fh), 8,
		testutil.Offset("argsz", unsafe.Offsetof(fh.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(fh.Flags), 4))

	var fd featureDMABuf
	testutil.CheckLayout(t, "vfio_device_feature_dma_buf", unsafe.Sizeof(fd), 16,
		testutil.Offset("region_index", unsafe.Offsetof(fd.RegionIndex), 0),
		testutil.Offset("open_flags", unsafe.Offsetof(fd.OpenFlags), 4),
		testutil.Offset("flags", unsafe.Offsetof(fd.Flags), 8),
		testutil.Offset("nr_ranges", unsafe.Offsetof(fd.NrRanges), 12))

	var dr regionDMARange
	testutil.CheckLayout(t, "vfio_region_dma_range", unsafe.Sizeof(dr), 16,
		testutil.Offset("offset", unsafe.Offsetof(dr.Offset), 0),
		testutil.Offset("length", unsafe.Offsetof(dr.Length), 8))

	var b bindIOMMUFD
	testutil.CheckLayout(t, "vfio_device_bind_iommufd", unsafe.Sizeof(b), 24,
		testutil.Offset("argsz", unsafe.Offsetof(b.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(b.Flags), 4),
		testutil.Offset("iommufd", unsafe.Offsetof(b.IOMMUFD), 8),
		testutil.Offset("out_devid", unsafe.Offsetof(b.OutDevID), 12),
		testutil.Offset("token_uuid_ptr", unsafe.Offsetof(b.TokenUUIDPtr), 16))

	var at attachIOMMUFDPT
	testutil.CheckLayout(t, "vfio_device_attach_iommufd_pt", unsafe.Sizeof(at), 16,
		testutil.Offset("argsz", unsafe.Offsetof(at.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(at.Flags), 4),
		testutil.Offset("pt_id", unsafe.Offsetof(at.PtID), 8),
		testutil.Offset("pasid", unsafe.Offsetof(at.Pasid), 12))

	var dt detachIOMMUFDPT
	testutil.CheckLayout(t, "vfio_device_detach_iommufd_pt", unsafe.Sizeof(dt), 12,
		testutil.Offset("argsz", unsafe.Offsetof(dt.Argsz), 0),
		testutil.Offset("flags", unsafe.Offsetof(dt.Flags), 4),
		testutil.Offset("pasid", unsafe.Offsetof(dt.Pasid), 8))
}

func TestConstructorsSetArgsz(t *testing.T) {
	if got := newGroupStatus().Argsz; got != 8 {
		t.Errorf("newGroupStatus().Argsz = %d, want 8", got)
	}
	if got := newIRQInfo(4); got.Argsz != 16 || got.Index != 4 {
		t.Errorf("newIRQInfo(4) = %+v", got)
	}
	if got := newFeatureHeader(0x5000b); got.Argsz != 8 || got.Flags != 0x5000b {
		t.Errorf("newFeatureHeader = %+v", got)
	}
	if got := newIRQSetEventfd(VFIO_PCI_REQ_IRQ_INDEX, 9); got.Header != (irqSet{Argsz: 24, Flags: 0x24, Index: 4, Start: 0, Count: 1}) || got.Eventfd != 9 {
		t.Errorf("newIRQSetEventfd(REQ, 9) = %+v", got)
	}
	if got := newIRQSetNone(VFIO_PCI_ERR_IRQ_INDEX); got != (irqSet{Argsz: 20, Flags: 0x21, Index: 3, Start: 0, Count: 0}) {
		t.Errorf("newIRQSetNone(ERR) = %+v", got)
	}
	if got := newFeatureDMABufRevoke(7); got.Header != (featureHeader{Argsz: 12, Flags: 0x2000d}) || got.DMABufFD != 7 {
		t.Errorf("newFeatureDMABufRevoke(7) = %+v", got)
	}
	if got := newBindIOMMUFD(5); got.Argsz != 24 || got.IOMMUFD != 5 || got.Flags != 0 {
		t.Errorf("newBindIOMMUFD(5) = %+v", got)
	}
	if got := newAttachIOMMUFDPT(2); got.Argsz != 16 || got.PtID != 2 {
		t.Errorf("newAttachIOMMUFDPT(2) = %+v", got)
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
