package bench

import (
	"math/bits"
	"time"
)

// histSubBits is log2 of the buckets per power of two of a [Histogram]: 32, so that a
// bucket is at most 1/32 (3.1%) wider than its lowest value.
const histSubBits = 5

// Histogram counts durations in buckets of at most 3.1% relative width (exact below 32
// ns), so that the latencies of millions of events cost a few kilobytes and the
// histograms of several processes add up. The zero Histogram is empty and ready to use.
type Histogram struct {
	// Counts are the samples per bucket (see histBucket); trailing empty buckets are
	// left out.
	Counts []uint64 `json:",omitempty"`
	// N, Sum and Max are the number of samples, their sum and the largest.
	N   uint64
	Sum time.Duration
	Max time.Duration
}

// histBucket returns the bucket of a sample of v nanoseconds: v itself below 32, then 32
// buckets per power of two.
func histBucket(v uint64) int {
	if v < 1<<histSubBits {
		return int(v)
	}
	shift := bits.Len64(v) - 1 - histSubBits
	return (shift+1)<<histSubBits + int(v>>shift) - 1<<histSubBits
}

// histUpper returns the largest value of bucket i.
func histUpper(i int) uint64 {
	if i < 1<<histSubBits {
		return uint64(i)
	}
	shift := i>>histSubBits - 1
	m := uint64(i&(1<<histSubBits-1) + 1<<histSubBits)
	return (m+1)<<shift - 1
}

// Record adds a sample; negative durations count as 0.
func (h *Histogram) Record(d time.Duration) {
	d = max(d, 0)
	i := histBucket(uint64(d))
	if i >= len(h.Counts) {
		h.Counts = append(h.Counts, make([]uint64, i+1-len(h.Counts))...)
	}
	h.Counts[i]++
	h.N++
	h.Sum += d
	h.Max = max(h.Max, d)
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	if len(o.Counts) > len(h.Counts) {
		h.Counts = append(h.Counts, make([]uint64, len(o.Counts)-len(h.Counts))...)
	}
	for i, c := range o.Counts {
		h.Counts[i] += c
	}
	h.N += o.N
	h.Sum += o.Sum
	h.Max = max(h.Max, o.Max)
}

// Percentile returns the nearest-rank percentile bp (in basis points, as [Percentile]):
// the upper end of the bucket that holds that sample, at most Max; 0 if h is empty.
func (h *Histogram) Percentile(bp int) time.Duration {
	if h.N == 0 {
		return 0
	}
	rank := (uint64(bp)*h.N + 9999) / 10000
	rank = min(max(rank, 1), h.N)
	var seen uint64
	for i, c := range h.Counts {
		seen += c
		if seen >= rank {
			return min(time.Duration(histUpper(i)), h.Max)
		}
	}
	return h.Max
}

// Summary returns h's summary (its percentiles as [Histogram.Percentile] has them).
func (h *Histogram) Summary() Summary {
	if h.N == 0 {
		return Summary{}
	}
	return Summary{
		N: int(h.N), P50: h.Percentile(5000), P90: h.Percentile(9000), P99: h.Percentile(9900), P999: h.Percentile(9990),
		Mean: h.Sum / time.Duration(h.N), Max: h.Max,
	}
}
