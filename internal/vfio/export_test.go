package vfio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

func TestValidateExport(t *testing.T) {
	const page, mib = 0x1000, 1 << 20
	many := make([]DMARange, MaxDMARanges+1)
	for i := range many {
		many[i] = DMARange{0, page}
	}
	tests := []struct {
		name    string
		bar     int
		size    uint64
		io      bool
		ranges  []DMARange
		flags   int
		wantErr string // "" = valid
	}{
		{"whole bar", 0, mib, false, []DMARange{{0, mib}}, unix.O_RDWR, ""},
		{"two ranges", 2, mib, false, []DMARange{{0, page}, {2 * page, page}}, unix.O_RDONLY | unix.O_CLOEXEC, ""},
		{"overlapping ranges are fine", 0, mib, false, []DMARange{{0, 2 * page}, {page, page}}, unix.O_RDWR | unix.O_NONBLOCK, ""},
		{"last page", 5, mib, false, []DMARange{{mib - page, page}}, 0, ""},
		{"bar -1", -1, mib, false, []DMARange{{0, page}}, 0, "bar -1: only bars 0 to 5"},
		{"rom index", 6, mib, false, []DMARange{{0, page}}, 0, "bar 6: only bars 0 to 5"},
		{"config index", 7, 256, false, []DMARange{{0, page}}, 0, "bar 7: only bars 0 to 5"},
		{"unimplemented bar", 1, 0, false, []DMARange{{0, page}}, 0, "bar 1 is not implemented"},
		{"io bar", 1, 0x100, true, []DMARange{{0, page}}, 0, "bar 1 is an I/O-port bar"},
		{"no ranges", 0, mib, false, nil, 0, "bar 0: no ranges"},
		{"too many ranges", 0, mib, false, many, 0, "4097 ranges, at most 4096"},
		{"empty range", 0, mib, false, []DMARange{{0, page}, {page, 0}}, 0, "bar 0 range 1 [0x1000,+0x0): empty"},
		{"unaligned offset", 0, mib, false, []DMARange{{0x800, page}}, 0, "bar 0 range 0 [0x800,+0x1000): offset and length must be multiples"},
		{"unaligned length", 0, mib, false, []DMARange{{0, 0x1800}}, 0, "multiples of the page size 0x1000"},
		{"beyond bar", 0, mib, false, []DMARange{{mib - page, 2 * page}}, 0, "bar 0 range 0 [0xff000,+0x2000): ends beyond the bar (size 0x100000)"},
		{"offset beyond bar", 0, mib, false, []DMARange{{mib, page}}, 0, "ends beyond the bar"},
		{"small bar", 0, 0x100, false, []DMARange{{0, page}}, 0, "ends beyond the bar (size 0x100)"},
		{"offset+length overflows", 0, ^uint64(0), false, []DMARange{{^uint64(0) &^ (page - 1), 2 * page}}, 0, "ends beyond the bar"},
		{"total overflows", 0, 1 << 63, false, []DMARange{{0, 1 << 62}, {0, 1 << 62}}, 0, "total length of the ranges overflows"},
		{"bad open flags", 0, mib, false, []DMARange{{0, page}}, unix.O_CREAT, "open flags 0x40"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validateExport(tt.bar, tt.size, tt.io, tt.ranges, tt.flags, page)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("validateExport = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("validateExport = nil, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("validateExport = %q, want it to contain %q", err, tt.wantErr)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error %v is not ErrInvalidArgument", err)
			}
		})
	}
}

// The byte layout of docs/kernel.md §3.1, at offsets written out by hand: a check of the
// mirrored structs encode writes through.
func TestEncodeDMABufRequest(t *testing.T) {
	req := dmaBufRequest{
		Region:    2,
		OpenFlags: unix.O_RDWR | unix.O_CLOEXEC,
		Ranges:    []DMARange{{0, 0x1000}, {0x2000, 0x3000}},
	}
	buf, err := req.encode()
	if err != nil {
		t.Fatal(err)
	}
	if len(buf) != 24+16*2 {
		t.Fatalf("len = %d, want 56", len(buf))
	}
	u32 := func(o int) uint32 { return binary.NativeEndian.Uint32(buf[o:]) }
	u64 := func(o int) uint64 { return binary.NativeEndian.Uint64(buf[o:]) }
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"argsz", uint64(u32(0)), 56},
		{"flags", uint64(u32(4)), 0x1000b},
		{"region_index", uint64(u32(8)), 2},
		{"open_flags", uint64(u32(12)), unix.O_RDWR | unix.O_CLOEXEC},
		{"dma_buf.flags", uint64(u32(16)), 0},
		{"nr_ranges", uint64(u32(20)), 2},
		{"range[0].offset", u64(24), 0},
		{"range[0].length", u64(32), 0x1000},
		{"range[1].offset", u64(40), 0x2000},
		{"range[1].length", u64(48), 0x3000},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func TestEncodeRawRequest(t *testing.T) {
	// nr_ranges larger than the ranges given: the buffer still has room for all of them,
	// so the kernel never reads past it.
	nr := uint32(3)
	buf, err := dmaBufRequest{FeatureFlags: 0x7000b, Flags: 1, NrRanges: &nr, Ranges: []DMARange{{0, 0x1000}}}.encode()
	if err != nil {
		t.Fatal(err)
	}
	if len(buf) != 24+16*3 || binary.NativeEndian.Uint32(buf[0:]) != uint32(len(buf)) {
		t.Errorf("len %d argsz %d, want 72", len(buf), binary.NativeEndian.Uint32(buf[0:]))
	}
	if got := binary.NativeEndian.Uint32(buf[4:]); got != 0x7000b {
		t.Errorf("feature flags = %#x", got)
	}
	if got := binary.NativeEndian.Uint32(buf[16:]); got != 1 {
		t.Errorf("flags = %d", got)
	}
	zero := uint32(0)
	buf, err = dmaBufRequest{NrRanges: &zero, Ranges: []DMARange{{0, 0x1000}}}.encode()
	if err != nil || len(buf) != 40 || binary.NativeEndian.Uint32(buf[20:]) != 0 {
		t.Errorf("nr_ranges 0 with one range: len %d err %v", len(buf), err)
	}
	huge := uint32(maxRawRanges + 1)
	if _, err := (dmaBufRequest{NrRanges: &huge}).encode(); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("huge nr_ranges: %v", err)
	}
}

// encodeAtOffsets is the request of docs/kernel.md §3.1 written at hand-counted offsets,
// as encode once did, kept as the reference the struct-based encode must match.
func encodeAtOffsets(r dmaBufRequest) []byte {
	nr, room := uint32(len(r.Ranges)), len(r.Ranges)
	if r.NrRanges != nil {
		nr, room = *r.NrRanges, max(room, int(*r.NrRanges))
	}
	flags := r.FeatureFlags
	if flags == 0 {
		flags = 0x1000b // GET | DMA_BUF
	}
	buf := make([]byte, 24+16*room)
	ne := binary.NativeEndian
	ne.PutUint32(buf[0:], uint32(len(buf)))
	ne.PutUint32(buf[4:], flags)
	ne.PutUint32(buf[8:], r.Region)
	ne.PutUint32(buf[12:], r.OpenFlags)
	ne.PutUint32(buf[16:], r.Flags)
	ne.PutUint32(buf[20:], nr)
	for i, rg := range r.Ranges {
		ne.PutUint64(buf[24+16*i:], rg.Offset)
		ne.PutUint64(buf[32+16*i:], rg.Length)
	}
	return buf
}

// FuzzEncodeDMABufRequest checks that encode lays out any request byte for byte as
// encodeAtOffsets does. ranges is cut into 16-byte (offset, length) pairs; nr >= 0 sets
// NrRanges.
func FuzzEncodeDMABufRequest(f *testing.F) {
	f.Add(uint32(0), uint32(2), uint32(unix.O_RDWR|unix.O_CLOEXEC), uint32(0), int32(-1), []byte("\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00"))
	f.Add(uint32(0x7000b), uint32(5), uint32(0), uint32(1), int32(3), []byte("0123456789abcdef"))
	f.Add(uint32(0), uint32(0), uint32(0), uint32(0), int32(0), []byte{})
	f.Fuzz(func(t *testing.T, featureFlags, region, openFlags, flags uint32, nr int32, ranges []byte) {
		req := dmaBufRequest{FeatureFlags: featureFlags, Region: region, OpenFlags: openFlags, Flags: flags}
		for ; len(ranges) >= 16; ranges = ranges[16:] {
			req.Ranges = append(req.Ranges, DMARange{
				Offset: binary.NativeEndian.Uint64(ranges),
				Length: binary.NativeEndian.Uint64(ranges[8:]),
			})
		}
		if nr >= 0 {
			n := uint32(nr) % (2 * maxRawRanges)
			req.NrRanges = &n
		}
		got, err := req.encode()
		if max(len(req.Ranges), int(nrOf(req))) > maxRawRanges {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("encode of %d ranges: err %v, want ErrInvalidArgument", nrOf(req), err)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if want := encodeAtOffsets(req); !bytes.Equal(got, want) {
			t.Fatalf("encode(%+v):\n got % x\nwant % x", req, got, want)
		}
	})
}

func nrOf(r dmaBufRequest) uint32 {
	if r.NrRanges != nil {
		return *r.NrRanges
	}
	return uint32(len(r.Ranges))
}
