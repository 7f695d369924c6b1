package pci

import (
	"cmp"
	"fmt"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Address is a PCI bus/device/function address with its PCI segment (domain), as the kernel
// names devices in /sys/bus/pci/devices: "0000:00:03.0".
//
// Domains above 0xffff (Intel VMD uses 0x10000 and up) cannot be represented and are
// rejected by [ParseAddress].
type Address struct {
	Domain   uint16
	Bus      uint8
	Device   uint8 // 0 to 0x1f
	Function uint8 // 0 to 7
}

// ParseAddress parses a PCI address in the kernel's canonical form "DDDD:BB:DD.F"
// (four hex digits of domain, two of bus, two of device, one of function), or in the short
// form "BB:DD.F" that lspci prints, which means domain 0000.
//
// Parsing is strict: hex digits must be lower case (as sysfs spells them), every field has
// exactly its width, the device is at most 0x1f and the function at most 7, and no
// surrounding space is allowed. So for the long form, ParseAddress(s) succeeding implies
// a.String() == s. Errors wrap [errdefs.ErrInvalidArgument] and quote the input.
func ParseAddress(s string) (Address, error) {
	var a Address
	rest := s
	switch len(s) {
	case len("0000:00:00.0"):
		d, ok := parseHex(s[0:4])
		if !ok || s[4] != ':' {
			return Address{}, addrError(s, "domain must be 4 lower-case hex digits followed by ':'")
		}
		a.Domain = uint16(d)
		rest = s[5:]
	case len("00:00.0"):
	default:
		return Address{}, addrError(s, `want "DDDD:BB:DD.F" or "BB:DD.F"`)
	}
	// rest is "BB:DD.F"
	bus, ok := parseHex(rest[0:2])
	if !ok || rest[2] != ':' {
		return Address{}, addrError(s, "bus must be 2 lower-case hex digits followed by ':'")
	}
	dev, ok := parseHex(rest[3:5])
	if !ok || rest[5] != '.' {
		return Address{}, addrError(s, "device must be 2 lower-case hex digits followed by '.'")
	}
	if dev > 0x1f {
		return Address{}, addrError(s, fmt.Sprintf("device %#x is above 0x1f", dev))
	}
	fn, ok := parseHex(rest[6:7])
	if !ok {
		return Address{}, addrError(s, "function must be 1 hex digit")
	}
	if fn > 7 {
		return Address{}, addrError(s, fmt.Sprintf("function %d is above 7", fn))
	}
	a.Bus, a.Device, a.Function = uint8(bus), uint8(dev), uint8(fn)
	return a, nil
}

// MustParseAddress is like [ParseAddress] but panics on error. It is meant for constants
// in tests and examples only, never for input.
func MustParseAddress(s string) Address {
	a, err := ParseAddress(s)
	if err != nil {
		panic(err)
	}
	return a
}

// String returns the canonical form "DDDD:BB:DD.F", e.g. "0000:00:03.0".
func (a Address) String() string {
	return fmt.Sprintf("%04x:%02x:%02x.%x", a.Domain, a.Bus, a.Device, a.Function)
}

// MarshalText implements encoding.TextMarshaler with the canonical form.
func (a Address) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler with [ParseAddress].
func (a *Address) UnmarshalText(b []byte) error {
	p, err := ParseAddress(string(b))
	if err != nil {
		return err
	}
	*a = p
	return nil
}

// Compare orders addresses by domain, bus, device and function, like their canonical
// strings sort. It returns -1, 0 or +1.
func (a Address) Compare(b Address) int {
	return cmp.Or(
		cmp.Compare(a.Domain, b.Domain),
		cmp.Compare(a.Bus, b.Bus),
		cmp.Compare(a.Device, b.Device),
		cmp.Compare(a.Function, b.Function),
	)
}

// parseHex parses lower-case hex digits only: no sign, no prefix, no underscores.
func parseHex(s string) (uint64, bool) {
	if s == "" {
		return 0, false
	}
	var v uint64
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case '0' <= c && c <= '9':
			v = v<<4 | uint64(c-'0')
		case 'a' <= c && c <= 'f':
			v = v<<4 | uint64(c-'a'+10)
		default:
			return 0, false
		}
	}
	return v, true
}

func addrError(s, why string) error {
	return fmt.Errorf("pci address %q: %s: %w", clip(s), why, errdefs.ErrInvalidArgument)
}

// clip keeps error messages bounded when the input is long.
func clip(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}
