package bench

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseStatus(t *testing.T) {
	status := "Name:\tmmiobroker-bench\nVmPeak:\t 1300000 kB\nVmHWM:\t   40960 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n"
	rss, hwm, err := parseStatus([]byte(status))
	if err != nil {
		t.Fatal(err)
	}
	if rss != 20<<20 || hwm != 40<<20 {
		t.Errorf("parseStatus = %d, %d; want %d, %d", rss, hwm, 20<<20, 40<<20)
	}
	if _, _, err := parseStatus([]byte("Name:\tx\nVmRSS:\t1 kB\n")); err == nil {
		t.Error("parseStatus without VmHWM: no error")
	}
	if _, _, err := parseStatus([]byte("VmRSS:\tlots kB\nVmHWM:\t1 kB\n")); err == nil {
		t.Error("parseStatus of a bad number: no error")
	}
	// This process's own status parses.
	if rss, _, err := procMemory(os.Getpid()); err != nil || rss == 0 {
		t.Errorf("procMemory(self) = %d, %v", rss, err)
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP go_memstats_mallocs_total Total number of heap objects allocated.
# TYPE go_memstats_mallocs_total counter
go_memstats_mallocs_total 123456
go_memstats_alloc_bytes_total 1.5e+07
mmiobroker_claim_connections_refused_total{how="busy"} 3
mmiobroker_claim_connections_refused_total{how="dropped"} 1
mmiobroker_device_cycles_total{bdf="0000:01:00.0",caused_by="tenant",result="ok"} 7 1700000000000
mmiobroker_leases{bdf="0000:01:00.0",kind="shared",state="active"} 9
mmiobroker_leases{bdf="0000:02:00.0",kind="shared",state="active"} 1
mmiobroker_leases_limit 4096
`
	got, err := parseMetrics(strings.NewReader(text), sampledMetrics)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		metricMallocs:      123456,
		metricAllocBytes:   1.5e7,
		metricClaimRefused: 4,
		metricCycles:       7,
		metricLeases:       10,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("parseMetrics (-want +got):\n%s", diff)
	}
	if _, err := parseMetrics(strings.NewReader("go_memstats_mallocs_total many\n"), sampledMetrics); err == nil {
		t.Error("parseMetrics of a bad value: no error")
	}
}

func TestTail(t *testing.T) {
	tl := newTail(100)
	for i := range 1000 {
		line := []byte(strings.Repeat("x", i%7) + " line " + strconv.Itoa(i) + "\n")
		if n, err := tl.Write(line); n != len(line) || err != nil {
			t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(line))
		}
	}
	if got, want := tl.Last(2), "xxxx line 998\nxxxxx line 999"; got != want {
		t.Errorf("Last(2) = %q, want %q", got, want)
	}
	if len(tl.buf) > 200 {
		t.Errorf("tail keeps %d bytes, want at most 200", len(tl.buf))
	}
	big := []byte(strings.Repeat("y", 300) + "\nend")
	if n, _ := tl.Write(big); n != len(big) {
		t.Errorf("Write of %d bytes = %d", len(big), n)
	}
	if got := tl.Last(1); got != "end" {
		t.Errorf("Last(1) = %q, want %q", got, "end")
	}
}

func TestLineWriter(t *testing.T) {
	w := &lineWriter{lines: make(chan string, 2)}
	for _, s := range []string{"rea", "dy\ngo", "ne\n", "dropped\n"} {
		if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	if a, b := <-w.lines, <-w.lines; a != "ready" || b != "gone" {
		t.Errorf("lines %q, %q; want ready, gone", a, b)
	}
	select {
	case l := <-w.lines:
		t.Errorf("line %q beyond the channel's room was kept", l)
	default:
	}
}
