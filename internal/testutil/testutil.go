// Package testutil holds helpers shared by mmiobroker's tests: fd-leak checks, short
// directories for unix sockets, skips that say how to enable what they skip, and the check
// of the kernel struct mirrors against the uapi headers' own layout ([CheckUAPI]).
package testutil

import (
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// OpenFDs returns the open file descriptors of this process with what they point to.
func OpenFDs() (map[string]string, error) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	fds := make(map[string]string, len(ents))
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // the fd used by ReadDir itself is gone by now
		}
		fds[e.Name()] = target
	}
	return fds, nil
}

// FDLeakCheck fails t at cleanup if the test left file descriptors open that were not
// open when FDLeakCheck was called. Register it before anything that opens files.
func FDLeakCheck(t testing.TB) {
	t.Helper()
	before, err := OpenFDs()
	if err != nil {
		t.Fatalf("fd leak check: %v", err)
	}
	t.Cleanup(func() {
		after, err := OpenFDs()
		if err != nil {
			t.Errorf("fd leak check: %v", err)
			return
		}
		var leaked []string
		for fd, target := range after {
			if b, ok := before[fd]; ok && b == target {
				continue
			}
			leaked = append(leaked, fd+" -> "+target)
		}
		if len(leaked) > 0 {
			sort.Strings(leaked)
			t.Errorf("test leaked %d file descriptors:\n  %s", len(leaked), strings.Join(leaked, "\n  "))
		}
	})
}

// ShortTempDir returns a new directory short enough for unix socket paths (which must stay
// under 108 bytes), removed at cleanup.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// SkipUnlessRoot skips t unless the test runs as root.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run the test binary with sudo, or in the VM rig (make test-vm)")
	}
}

// ReportPercentiles adds the p50 and p99 of ds, in microseconds, to b's results
// (metrics "p50-µs" and "p99-µs").
func ReportPercentiles(b *testing.B, ds []time.Duration) { ReportPercentilesAs(b, "", ds) }

// ReportPercentilesAs is ReportPercentiles for one named step of a benchmark: metrics
// "<name>-p50-µs" and "<name>-p99-µs" ("" for no name).
func ReportPercentilesAs(b *testing.B, name string, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	if name != "" {
		name += "-"
	}
	b.ReportMetric(Micros(Percentile(ds, 0.50)), name+"p50-µs")
	b.ReportMetric(Micros(Percentile(ds, 0.99)), name+"p99-µs")
}

// Percentile sorts ds in place and returns its p-quantile (0 ≤ p ≤ 1; the lower nearest
// rank), 0 if ds is empty.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[int(p*float64(len(ds)-1))]
}

// Micros returns d in microseconds, as benchmarks report latencies.
func Micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
