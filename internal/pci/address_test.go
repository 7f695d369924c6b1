package pci

import (
	"errors"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestParseAddress(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Address
	}{
		{"0000:00:03.0", Address{0, 0, 3, 0}},
		{"abcd:ef:1f.7", Address{0xabcd, 0xef, 0x1f, 7}},
		{"ffff:ff:1f.7", Address{0xffff, 0xff, 0x1f, 7}},
		{"00:03.0", Address{0, 0, 3, 0}},
		{"3b:00.1", Address{0, 0x3b, 0, 1}},
	} {
		got, err := ParseAddress(tc.in)
		if err != nil {
			t.Errorf("ParseAddress(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseAddress(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

func TestParseAddressRejects(t *testing.T) {
	for _, in := range []string{
		"",
		"0000:00:03",
		"0000:00:03.",
		"0000:00:20.0",   // device > 0x1f
		"0000:00:03.8",   // function > 7
		"0000:00:03.f",   // function > 7
		"0000:0A:00.0",   // upper case
		"ABCD:00:00.0",   // upper case
		" 0000:00:03.0",  // space
		"0000:00:03.0\n", // trailing newline
		"0000-00:03.0",   // separators
		"0000:00-03.0",
		"0000:00:03:0",
		"10000:00:00.0", // VMD domain
		"000:00:03.0",   // short domain
		"0000:+0:03.0",  // sign
		"0x00:00:03.0",  // prefix
		"00:03.0.0",
		"00:3.00",
		"0000:00:03.0/",
		"+000:00:03.0",
	} {
		a, err := ParseAddress(in)
		if err == nil {
			t.Errorf("ParseAddress(%q) = %v, want error", in, a)
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseAddress(%q): error %v does not wrap ErrInvalidArgument", in, err)
		}
		if !strings.Contains(err.Error(), `"`) {
			t.Errorf("ParseAddress(%q): error %q does not quote the input", in, err)
		}
	}
}

func TestParseAddressLongInputErrorIsBounded(t *testing.T) {
	_, err := ParseAddress(strings.Repeat("x", 1<<20))
	if err == nil || len(err.Error()) > 200 {
		t.Fatalf("got error of %d bytes: %.100v", len(err.Error()), err)
	}
}

func TestAddressString(t *testing.T) {
	if got, want := (Address{Domain: 1, Bus: 0x3b, Device: 0x1f, Function: 7}).String(), "0001:3b:1f.7"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
}

func TestAddressText(t *testing.T) {
	var a Address
	if err := a.UnmarshalText([]byte("0000:00:04.1")); err != nil {
		t.Fatal(err)
	}
	b, err := a.MarshalText()
	if err != nil || string(b) != "0000:00:04.1" {
		t.Fatalf("MarshalText() = %q, %v", b, err)
	}
	if err := a.UnmarshalText([]byte("bogus")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("UnmarshalText(bogus) = %v, want ErrInvalidArgument", err)
	}
	if a != (Address{Device: 4, Function: 1}) {
		t.Fatalf("failed UnmarshalText changed the address to %v", a)
	}
}

func TestAddressCompare(t *testing.T) {
	order := []string{"0000:00:00.0", "0000:00:00.1", "0000:00:01.0", "0000:01:00.0", "0001:00:00.0"}
	for i := range order {
		for j := range order {
			a, b := MustParseAddress(order[i]), MustParseAddress(order[j])
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got := a.Compare(b); got != want {
				t.Errorf("%v.Compare(%v) = %d, want %d", a, b, got, want)
			}
		}
	}
}

func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"0000:00:03.0", "00:03.0", "ffff:ff:1f.7", "0000:00:20.0", "0000:0A:00.0", "", "0000:00:03.0\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAddress(s)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("error %v does not wrap ErrInvalidArgument", err)
			}
			return
		}
		canon := a.String()
		switch len(s) {
		case 12:
			if canon != s {
				t.Fatalf("ParseAddress(%q).String() = %q", s, canon)
			}
		case 7:
			if canon != "0000:"+s {
				t.Fatalf("ParseAddress(%q).String() = %q", s, canon)
			}
		default:
			t.Fatalf("ParseAddress accepted %q of length %d", s, len(s))
		}
		b, err := ParseAddress(canon)
		if err != nil || b != a {
			t.Fatalf("ParseAddress(%q) = %v, %v; want %v", canon, b, err, a)
		}
		if a.Device > 0x1f || a.Function > 7 {
			t.Fatalf("ParseAddress(%q) = %+v out of range", s, a)
		}
	})
}
