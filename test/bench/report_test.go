package bench

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeReport is a report of made-up figures: the single client's p50 is 2× its floor's
// (missed), its p99 1.5× (met), 32 processes reach 0.75× the floor's throughput (met),
// and revoke p99 is 1.2 ms (missed).
func fakeReport() *Report {
	us := time.Microsecond
	lat := func(p50, p99 time.Duration) Summary {
		return Summary{N: 1000, P50: p50, P90: p50 + p50/2, P99: p99, P999: 2 * p99, Mean: p50, Max: 3 * p99}
	}
	sample := func(mallocs float64, rss uint64) Sample {
		return Sample{RSS: rss, HWM: rss + 1<<20, Metrics: map[string]float64{metricMallocs: mallocs, metricAllocBytes: 100 * mallocs}}
	}
	return &Report{
		Machine: Machine{CPUs: 2, CPU: "Test CPU", Kernel: "6.18.0", GoVersion: "go1.26.8", Date: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC), Dir: "/dev/shm/mbb1", TmpFS: true},
		Command: "go run ./test/bench/cmd/mmiobroker-bench run -ops 1000",
		Options: RunOptions{Warmup: 20, FDStore: 4096},
		Limits:  []string{"limit note one", "limit note two"},
		Scenarios: []ScenarioResult{
			{Name: ScenarioSingle, Devices: 1, RevokeWithin: "1h", MaxLeases: 1041, Config: "[daemon]\n", Profile: "bench/daemon-single.pprof", ProfileTop: "flat  flat%\n 1s 50% syscall.Syscall",
				Phases: []PhaseResult{{Name: "1 client process", Mode: ModeMixed, Clients: 1, Ops: 1000,
					Broker: lat(400*us, 900*us), Floor: lat(200*us, 600*us), BrokerRate: 1500, FloorRate: 3000, Wall: time.Second, FloorEOFs: 2,
					Before: sample(1000, 20<<20), After: sample(1000+1000*500, 24<<20)}}},
			{Name: ScenarioParallel, Devices: 32, RevokeWithin: "0s", MaxLeases: 64, Fallback: "RLIMIT_NOFILE is 20000",
				Phases: []PhaseResult{{Name: "32 client processes", Mode: ModeMixed, Clients: 32, Ops: 1000,
					Broker: lat(20000*us, 40000*us), Floor: lat(15000*us, 30000*us), BrokerRate: 750, FloorRate: 1000, Wall: 2 * time.Second,
					Before: sample(0, 30<<20), After: sample(420000, 36<<20)}}},
			{Name: ScenarioRevoke, Devices: 1, RevokeWithin: "1h", MaxLeases: 137,
				Phases: []PhaseResult{{Name: "revoke", Mode: ModeRevoke, Clients: 1, Ops: 1000,
					Revoke: lat(500*us, 1200*us), Unary: lat(100*us, 300*us), Wall: time.Second,
					Before: sample(0, 20<<20), After: sample(380000, 22<<20)}}},
			{Name: ScenarioAllocs, Devices: 1, RevokeWithin: "1h", MaxLeases: 137,
				Phases: []PhaseResult{
					{Name: "broker only", Mode: ModeBroker, Clients: 1, Ops: 1000, Before: sample(0, 20<<20), After: sample(300000, 21<<20)},
					{Name: "floor only", Mode: ModeFloor, Clients: 1, Ops: 1000, Before: sample(0, 21<<20), After: sample(150000, 21<<20)}}},
		},
	}
}

func TestTargets(t *testing.T) {
	got := fakeReport().Targets()
	want := []Target{
		{Name: "lease round trip, 1 client process, p50", Measured: "400.0 µs", Floor: "200.0 µs", Ratio: "2.00×", Goal: "≤ 1.5× floor", Met: false},
		{Name: "lease round trip, 1 client process, p99", Measured: "900.0 µs", Floor: "600.0 µs", Ratio: "1.50×", Goal: "≤ 2.0× floor", Met: true},
		{Name: "throughput, 32 client processes", Measured: "750 /s", Floor: "1000 /s", Ratio: "0.75×", Goal: "≥ 0.7× floor", Met: true},
		{Name: "RevokeLease → dma-buf dead, p99", Measured: "1.20 ms", Floor: "300.0 µs (bare unary call)", Ratio: "4.00×", Goal: "< 1 ms", Met: false},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Targets (-want +got):\n%s", diff)
	}
	if got := (&Report{}).Targets(); len(got) != 0 {
		t.Errorf("Targets of an empty report = %+v, want none", got)
	}
}

// checkTable fails unless md has every row and section of a full run's table.
func checkTable(t *testing.T, md string, clients int) {
	t.Helper()
	for _, want := range []string{
		"## Targets (issue 10)",
		"| lease round trip, 1 client process, p50 |",
		"| lease round trip, 1 client process, p99 |",
		"| throughput, " + strconv.Itoa(clients) + " client processes |",
		"| RevokeLease → dma-buf dead, p99 |",
		"## Lease round trip, 1 client process",
		"## Lease round trip, " + strconv.Itoa(clients) + " client processes",
		"## RevokeLease until the dma-buf is dead",
		"| | lease round trip | floor | ratio |",
		"| | RevokeLease | floor: bare unary call | ratio |",
		"## Daemon process",
		"| single | 1 client process |",
		"| parallel | " + strconv.Itoa(clients) + " client processes |",
		"| revoke | revoke |",
		"| allocs | broker only |",
		"| allocs | floor only |",
		"Per round trip alone",
		"## Configuration",
		"| single | 1 |",
		"## Method",
		"- Machine: ",
		"- Command: `",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("table lacks %q", want)
		}
	}
	// Every percentile row appears in each of the three latency tables; throughput in
	// the two round-trip tables.
	for _, row := range []string{"| p50 |", "| p90 |", "| p99 |", "| p99.9 |", "| mean |", "| max |"} {
		if n := strings.Count(md, row); n != 3 {
			t.Errorf("%d rows %q, want 3", n, row)
		}
	}
	if n := strings.Count(md, "| throughput |"); n != 2 {
		t.Errorf("%d throughput rows, want 2", n)
	}
	if n := strings.Count(md, "```"); n%2 != 0 {
		t.Errorf("%d code fences: one is not closed", n)
	}
}

func TestMarkdown(t *testing.T) {
	var b bytes.Buffer
	if err := fakeReport().Markdown(&b); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	checkTable(t, md, 32)
	for _, want := range []string{
		"| lease round trip, 1 client process, p50 | 400.0 µs | 200.0 µs | 2.00× | ≤ 1.5× floor | **no** |",
		"| throughput | 750 /s | 1000 /s | 0.75× |",
		"| p99 | 900.0 µs | 600.0 µs | 1.50× |",
		"| single | 1 client process | 20.0 MiB | 24.0 MiB | 25.0 MiB | 0 | 0 | 500 | 48.8 KiB | 0 | 0 |",
		"the lease round trip allocates 300 objects and 29.3 KiB in the daemon, 2.00× the floor's 150 objects and 2.00× its 14.6 KiB",
		"The parallel scenario runs with revoke_within 0s: the daemon refused the batching configuration (1h): RLIMIT_NOFILE is 20000",
		"- limit note two",
		"Floor replies read at a second recvmsg after a spurious EOF ([a kernel race](#a-kernel-race-spurious-eof-on-seqpacket)): 2.",
		"### A kernel race: spurious EOF on SEQPACKET",
		"## CPU profiles of the daemon process",
		"### Scenario single",
		" 1s 50% syscall.Syscall",
		"- Date: 2026-12-01 10:00 UTC",
		"- Machine: 2 CPUs (Test CPU), Linux 6.18.0, go1.26.8",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("table lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("table:\n%s", md)
	}
}
