package broker

import (
	"cmp"
	"slices"
)

// spanIndex finds the leases whose ranges overlap given ranges of a BAR without looking at
// the device's other leases: an allocation on a device with thousands of leases checks
// only its neighbours. Per BAR it keeps every range sorted by offset, and the longest
// range: a range that overlaps [off, end) starts after off minus that length and before
// end, a binary search and a short walk. Guarded by Broker.mu.
type spanIndex struct {
	bars map[int]*barSpans
}

type barSpans struct {
	s      []span // sorted by off, then lease ID
	maxLen uint64 // the longest range ever added (not lowered on removal: still correct)
}

type span struct {
	off, end uint64
	l        *lease
}

func compareSpan(a, b span) int {
	if c := cmp.Compare(a.off, b.off); c != 0 {
		return c
	}
	return cmp.Compare(a.l.ID, b.l.ID)
}

// add indexes l's ranges.
func (x *spanIndex) add(l *lease) {
	if x.bars == nil {
		x.bars = map[int]*barSpans{}
	}
	bs := x.bars[l.BAR]
	if bs == nil {
		bs = &barSpans{}
		x.bars[l.BAR] = bs
	}
	for _, r := range l.Ranges {
		sp := span{off: r.Offset, end: r.End(), l: l}
		i, _ := slices.BinarySearchFunc(bs.s, sp, compareSpan)
		bs.s = slices.Insert(bs.s, i, sp)
		bs.maxLen = max(bs.maxLen, r.Length)
	}
}

// remove drops l's ranges (those add indexed).
func (x *spanIndex) remove(l *lease) {
	bs := x.bars[l.BAR]
	if bs == nil {
		return
	}
	for _, r := range l.Ranges {
		if i, found := slices.BinarySearchFunc(bs.s, span{off: r.Offset, l: l}, compareSpan); found && bs.s[i].l == l {
			bs.s = slices.Delete(bs.s, i, i+1)
		}
	}
	if len(bs.s) == 0 {
		delete(x.bars, l.BAR)
	}
}

// reset drops every range.
func (x *spanIndex) reset() { x.bars = nil }

// overlapping calls f with every indexed lease that has a range of bar overlapping one of
// rs (a lease may come more than once), until f returns false.
func (x *spanIndex) overlapping(bar int, rs []Range, f func(*lease) bool) {
	bs := x.bars[bar]
	if bs == nil {
		return
	}
	for _, q := range rs {
		// A span overlapping q ends after q.Offset, so it starts after q.Offset-maxLen.
		from := q.Offset - min(q.Offset, bs.maxLen)
		i, _ := slices.BinarySearchFunc(bs.s, from, func(sp span, off uint64) int { return cmp.Compare(sp.off, off) })
		for ; i < len(bs.s) && bs.s[i].off < q.End(); i++ {
			if bs.s[i].end > q.Offset && !f(bs.s[i].l) {
				return
			}
		}
	}
}

// addLive adds l to d's live leases. Called with Broker.mu held.
func (d *device) addLive(l *lease) {
	d.live[l.ID] = l
	d.spans.add(l)
}

// removeLive drops l from d's live leases. Called with Broker.mu held.
func (d *device) removeLive(l *lease) {
	if d.live[l.ID] == l {
		delete(d.live, l.ID)
		d.spans.remove(l)
	}
}

// addReleased adds l to d's ended-but-live leases. Called with Broker.mu held.
func (d *device) addReleased(l *lease) {
	d.released = append(d.released, l)
	d.releasedSpans.add(l)
}

// clearReleased empties d's ended-but-live leases (after a cycle or a close). Called with
// Broker.mu held.
func (d *device) clearReleased() {
	d.released = nil
	d.releasedSpans.reset()
}
