package bench

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestHistBuckets: every value falls in a bucket whose upper end is at least the value
// and at most 1/32 above the bucket's lowest value, and buckets are in value order.
func TestHistBuckets(t *testing.T) {
	prevUpper := uint64(0)
	for i := range 40 * 32 {
		up := histUpper(i)
		if i > 0 && up <= prevUpper {
			t.Fatalf("bucket %d ends at %d, not after bucket %d's %d", i, up, i-1, prevUpper)
		}
		lo := uint64(0)
		if i > 0 {
			lo = histUpper(i-1) + 1
		}
		for _, v := range []uint64{lo, up, (lo + up) / 2} {
			if got := histBucket(v); got != i {
				t.Fatalf("value %d in bucket %d, want %d (%d..%d)", v, got, i, lo, up)
			}
		}
		if lo >= 32 && float64(up-lo+1) > float64(lo)/32+1e-9 {
			t.Errorf("bucket %d (%d..%d) is wider than 1/32 of its lowest value", i, lo, up)
		}
		prevUpper = up
	}
	if got := histBucket(1<<63 + 5); histUpper(got) < 1<<63+5 {
		t.Errorf("bucket of 2^63+5 ends at %d", histUpper(got))
	}
}

// TestHistogramPercentiles: the histogram's percentiles are within a bucket (3.1%) of the
// exact ones, never below, and merging two halves gives the whole.
func TestHistogramPercentiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	var all []time.Duration
	var a, b Histogram
	for i := range 100000 {
		d := time.Duration(rng.ExpFloat64() * float64(200*time.Microsecond))
		all = append(all, d)
		if i%2 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
	}
	var h Histogram
	h.Merge(&a)
	h.Merge(&b)
	slices.Sort(all)
	exact, got := Summarize(all), h.Summary()
	if got.N != exact.N || got.Max != exact.Max {
		t.Errorf("N, Max = %d, %v; want %d, %v", got.N, got.Max, exact.N, exact.Max)
	}
	if d := got.Mean - exact.Mean; d < -time.Nanosecond || d > time.Nanosecond {
		t.Errorf("Mean = %v, want %v", got.Mean, exact.Mean)
	}
	for _, bp := range []int{5000, 9000, 9900, 9990, 10000} {
		want, have := Percentile(all, bp), h.Percentile(bp)
		if have < want || float64(have) > float64(want)*(1+1.0/32)+1 {
			t.Errorf("percentile %d bp = %v, exact %v: not within a bucket above", bp, have, want)
		}
	}
	var empty Histogram
	if empty.Summary() != (Summary{}) || empty.Percentile(5000) != 0 {
		t.Errorf("empty histogram: %+v", empty.Summary())
	}
	var neg Histogram
	neg.Record(-time.Second)
	if neg.Max != 0 || neg.Percentile(9900) != 0 {
		t.Errorf("negative sample: %+v", neg)
	}
}
