package bench

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestPercentileNearestRank(t *testing.T) {
	// 1..n µs: the p-th percentile of n samples is the ceil(p×n)-th.
	ramp := func(n int) []time.Duration {
		s := make([]time.Duration, n)
		for i := range s {
			s[i] = time.Duration(i+1) * time.Microsecond
		}
		return s
	}
	for _, tc := range []struct {
		n, bp int
		want  time.Duration
	}{
		{100000, 9990, 99900 * time.Microsecond}, // exact: no float rounding to 99901
		{100000, 9900, 99000 * time.Microsecond},
		{100000, 5000, 50000 * time.Microsecond},
		{1000, 9990, 999 * time.Microsecond},
		{10, 5000, 5 * time.Microsecond},
		{10, 9000, 9 * time.Microsecond},
		{10, 9900, 10 * time.Microsecond},
		{10, 9990, 10 * time.Microsecond},
		{3, 5000, 2 * time.Microsecond},
		{1, 9990, 1 * time.Microsecond},
		{1, 0, 1 * time.Microsecond},
		{7, 10000, 7 * time.Microsecond},
	} {
		if got := Percentile(ramp(tc.n), tc.bp); got != tc.want {
			t.Errorf("Percentile(1..%d µs, %d bp) = %v, want %v", tc.n, tc.bp, got, tc.want)
		}
	}
	if got := Percentile(nil, 5000); got != 0 {
		t.Errorf("Percentile(nil) = %v, want 0", got)
	}
}

func TestSummarize(t *testing.T) {
	samples := []time.Duration{5, 1, 4, 2, 3, 10, 9, 8, 7, 6}
	orig := append([]time.Duration{}, samples...)
	got := Summarize(samples)
	want := Summary{N: 10, P50: 5, P90: 9, P99: 10, P999: 10, Mean: 5, Max: 10} // mean 5.5 truncated
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Summarize (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(orig, samples); diff != "" {
		t.Errorf("Summarize modified its argument (-want +got):\n%s", diff)
	}
	if got := Summarize(nil); got != (Summary{}) {
		t.Errorf("Summarize(nil) = %+v, want zero", got)
	}
}

func TestThroughput(t *testing.T) {
	got := Throughput([]Rate{
		{N: 100, Busy: time.Second},        // 100/s
		{N: 50, Busy: time.Second / 2},     // 100/s
		{N: 0, Busy: time.Second},          // nothing
		{N: 10, Busy: 0},                   // no time: left out
		{N: 300, Busy: 3 * time.Second},    // 100/s
		{N: 1, Busy: 4 * time.Millisecond}, // 250/s
	})
	if want := 550.0; math.Abs(got-want) > 1e-9 {
		t.Errorf("Throughput = %v, want %v", got, want)
	}
}

func TestFitLine(t *testing.T) {
	for _, tc := range []struct {
		name             string
		xs, ys           []float64
		slope, intercept float64
		ok               bool
	}{
		{"exact line", []float64{1000, 10000, 50000, 100000}, []float64{102, 120, 200, 300}, 0.002, 100, true},
		{"flat", []float64{1, 2, 3}, []float64{5, 5, 5}, 0, 5, true},
		// (0,1), (1,0), (2,3), (3,2): Sxy = 3, Sxx = 5, so y = 0.6x + 0.6.
		{"noisy", []float64{0, 1, 2, 3}, []float64{1, 0, 3, 2}, 0.6, 0.6, true},
		{"one point", []float64{1}, []float64{1}, 0, 0, false},
		{"same x", []float64{2, 2}, []float64{1, 3}, 0, 0, false},
		{"lengths differ", []float64{1, 2}, []float64{1}, 0, 0, false},
	} {
		slope, icpt, ok := FitLine(tc.xs, tc.ys)
		if ok != tc.ok || math.Abs(slope-tc.slope) > 1e-9 || math.Abs(icpt-tc.intercept) > 1e-9 {
			t.Errorf("%s: FitLine = %v, %v, %v; want %v, %v, %v", tc.name, slope, icpt, ok, tc.slope, tc.intercept, tc.ok)
		}
	}
}
