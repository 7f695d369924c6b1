package vfio

import (
	"encoding/binary"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// chain builds an INFO buffer: a fixed part of fixed bytes, then the capabilities laid out
// back to back (8-byte aligned, as vfio_info_cap_add does), linked in order.
type capSpec struct {
	id, version uint16
	body        []byte
}

func buildChain(fixed uint32, caps ...capSpec) (buf []byte, first uint32) {
	buf = make([]byte, fixed)
	prev := -1
	for _, c := range caps {
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
		off := len(buf)
		if prev >= 0 {
			binary.NativeEndian.PutUint32(buf[prev+4:], uint32(off))
		} else {
			first = uint32(off)
		}
		h := make([]byte, 8)
		binary.NativeEndian.PutUint16(h[0:], c.id)
		binary.NativeEndian.PutUint16(h[2:], c.version)
		buf = append(buf, h...)
		buf = append(buf, c.body...)
		prev = off
	}
	return buf, first
}

func sparseBody(areas ...SparseArea) []byte {
	b := make([]byte, 8+16*len(areas))
	binary.NativeEndian.PutUint32(b[0:], uint32(len(areas)))
	for i, a := range areas {
		binary.NativeEndian.PutUint64(b[8+16*i:], a.Offset)
		binary.NativeEndian.PutUint64(b[16+16*i:], a.Size)
	}
	return b
}

func typeBody(typ, sub uint32) []byte {
	b := make([]byte, 8)
	binary.NativeEndian.PutUint32(b[0:], typ)
	binary.NativeEndian.PutUint32(b[4:], sub)
	return b
}

func TestParseRegionCaps(t *testing.T) {
	areas := []SparseArea{{0, 0x1000}, {0x3000, 0x2000}}
	buf, first := buildChain(32,
		capSpec{VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, sparseBody(areas...)},
		capSpec{VFIO_REGION_INFO_CAP_TYPE, 1, typeBody(1<<31|0x10de, 1)},
		capSpec{VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, nil},
		capSpec{0x77, 3, []byte{1, 2, 3, 4}},
	)
	caps, err := parseCaps(buf, first, 32)
	if err != nil {
		t.Fatal(err)
	}
	if len(caps) != 4 {
		t.Fatalf("got %d caps, want 4: %+v", len(caps), caps)
	}
	if caps[0].Offset != 32 || caps[3].ID != 0x77 || caps[3].Version != 3 {
		t.Errorf("caps = %+v", caps)
	}
	if diff := cmp.Diff([]byte{1, 2, 3, 4}, caps[3].Data); diff != "" {
		t.Errorf("last cap data (-want +got):\n%s", diff)
	}
	var r RegionInfo
	if err := decodeRegionCaps(&r, caps); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(areas, r.Sparse); diff != "" {
		t.Errorf("sparse areas (-want +got):\n%s", diff)
	}
	if r.Type == nil || *r.Type != (RegionType{1<<31 | 0x10de, 1}) {
		t.Errorf("type = %+v", r.Type)
	}
	if !r.MSIXMappable {
		t.Error("MSIXMappable not set")
	}
}

func TestParseCapsNone(t *testing.T) {
	caps, err := parseCaps(make([]byte, 32), 0, 32)
	if err != nil || caps != nil {
		t.Errorf("parseCaps(first=0) = %v, %v; want nil, nil", caps, err)
	}
}

func TestParseCapsRejects(t *testing.T) {
	put32 := func(b []byte, off int, v uint32) []byte {
		binary.NativeEndian.PutUint32(b[off:], v)
		return b
	}
	tests := []struct {
		name  string
		buf   []byte
		first uint32
	}{
		{"first inside the fixed struct", make([]byte, 64), 8},
		{"header past the end", make([]byte, 36), 32},
		{"first far past the end", make([]byte, 64), 0xffffffff},
		{"self loop", put32(make([]byte, 48), 36, 32), 32},
		{"back link", put32(put32(make([]byte, 64), 36, 40), 44, 32), 32},
		{"next inside the current header", put32(make([]byte, 64), 36, 36), 32},
		{"next past the end", put32(make([]byte, 48), 36, 1000), 32},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := parseCaps(tt.buf, tt.first, 32); err == nil {
				t.Error("parseCaps accepted a malformed chain")
			}
		})
	}
}

func TestSparseRejectsShortBody(t *testing.T) {
	body := sparseBody(SparseArea{0, 0x1000}, SparseArea{0x1000, 0x1000})
	binary.NativeEndian.PutUint32(body, 3) // claims 3 areas, has 2
	buf, first := buildChain(32, capSpec{VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, body})
	caps, err := parseCaps(buf, first, 32)
	if err != nil {
		t.Fatal(err)
	}
	var r RegionInfo
	if err := decodeRegionCaps(&r, caps); err == nil {
		t.Errorf("decoded %d areas from a body with room for 2 of 3", len(r.Sparse))
	}
	binary.NativeEndian.PutUint32(body, 0xffffffff) // nr*16 must not overflow
	buf, first = buildChain(32, capSpec{VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, body})
	caps, _ = parseCaps(buf, first, 32)
	if err := decodeRegionCaps(&r, caps); err == nil {
		t.Error("accepted nr_areas 0xffffffff")
	}
	buf, first = buildChain(32, capSpec{VFIO_REGION_INFO_CAP_TYPE, 1, []byte{1, 2, 3}})
	caps, _ = parseCaps(buf, first, 32)
	if err := decodeRegionCaps(&r, caps); err == nil {
		t.Error("accepted a 3-byte type capability body")
	}
}

// parseCaps and the capability decoders read through the mirrored structs with
// encoding/binary, which packs fields one after another: that is the C layout only while a
// mirror has no implicit padding, so binary's size of each must be its Go size (which
// TestUAPI compares with the kernel's, field offsets included).
func TestCapMirrorsPacked(t *testing.T) {
	for _, tt := range []struct {
		name string
		v    any
		size uint32
	}{
		{"infoCapHeader", infoCapHeader{}, sizeofCapHeader},
		{"capSparseMmap", capSparseMmap{}, sizeofSparseMmap},
		{"sparseMmapArea", sparseMmapArea{}, sizeofSparseArea},
		{"capType", capType{}, sizeofCapType},
	} {
		if got := binary.Size(tt.v); got != int(tt.size) {
			t.Errorf("encoding/binary lays out %s in %d bytes, the struct has %d", tt.name, got, tt.size)
		}
	}
}

// A chain at an odd address decodes the same: the decoders copy, they do not cast.
func TestParseCapsUnaligned(t *testing.T) {
	areas := []SparseArea{{0x1000, 0x1000}}
	buf, first := buildChain(32,
		capSpec{VFIO_REGION_INFO_CAP_TYPE, 1, typeBody(3, 4)},
		capSpec{VFIO_REGION_INFO_CAP_SPARSE_MMAP, 2, sparseBody(areas...)},
	)
	odd := append([]byte{0xff}, buf...)[1:]
	caps, err := parseCaps(odd, first, 32)
	if err != nil {
		t.Fatal(err)
	}
	if len(caps) != 2 || caps[1].ID != VFIO_REGION_INFO_CAP_SPARSE_MMAP || caps[1].Version != 2 {
		t.Fatalf("caps = %+v", caps)
	}
	var r RegionInfo
	if err := decodeRegionCaps(&r, caps); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(areas, r.Sparse); diff != "" {
		t.Errorf("sparse areas (-want +got):\n%s", diff)
	}
	if r.Type == nil || *r.Type != (RegionType{3, 4}) {
		t.Errorf("type = %+v", r.Type)
	}
}

// readCap gives the mirror the capability's header as well as its body.
func TestReadCap(t *testing.T) {
	var ct capType
	if err := readCap(Cap{ID: VFIO_REGION_INFO_CAP_TYPE, Version: 1, Data: typeBody(7, 8)}, &ct); err != nil {
		t.Fatal(err)
	}
	if ct.Header.ID != VFIO_REGION_INFO_CAP_TYPE || ct.Header.Version != 1 || ct.Header.Next != 0 || ct.Type != 7 || ct.Subtype != 8 {
		t.Errorf("readCap = %+v", ct)
	}
	if err := readCap(Cap{Data: make([]byte, 7)}, &ct); err == nil {
		t.Error("readCap read a capType from a 7-byte body")
	}
}

func FuzzParseCaps(f *testing.F) {
	seed, first := buildChain(32,
		capSpec{VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, sparseBody(SparseArea{0, 0x1000}, SparseArea{0x2000, 0x1000})},
		capSpec{VFIO_REGION_INFO_CAP_TYPE, 1, typeBody(1, 2)},
		capSpec{VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, nil},
	)
	f.Add(seed, first, uint32(32))
	msix, first := buildChain(32, capSpec{VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, nil})
	f.Add(msix, first, uint32(32))
	dev, first := buildChain(24, capSpec{5, 1, make([]byte, 8)}) // PCI atomic completion
	f.Add(dev, first, uint32(24))
	f.Add(make([]byte, 32), uint32(0), uint32(32))
	f.Add([]byte{}, uint32(32), uint32(32))
	f.Fuzz(func(t *testing.T, buf []byte, first, fixed uint32) {
		caps, err := parseCaps(buf, first, fixed)
		prev := uint64(0)
		for i, c := range caps {
			off := uint64(c.Offset)
			if off < uint64(fixed) || off+8+uint64(len(c.Data)) > uint64(len(buf)) {
				t.Fatalf("cap %d at %d with %d data bytes escapes buffer of %d (fixed %d)", i, off, len(c.Data), len(buf), fixed)
			}
			if i > 0 && off < prev+8 {
				t.Fatalf("cap %d at %d does not follow the previous at %d", i, off, prev)
			}
			prev = off
		}
		if first == 0 && (caps != nil || err != nil) {
			t.Fatalf("first=0 gave %v, %v", caps, err)
		}
		var r RegionInfo
		if decodeRegionCaps(&r, caps) == nil {
			var last *Cap // the sparse capability decoded last wins
			for i := range caps {
				if caps[i].ID == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
					last = &caps[i]
				}
			}
			if last != nil && uint64(len(r.Sparse))*16+8 > uint64(len(last.Data)) {
				t.Fatalf("%d sparse areas decoded from %d bytes", len(r.Sparse), len(last.Data))
			}
		}
	})
}
