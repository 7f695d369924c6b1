package pci

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// An ivshmem-plain device in QEMU: BAR0 256 B registers, BAR2 64 MiB 64-bit prefetchable,
// and an I/O BAR in slot 4 for good measure; 13 lines as the kernel prints them.
const ivshmemResource = `0x00000000fe800000 0x00000000fe8000ff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000fe0000000 0x0000000fe3ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x000000000000c000 0x000000000000c01f 0x0000000000040101
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
`

func TestParseResource(t *testing.T) {
	got, err := parseResource(ivshmemResource)
	if err != nil {
		t.Fatal(err)
	}
	want := [6]BAR{
		{Index: 0, Start: 0xfe800000, Size: 0x100, Flags: 0x40200, Mem: true},
		{Index: 1},
		{Index: 2, Start: 0xfe0000000, Size: 64 << 20, Flags: 0x14220c, Mem: true, Prefetch: true, Is64: true},
		{Index: 3},
		{Index: 4, Start: 0xc000, Size: 0x20, Flags: 0x40101, IO: true},
		{Index: 5},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("parseResource (-want +got):\n%s", d)
	}
}

func TestParseResourceShortAndEmpty(t *testing.T) {
	got, err := parseResource("")
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		if b != (BAR{Index: i}) {
			t.Errorf("empty file: bar %d = %+v", i, b)
		}
	}
	got, err = parseResource("0x1000 0x1fff 0x200") // one line, no newline
	if err != nil {
		t.Fatal(err)
	}
	if got[0].Size != 0x1000 || !got[0].Mem {
		t.Fatalf("bar 0 = %+v", got[0])
	}
}

func TestParseResourceRejects(t *testing.T) {
	for _, in := range []string{
		"0x1000 0x1fff\n",                        // two fields
		"0x1000 0x1fff 0x200 0x0\n",              // four fields
		"1000 1fff 200\n",                        // no 0x
		"0x1000 0x0fff 0x200\n",                  // end < start
		"0x0 0xffffffffffffffff 0x200\n",         // size overflows
		"0x10000000000000000 0x0 0x0\n",          // 17 digits
		"0x1000 0x1fff 0x200\n\n",                // empty second line
		"0x1000 0x1fff 0x-20\n",                  // sign
		strings.Repeat("0x0 0x0 0x0\n", 5) + "x", // garbage in line 6
	} {
		if _, err := parseResource(in); err == nil {
			t.Errorf("parseResource(%q) succeeded", in)
		}
	}
	// Garbage after the six BAR lines is ignored.
	if _, err := parseResource(strings.Repeat("0x0 0x0 0x0\n", 6) + "garbage\n"); err != nil {
		t.Errorf("garbage after line 6: %v", err)
	}
}

func FuzzParseResource(f *testing.F) {
	f.Add(ivshmemResource)
	f.Add("0x1000 0x1fff 0x200")
	f.Add("0x0 0xffffffffffffffff 0x200\n")
	f.Add("0x00000000fe800000 0x00000000fe8000ff 0x0000000000040200\n\t \n")
	f.Fuzz(func(t *testing.T, s string) {
		bars, err := parseResource(s)
		if err != nil {
			return
		}
		for i, b := range bars {
			if b.Index != i {
				t.Fatalf("bar %d has index %d", i, b.Index)
			}
			if b.Size != 0 && b.Start+b.Size-1 < b.Start {
				t.Fatalf("bar %d wraps: %+v", i, b)
			}
			if b.Mem != (b.Flags&IORESOURCE_MEM != 0) || b.IO != (b.Flags&IORESOURCE_IO != 0) ||
				b.Prefetch != (b.Flags&IORESOURCE_PREFETCH != 0) || b.Is64 != (b.Flags&IORESOURCE_MEM_64 != 0) {
				t.Fatalf("bar %d flags disagree: %+v", i, b)
			}
		}
	})
}
