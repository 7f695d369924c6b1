package broker

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// FuzzValidateRanges feeds arbitrary BARs and ranges to the request validator: it must
// never panic, must classify every rejection, and whatever it accepts must really be
// page-aligned, non-empty, inside the BAR and free of overlaps.
func FuzzValidateRanges(f *testing.F) {
	enc := func(rs ...uint64) []byte {
		b := make([]byte, 8*len(rs))
		for i, v := range rs {
			binary.LittleEndian.PutUint64(b[8*i:], v)
		}
		return b
	}
	f.Add(0, uint64(1<<20), true, enc(0, 4096))
	f.Add(0, uint64(1<<20), true, enc(0, 8192, 4096, 4096))
	f.Add(2, uint64(256), false, enc(0, 4096))
	f.Add(5, uint64(1<<20), true, enc(1<<20-4096, 8192))
	f.Add(4, uint64(1<<40), true, enc(^uint64(0)-4095, 8192))
	f.Add(6, uint64(4096), true, enc(0, 4096))
	f.Fuzz(func(t *testing.T, bar int, size uint64, mem bool, raw []byte) {
		var ranges []Range
		for len(raw) >= 16 && len(ranges) < 20 {
			ranges = append(ranges, Range{binary.LittleEndian.Uint64(raw), binary.LittleEndian.Uint64(raw[8:])})
			raw = raw[16:]
		}
		info := DeviceInfo{BDF: "0000:00:03.0", BARs: []BAR{{Index: bar, Size: size, Mem: mem}}}
		err := validateRanges(info, DeviceConfig{}, bar, ranges, 4096, 16)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) && !errors.Is(err, errdefs.ErrPermissionDenied) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if bar < 0 || bar > 5 || !mem || len(ranges) == 0 || len(ranges) > 16 {
			t.Fatalf("accepted bar %d mem %v with %d ranges", bar, mem, len(ranges))
		}
		for i, r := range ranges {
			if r.Length == 0 || r.Offset%4096 != 0 || r.Length%4096 != 0 || r.Offset > size || r.Length > size-r.Offset {
				t.Fatalf("accepted bad range %d %v in a bar of %#x", i, r, size)
			}
			for j, o := range ranges[:i] {
				if overlaps([]Range{r}, []Range{o}) {
					t.Fatalf("accepted overlapping ranges %d %v and %d %v", j, o, i, r)
				}
			}
		}
	})
}
