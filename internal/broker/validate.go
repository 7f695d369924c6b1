package broker

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// validateRanges checks a lease's BAR and ranges against the device and the limits. It is
// pure so that it can be fuzzed; every error names the device, BAR and range at fault.
func validateRanges(info DeviceInfo, policy DeviceConfig, bar int, ranges []Range, pageSize uint64, maxRanges int) error {
	bdf := info.BDF
	if bar < 0 || bar > 5 {
		return fmt.Errorf("device %s: bar %d: only BARs 0-5 can be leased: %w", bdf, bar, errdefs.ErrInvalidArgument)
	}
	if len(policy.BARs) > 0 && !slices.Contains(policy.BARs, bar) {
		return fmt.Errorf("device %s: bar %d: not allowed by policy (allowed: %v): %w", bdf, bar, policy.BARs, errdefs.ErrPermissionDenied)
	}
	var b *BAR
	for i := range info.BARs {
		if info.BARs[i].Index == bar {
			b = &info.BARs[i]
		}
	}
	if b == nil || b.Size == 0 {
		return fmt.Errorf("device %s: bar %d is not implemented: %w", bdf, bar, errdefs.ErrInvalidArgument)
	}
	if !b.Mem {
		return fmt.Errorf("device %s: bar %d is an I/O port BAR, not memory: %w", bdf, bar, errdefs.ErrInvalidArgument)
	}
	if len(ranges) == 0 {
		return fmt.Errorf("device %s: bar %d: no ranges: %w", bdf, bar, errdefs.ErrInvalidArgument)
	}
	if len(ranges) > maxRanges {
		return fmt.Errorf("device %s: bar %d: %d ranges, at most %d allowed: %w", bdf, bar, len(ranges), maxRanges, errdefs.ErrInvalidArgument)
	}
	for i, r := range ranges {
		switch {
		case r.Length == 0:
			return fmt.Errorf("device %s: bar %d: range %d %v is empty: %w", bdf, bar, i, r, errdefs.ErrInvalidArgument)
		case r.Offset%pageSize != 0 || r.Length%pageSize != 0:
			return fmt.Errorf("device %s: bar %d: range %d %v is not aligned to the %d-byte page: %w", bdf, bar, i, r, pageSize, errdefs.ErrInvalidArgument)
		}
		end, carry := bits.Add64(r.Offset, r.Length, 0)
		if carry != 0 || end > b.Size {
			return fmt.Errorf("device %s: bar %d: range %d %v ends beyond the bar (size %#x): %w", bdf, bar, i, r, b.Size, errdefs.ErrInvalidArgument)
		}
	}
	sorted := slices.Clone(ranges)
	slices.SortFunc(sorted, func(a, b Range) int {
		switch {
		case a.Offset < b.Offset:
			return -1
		case a.Offset > b.Offset:
			return 1
		}
		return 0
	})
	for i := 1; i < len(sorted); i++ {
		if sorted[i].Offset < sorted[i-1].End() {
			return fmt.Errorf("device %s: bar %d: ranges %v and %v overlap: %w", bdf, bar, sorted[i-1], sorted[i], errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// mayLease reports whether the holder may lease the device under its policy.
func mayLease(policy DeviceConfig, h Holder, admin bool) bool {
	if admin || slices.Contains(policy.UIDs, h.UID) || slices.Contains(policy.GIDs, h.GID) {
		return true
	}
	for _, g := range h.Groups {
		if slices.Contains(policy.GIDs, g) {
			return true
		}
	}
	return false
}
