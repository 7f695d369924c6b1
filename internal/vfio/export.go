package vfio

import (
	"fmt"
	"math/bits"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

// DMARange is a slice of a BAR to export: Length bytes from byte Offset of the BAR
// (struct vfio_region_dma_range). Both must be multiples of the page size.
type DMARange struct {
	Offset, Length uint64
}

// MaxDMARanges is the most ranges [Device.ExportDMABuf] accepts in one dma-buf. The kernel
// takes up to about 262144 (a 4 MiB copy); iommufd imports only single-range dma-bufs.
const MaxDMARanges = 4096

// exportOpenFlags are the open(2) flags that mean something for a dma-buf fd: the access
// mode and O_NONBLOCK are kept in f_flags, O_CLOEXEC applies to the new descriptor. The
// kernel ignores every other bit; [Device.ExportDMABuf] rejects them.
const exportOpenFlags = unix.O_ACCMODE | unix.O_NONBLOCK | unix.O_CLOEXEC

// validateExport checks an export request the way the kernel will (docs/kernel.md §3.2),
// so that mistakes get an error naming the bar and range instead of a bare EINVAL.
// barSize is the BAR's region size, io whether it is an I/O-port BAR, page the page size.
func validateExport(bar int, barSize uint64, io bool, ranges []DMARange, openFlags int, page uint64) error {
	inval := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument)
	}
	if bar < VFIO_PCI_BAR0_REGION_INDEX || bar > VFIO_PCI_BAR5_REGION_INDEX {
		return inval("bar %d: only bars 0 to 5 can be exported", bar)
	}
	if barSize == 0 {
		return inval("bar %d is not implemented (size 0)", bar)
	}
	if io {
		return inval("bar %d is an I/O-port bar; only memory bars can be exported", bar)
	}
	if len(ranges) == 0 {
		return inval("bar %d: no ranges", bar)
	}
	if len(ranges) > MaxDMARanges {
		return inval("bar %d: %d ranges, at most %d allowed", bar, len(ranges), MaxDMARanges)
	}
	if openFlags&^exportOpenFlags != 0 {
		return inval("open flags %#x: only the access mode, O_NONBLOCK and O_CLOEXEC are allowed", openFlags)
	}
	var total uint64
	for i, r := range ranges {
		switch {
		case r.Length == 0:
			return inval("bar %d range %d [%#x,+0x0): empty", bar, i, r.Offset)
		case r.Offset%page != 0 || r.Length%page != 0:
			return inval("bar %d range %d [%#x,+%#x): offset and length must be multiples of the page size %#x", bar, i, r.Offset, r.Length, page)
		}
		end, carry := bits.Add64(r.Offset, r.Length, 0)
		if carry != 0 || end > barSize {
			return inval("bar %d range %d [%#x,+%#x): ends beyond the bar (size %#x)", bar, i, r.Offset, r.Length, barSize)
		}
		var c uint64
		total, c = bits.Add64(total, r.Length, 0)
		if c != 0 || total >= 1<<63 {
			return inval("bar %d: total length of the ranges overflows", bar)
		}
	}
	return nil
}

// dmaBufRequest is the raw content of a VFIO_DEVICE_FEATURE_DMA_BUF request. The normal
// path fills it from validated arguments; tests of the kernel's own checks set fields
// freely.
type dmaBufRequest struct {
	FeatureFlags uint32 // vfio_device_feature.flags; 0 means GET|DMA_BUF
	Region       uint32
	OpenFlags    uint32
	Flags        uint32 // must be 0 for the kernel to accept it
	// NrRanges overrides the nr_ranges field when non-nil; the buffer always has room for
	// max(*NrRanges, len(Ranges)) ranges (zeros past Ranges), so the kernel never reads
	// past it whatever nr_ranges says.
	NrRanges *uint32
	Ranges   []DMARange
}

// maxRawRanges bounds the buffer a dmaBufRequest may make.
const maxRawRanges = 1 << 16

// encode lays the request out as one byte slice of 8 + 16 + 16*n bytes (docs/kernel.md
// §3.1) through the mirrored structs: vfio_device_feature {argsz, flags} whose data is
// vfio_device_feature_dma_buf {region_index, open_flags, flags, nr_ranges}, then the
// ranges. argsz is the slice's length, computed here rather than trusted from anywhere.
func (r dmaBufRequest) encode() ([]byte, error) {
	nr := uint32(len(r.Ranges))
	room := len(r.Ranges)
	if r.NrRanges != nil {
		nr = *r.NrRanges
		room = max(room, int(nr))
	}
	if room > maxRawRanges {
		return nil, fmt.Errorf("%d ranges: %w", room, errdefs.ErrInvalidArgument)
	}
	flags := r.FeatureFlags
	if flags == 0 {
		flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF
	}
	req := newDMABufFeature(room)
	req.hdr.Flags = flags
	*req.data = featureDMABuf{RegionIndex: r.Region, OpenFlags: r.OpenFlags, Flags: r.Flags, NrRanges: nr}
	for i, rg := range r.Ranges {
		req.ranges[i] = regionDMARange{Offset: rg.Offset, Length: rg.Length}
	}
	return req.buf, nil
}
