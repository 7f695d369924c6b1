package vfio

import (
	"structs"
	"unsafe"
)

// The mirrored structs below follow include/uapi/linux/vfio.h of Linux 7.2.13; the
// comment of each names the release that introduced the layout. They are hand-written
// because the host's linux-libc-dev (6.1) lacks the newer ones and gives
// vfio_device_info without its trailing pad. TestUAPI checks every size, alignment and
// field against test/uapi/linux-7.2.txt, which a C program prints from the 7.2 headers
// (docs/kernel.md §0).

// groupStatus mirrors struct vfio_group_status (include/uapi/linux/vfio.h, Linux 3.6).
type groupStatus struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32 // VFIO_GROUP_FLAGS_*
}

// deviceInfo mirrors struct vfio_device_info (include/uapi/linux/vfio.h, Linux 3.6; cap_offset
// and pad were added later). 24 bytes including the trailing pad; a capability chain,
// if any, follows at CapOffset.
type deviceInfo struct {
	_          structs.HostLayout
	Argsz      uint32
	Flags      uint32 // VFIO_DEVICE_FLAGS_*
	NumRegions uint32
	NumIRQs    uint32
	CapOffset  uint32
	Pad        uint32
}

// regionInfo mirrors struct vfio_region_info (include/uapi/linux/vfio.h, Linux 3.6;
// cap_offset was added with the capability chain). 32 bytes; capabilities follow at CapOffset.
type regionInfo struct {
	_         structs.HostLayout
	Argsz     uint32
	Flags     uint32 // VFIO_REGION_INFO_FLAG_*
	Index     uint32
	CapOffset uint32
	Size      uint64
	Offset    uint64
}

// infoCapHeader mirrors struct vfio_info_cap_header (include/uapi/linux/vfio.h, layout of
// Linux 7.2). Next is the offset of the next capability from the start of the info struct; 0 ends the
// chain.
type infoCapHeader struct {
	_       structs.HostLayout
	ID      uint16
	Version uint16
	Next    uint32
}

// capSparseMmap mirrors struct vfio_region_info_cap_sparse_mmap (include/uapi/linux/vfio.h,
// layout of Linux 7.2) without its flexible array of sparseMmapArea.
type capSparseMmap struct {
	_        structs.HostLayout
	Header   infoCapHeader
	NrAreas  uint32
	Reserved uint32
}

// sparseMmapArea mirrors struct vfio_region_sparse_mmap_area (include/uapi/linux/vfio.h,
// layout of Linux 7.2).
type sparseMmapArea struct {
	_      structs.HostLayout
	Offset uint64
	Size   uint64
}

// capType mirrors struct vfio_region_info_cap_type (include/uapi/linux/vfio.h, layout of
// Linux 7.2).
type capType struct {
	_       structs.HostLayout
	Header  infoCapHeader
	Type    uint32
	Subtype uint32
}

// irqInfo mirrors struct vfio_irq_info (include/uapi/linux/vfio.h, Linux 3.6).
type irqInfo struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Index uint32
	Count uint32
}

// irqSet mirrors struct vfio_irq_set (include/uapi/linux/vfio.h, Linux 3.6) without its
// flexible data array: a 20-byte header that count elements of the DATA type follow.
type irqSet struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32 // one VFIO_IRQ_SET_DATA_* | one VFIO_IRQ_SET_ACTION_*
	Index uint32
	Start uint32
	Count uint32
}

// irqSetEventfd is struct vfio_irq_set with a single s32 eventfd as its data (count 1,
// VFIO_IRQ_SET_DATA_EVENTFD): 24 bytes, the eventfd at offset 20.
type irqSetEventfd struct {
	_       structs.HostLayout
	Header  irqSet
	Eventfd int32
}

// featureHeader mirrors struct vfio_device_feature (include/uapi/linux/vfio.h, Linux 5.7)
// without its flexible data array.
type featureHeader struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32 // feature index | VFIO_DEVICE_FEATURE_GET/SET/PROBE
}

// featureDMABuf mirrors struct vfio_device_feature_dma_buf (include/uapi/linux/vfio.h,
// Linux 6.19) without its flexible array of regionDMARange.
type featureDMABuf struct {
	_           structs.HostLayout
	RegionIndex uint32
	OpenFlags   uint32
	Flags       uint32 // must be 0
	NrRanges    uint32
}

// regionDMARange mirrors struct vfio_region_dma_range (include/uapi/linux/vfio.h,
// Linux 6.19).
type regionDMARange struct {
	_      structs.HostLayout
	Offset uint64
	Length uint64
}

// featureDMABufRevoke is struct vfio_device_feature followed by the proposed struct
// vfio_device_feature_dma_buf_revoke { __s32 dmabuf_fd; } (v3 of "vfio/pci: DMABUF mmap
// and explicit revoke", June 2026; not in Linux 7.2): 12 bytes.
type featureDMABufRevoke struct {
	_        structs.HostLayout
	Header   featureHeader
	DMABufFD int32
}

// bindIOMMUFD mirrors struct vfio_device_bind_iommufd (include/uapi/linux/vfio.h,
// Linux 6.6; layout of 7.2, where the last field is token_uuid_ptr).
type bindIOMMUFD struct {
	_            structs.HostLayout
	Argsz        uint32
	Flags        uint32 // 0 or VFIO_DEVICE_BIND_FLAG_TOKEN
	IOMMUFD      int32
	OutDevID     uint32
	TokenUUIDPtr uint64
}

// attachIOMMUFDPT mirrors struct vfio_device_attach_iommufd_pt (include/uapi/linux/vfio.h,
// Linux 6.6; layout of 7.2, with pasid).
type attachIOMMUFDPT struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	PtID  uint32 // in: IOAS or HWPT id; out: the attached id
	Pasid uint32
}

// detachIOMMUFDPT mirrors struct vfio_device_detach_iommufd_pt (include/uapi/linux/vfio.h,
// Linux 6.6; layout of 7.2, with pasid).
type detachIOMMUFDPT struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Pasid uint32
}

// Sizes of the fixed parts, used to lay out byte buffers.
const (
	sizeofDeviceInfo     = uint32(unsafe.Sizeof(deviceInfo{}))
	sizeofRegionInfo     = uint32(unsafe.Sizeof(regionInfo{}))
	sizeofCapHeader      = uint32(unsafe.Sizeof(infoCapHeader{}))
	sizeofFeatureHeader  = uint32(unsafe.Sizeof(featureHeader{}))
	sizeofFeatureDMABuf  = uint32(unsafe.Sizeof(featureDMABuf{}))
	sizeofRegionDMARange = uint32(unsafe.Sizeof(regionDMARange{}))
	sizeofSparseMmap     = uint32(unsafe.Sizeof(capSparseMmap{}))
	sizeofSparseArea     = uint32(unsafe.Sizeof(sparseMmapArea{}))
	sizeofCapType        = uint32(unsafe.Sizeof(capType{}))
	sizeofIRQSet         = uint32(unsafe.Sizeof(irqSet{}))
)

func newGroupStatus() groupStatus {
	return groupStatus{Argsz: uint32(unsafe.Sizeof(groupStatus{}))}
}

func newIRQInfo(index uint32) irqInfo {
	return irqInfo{Argsz: uint32(unsafe.Sizeof(irqInfo{})), Index: index}
}

// newIRQSetEventfd asks to signal eventfd on IRQ index (DATA_EVENTFD|ACTION_TRIGGER,
// start 0, count 1). eventfd -1 unassigns.
func newIRQSetEventfd(index uint32, eventfd int32) irqSetEventfd {
	return irqSetEventfd{
		Header: irqSet{
			Argsz: uint32(unsafe.Sizeof(irqSetEventfd{})),
			Flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
			Index: index,
			Count: 1,
		},
		Eventfd: eventfd,
	}
}

// newIRQSetNone disables IRQ index as a whole (DATA_NONE|ACTION_TRIGGER, count 0).
func newIRQSetNone(index uint32) irqSet {
	return irqSet{Argsz: sizeofIRQSet, Flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, Index: index}
}

// newFeatureDMABufRevoke asks to revoke the dma-buf dmabufFD (SET|DMA_BUF_REVOKE).
func newFeatureDMABufRevoke(dmabufFD int32) featureDMABufRevoke {
	return featureDMABufRevoke{
		Header: featureHeader{
			Argsz: uint32(unsafe.Sizeof(featureDMABufRevoke{})),
			Flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE,
		},
		DMABufFD: dmabufFD,
	}
}

func newFeatureHeader(flags uint32) featureHeader {
	return featureHeader{Argsz: sizeofFeatureHeader, Flags: flags}
}

func newBindIOMMUFD(iommufd int32) bindIOMMUFD {
	return bindIOMMUFD{Argsz: uint32(unsafe.Sizeof(bindIOMMUFD{})), IOMMUFD: iommufd}
}

func newAttachIOMMUFDPT(pt uint32) attachIOMMUFDPT {
	return attachIOMMUFDPT{Argsz: uint32(unsafe.Sizeof(attachIOMMUFDPT{})), PtID: pt}
}

// dmaBufFeature is a VFIO_DEVICE_FEATURE_DMA_BUF request in one 8-byte aligned buffer:
// struct vfio_device_feature, whose data is struct vfio_device_feature_dma_buf, whose
// dma_ranges follow. hdr, data and ranges alias buf, the bytes the ioctl takes.
type dmaBufFeature struct {
	buf    []byte
	hdr    *featureHeader
	data   *featureDMABuf
	ranges []regionDMARange
}

// newDMABufFeature allocates a zeroed request with room for n ranges, its argsz set to
// the length of the whole buffer.
func newDMABufFeature(n int) dmaBufFeature {
	const fixed = sizeofFeatureHeader + sizeofFeatureDMABuf
	size := int(fixed) + n*int(sizeofRegionDMARange)
	words := make([]uint64, (size+7)/8)
	p := unsafe.Pointer(&words[0])
	f := dmaBufFeature{
		buf:  unsafe.Slice((*byte)(p), size),
		hdr:  (*featureHeader)(p),
		data: (*featureDMABuf)(unsafe.Add(p, sizeofFeatureHeader)),
	}
	if n > 0 {
		f.ranges = unsafe.Slice((*regionDMARange)(unsafe.Add(p, fixed)), n)
	}
	f.hdr.Argsz = uint32(size)
	return f
}

// infoBuffer is an 8-byte aligned buffer of n bytes for an INFO ioctl whose fixed part is
// T and whose capability chain may follow. hdr and buf alias the same memory.
type infoBuffer[T any] struct {
	words []uint64
	hdr   *T
	buf   []byte
}

// newInfoBuffer allocates an aligned, zeroed infoBuffer of max(n, sizeof T) bytes.
func newInfoBuffer[T any](n uint32) infoBuffer[T] {
	if min := uint32(unsafe.Sizeof(*new(T))); n < min {
		n = min
	}
	words := make([]uint64, (n+7)/8)
	p := unsafe.Pointer(&words[0])
	return infoBuffer[T]{words: words, hdr: (*T)(p), buf: unsafe.Slice((*byte)(p), n)}
}
