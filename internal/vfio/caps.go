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
// cap_offset; 0 means no chain. Each header is read through infoCapHeader. Every offset
// is bounds-checked: a capability may not overlap the fixed struct or run past buf, and
// each next offset must lie beyond the current header, so the walk always terminates. It
// never panics.
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
		var h infoCapHeader
		if err := readMirror(buf[off:], &h); err != nil {
			return caps, fmt.Errorf("capability header at offset %d: %w", off, err)
		}
		next := uint64(h.Next)
		end := n
		if next != 0 {
			if next < off+uint64(sizeofCapHeader) {
				return caps, fmt.Errorf("capability %d at offset %d links back to offset %d", h.ID, off, next)
			}
			if next > n {
				return caps, fmt.Errorf("capability %d at offset %d links to offset %d beyond the %d-byte buffer", h.ID, off, next, n)
			}
			end = next
		}
		caps = append(caps, Cap{
			ID:      h.ID,
			Version: h.Version,
			Offset:  uint32(off),
			Data:    buf[off+uint64(sizeofCapHeader) : end : end],
		})
		off = next
	}
	return caps, nil
}

// readMirror reads *v, a mirrored kernel struct, from the start of b: each field from its
// offset in the C layout, in the host's byte order. encoding/binary lays a struct out
// without padding, which is the C layout for the mirrors read here (TestCapMirrorsPacked
// checks; TestUAPI checks their offsets against the kernel's). b need not be aligned. It
// fails when b is shorter than the struct.
func readMirror[T any](b []byte, v *T) error {
	if _, err := binary.Decode(b, binary.NativeEndian, v); err != nil {
		return fmt.Errorf("%d bytes for a %d-byte %T: %w", len(b), binary.Size(v), *v, err)
	}
	return nil
}

// readCap reads capability c into *v, the mirror of a capability struct whose first field
// is its infoCapHeader: the header from c.ID and c.Version (Next is left 0), the fields
// after it from c.Data at their offsets in the mirror. It fails when c.Data is shorter
// than the mirror's body.
func readCap[T any](c Cap, v *T) error {
	size := binary.Size(v)
	if body := size - int(sizeofCapHeader); body < 0 || len(c.Data) < body {
		return fmt.Errorf("%d-byte body, want at least %d", len(c.Data), body)
	}
	raw := make([]byte, size)
	if _, err := binary.Encode(raw, binary.NativeEndian, infoCapHeader{ID: c.ID, Version: c.Version}); err != nil {
		return err
	}
	copy(raw[sizeofCapHeader:], c.Data)
	return readMirror(raw, v)
}

// sparseAreas decodes a VFIO_REGION_INFO_CAP_SPARSE_MMAP capability through capSparseMmap
// (nr_areas, reserved) and the nr_areas sparseMmapArea entries that follow it.
func sparseAreas(c Cap) ([]SparseArea, error) {
	var s capSparseMmap
	if err := readCap(c, &s); err != nil {
		return nil, fmt.Errorf("sparse mmap capability at offset %d: %w", c.Offset, err)
	}
	body := uint64(sizeofSparseMmap - sizeofCapHeader)
	nr := uint64(s.NrAreas)
	if need := body + nr*uint64(sizeofSparseArea); need > uint64(len(c.Data)) {
		return nil, fmt.Errorf("sparse mmap capability at offset %d: %d areas need %d bytes, have %d", c.Offset, nr, need, len(c.Data))
	}
	areas := make([]SparseArea, nr)
	if nr == 0 {
		return areas, nil
	}
	raw := make([]sparseMmapArea, nr)
	if err := readMirror(c.Data[body:], &raw); err != nil {
		return nil, fmt.Errorf("sparse mmap capability at offset %d: %w", c.Offset, err)
	}
	for i, a := range raw {
		areas[i] = SparseArea{Offset: a.Offset, Size: a.Size}
	}
	return areas, nil
}

// regionType decodes a VFIO_REGION_INFO_CAP_TYPE capability through capType.
func regionType(c Cap) (RegionType, error) {
	var ct capType
	if err := readCap(c, &ct); err != nil {
		return RegionType{}, fmt.Errorf("type capability at offset %d: %w", c.Offset, err)
	}
	return RegionType{Type: ct.Type, Subtype: ct.Subtype}, nil
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
