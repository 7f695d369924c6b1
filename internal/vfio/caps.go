package vfio

import (
	"encoding/binary"
	"fmt"
)

// Cap is one entry of a VFIO info capability chain (struct vfio_info_cap_header and the
// bytes that follow it).
type Cap struct {
	ID      uint16
	Version uint16
	// Offset is where the capability header starts, from the start of the info struct.
	Offset uint32
	// Data is the capability body after the 8-byte header: up to the next capability, or
	// to the end of the buffer for the last one. It aliases the ioctl buffer.
	Data []byte
}

// SparseArea is one mmap-able area of a region (struct vfio_region_sparse_mmap_area),
// relative to the start of the region.
type SparseArea struct {
	Offset, Size uint64
}

// parseCaps walks the capability chain in buf, the whole INFO buffer as the kernel filled
// it (fixed struct of fixed bytes, then capabilities). first is the info struct's
// cap_offset; 0 means no chain. Every offset is bounds-checked: a capability may not
// overlap the fixed struct or run past buf, and each next offset must lie beyond the
// current header, so the walk always terminates. It never panics.
func parseCaps(buf []byte, first, fixed uint32) ([]Cap, error) {
	if first == 0 {
		return nil, nil
	}
	n := uint64(len(buf))
	var caps []Cap
	for off := uint64(first); off != 0; {
		if off < uint64(fixed) {
			return caps, fmt.Errorf("capability at offset %d overlaps the %d-byte info struct", off, fixed)
		}
		if off+uint64(sizeofCapHeader) > n {
			return caps, fmt.Errorf("capability header at offset %d runs past the %d-byte buffer", off, n)
		}
		h := buf[off:]
		id := binary.NativeEndian.Uint16(h[0:2])
		ver := binary.NativeEndian.Uint16(h[2:4])
		next := uint64(binary.NativeEndian.Uint32(h[4:8]))
		end := n
		if next != 0 {
			if next < off+uint64(sizeofCapHeader) {
				return caps, fmt.Errorf("capability %d at offset %d links back to offset %d", id, off, next)
			}
			if next > n {
				return caps, fmt.Errorf("capability %d at offset %d links to offset %d beyond the %d-byte buffer", id, off, next, n)
			}
			end = next
		}
		caps = append(caps, Cap{
			ID:      id,
			Version: ver,
			Offset:  uint32(off),
			Data:    buf[off+uint64(sizeofCapHeader) : end : end],
		})
		off = next
	}
	return caps, nil
}

// sparseAreas decodes a VFIO_REGION_INFO_CAP_SPARSE_MMAP body: nr_areas, reserved, then
// nr_areas {offset, size} pairs.
func sparseAreas(c Cap) ([]SparseArea, error) {
	body := sizeofSparseMmap - sizeofCapHeader // nr_areas + reserved
	if uint64(len(c.Data)) < uint64(body) {
		return nil, fmt.Errorf("sparse mmap capability at offset %d: %d-byte body, want at least %d", c.Offset, len(c.Data), body)
	}
	nr := uint64(binary.NativeEndian.Uint32(c.Data[0:4]))
	if need := uint64(body) + nr*uint64(sizeofSparseArea); need > uint64(len(c.Data)) {
		return nil, fmt.Errorf("sparse mmap capability at offset %d: %d areas need %d bytes, have %d", c.Offset, nr, need, len(c.Data))
	}
	areas := make([]SparseArea, nr)
	for i := range areas {
		a := c.Data[uint64(body)+uint64(i)*uint64(sizeofSparseArea):]
		areas[i] = SparseArea{
			Offset: binary.NativeEndian.Uint64(a[0:8]),
			Size:   binary.NativeEndian.Uint64(a[8:16]),
		}
	}
	return areas, nil
}

// regionType decodes a VFIO_REGION_INFO_CAP_TYPE body: type, subtype.
func regionType(c Cap) (RegionType, error) {
	body := sizeofCapType - sizeofCapHeader
	if uint64(len(c.Data)) < uint64(body) {
		return RegionType{}, fmt.Errorf("type capability at offset %d: %d-byte body, want %d", c.Offset, len(c.Data), body)
	}
	return RegionType{
		Type:    binary.NativeEndian.Uint32(c.Data[0:4]),
		Subtype: binary.NativeEndian.Uint32(c.Data[4:8]),
	}, nil
}

// decodeRegionCaps fills the capability-derived fields of r from caps.
func decodeRegionCaps(r *RegionInfo, caps []Cap) error {
	r.Caps = caps
	for _, c := range caps {
		var err error
		switch c.ID {
		case VFIO_REGION_INFO_CAP_SPARSE_MMAP:
			r.Sparse, err = sparseAreas(c)
			if err == nil && r.Sparse == nil {
				r.Sparse = []SparseArea{} // present but empty: nothing may be mmapped
			}
		case VFIO_REGION_INFO_CAP_TYPE:
			var t RegionType
			if t, err = regionType(c); err == nil {
				r.Type = &t
			}
		case VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
			r.MSIXMappable = true
		}
		if err != nil {
			return err
		}
	}
	return nil
}
