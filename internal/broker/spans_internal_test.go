package broker

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestSpanIndex compares the index with the brute-force overlap check on random leases,
// adds and removals.
func TestSpanIndex(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	randRanges := func() []Range {
		rs := make([]Range, 1+rng.IntN(3))
		for i := range rs {
			rs[i] = Range{Offset: uint64(rng.IntN(64)) * 4096, Length: uint64(1+rng.IntN(8)) * 4096}
			if rng.IntN(20) == 0 {
				rs[i] = Range{Offset: 0, Length: 1 << 20} // a whole-BAR lease now and then
			}
		}
		return rs
	}
	var x spanIndex
	live := map[string]*lease{}
	for step := range 3000 {
		switch op := rng.IntN(3); {
		case op < 2 || len(live) == 0:
			l := &lease{}
			l.ID, l.BAR, l.Ranges = fmt.Sprintf("l%05d", step), rng.IntN(2), randRanges()
			x.add(l)
			live[l.ID] = l
		default:
			ids := make([]string, 0, len(live))
			for id := range live {
				ids = append(ids, id)
			}
			slices.Sort(ids)
			l := live[ids[rng.IntN(len(ids))]]
			x.remove(l)
			delete(live, l.ID)
		}
		bar, q := rng.IntN(2), randRanges()
		var want, got []string
		for _, l := range live {
			if l.BAR == bar && overlaps(l.Ranges, q) {
				want = append(want, l.ID)
			}
		}
		x.overlapping(bar, q, func(l *lease) bool {
			if !slices.Contains(got, l.ID) {
				got = append(got, l.ID)
			}
			return true
		})
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(want, got) {
			t.Fatalf("step %d: bar %d ranges %v overlap %v, the index found %v", step, bar, q, want, got)
		}
	}
	for _, l := range live {
		x.remove(l)
	}
	if len(x.bars) != 0 {
		t.Errorf("index not empty after removing every lease: %d bars", len(x.bars))
	}
}

// overlaps reports whether any range of a overlaps any range of b: the brute force the
// span index (spans.go) is checked against.
func overlaps(a, b []Range) bool {
	for _, x := range a {
		for _, y := range b {
			if x.Offset < y.End() && y.Offset < x.End() {
				return true
			}
		}
	}
	return false
}
