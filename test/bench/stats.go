package bench

import (
	"slices"
	"time"
)

// Summary describes a set of latencies.
type Summary struct {
	// N is the number of samples.
	N int
	// P50, P90, P99 and P999 are nearest-rank percentiles (see [Percentile]).
	P50, P90, P99, P999 time.Duration
	// Mean and Max are the arithmetic mean and the largest sample.
	Mean, Max time.Duration
}

// Summarize returns the summary of samples. It does not modify samples. The summary of no
// samples is the zero Summary.
func Summarize(samples []time.Duration) Summary {
	if len(samples) == 0 {
		return Summary{}
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return Summary{
		N:    len(s),
		P50:  Percentile(s, 5000),
		P90:  Percentile(s, 9000),
		P99:  Percentile(s, 9900),
		P999: Percentile(s, 9990),
		Mean: sum / time.Duration(len(s)),
		Max:  s[len(s)-1],
	}
}

// Percentile returns the nearest-rank percentile of sorted samples: the smallest sample
// that at least bp/10000 of all samples do not exceed (bp is in basis points: 9990 is
// p99.9). Integer arithmetic keeps ranks exact (p99.9 of 100,000 samples is the
// 99,900th). It returns 0 for no samples.
func Percentile(sorted []time.Duration, bp int) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	rank := (bp*n + 9999) / 10000 // ceil(bp/10000 × n)
	rank = min(max(rank, 1), n)
	return sorted[rank-1]
}

// Rate is the throughput of a closed loop of clients, each of which spent Busy running N
// operations of one kind.
type Rate struct {
	N    int
	Busy time.Duration
}

// Throughput returns the operations per second that the clients of rates together
// sustain for one kind of operation: the sum of every client's N/Busy. Each client runs
// its operations one after the other, interleaved with the other kind, so N/Busy is the
// rate at which that client would run this kind alone under the same machine load; the
// sum over clients is the aggregate rate. Clients without operations count zero.
func Throughput(rates []Rate) float64 {
	var sum float64
	for _, r := range rates {
		if r.N > 0 && r.Busy > 0 {
			sum += float64(r.N) / r.Busy.Seconds()
		}
	}
	return sum
}

// FitLine returns the least-squares line y = intercept + slope·x through the points
// (xs[i], ys[i]). ok is false, and the line zero, unless there are at least two points
// with different x (xs and ys of different lengths count as no points).
func FitLine(xs, ys []float64) (slope, intercept float64, ok bool) {
	n := len(xs)
	if n < 2 || len(ys) != n {
		return 0, 0, false
	}
	var mx, my float64
	for i := range n {
		mx += xs[i]
		my += ys[i]
	}
	mx /= float64(n)
	my /= float64(n)
	var sxx, sxy float64
	for i := range n {
		dx := xs[i] - mx
		sxx += dx * dx
		sxy += dx * (ys[i] - my)
	}
	if sxx == 0 {
		return 0, 0, false
	}
	slope = sxy / sxx
	return slope, my - slope*mx, true
}
