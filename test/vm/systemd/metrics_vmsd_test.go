//go:build vmsystemd

package systemd

import (
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/metrics/metricstest"
)

// metricsSocket is where the shipped configuration serves the metrics: metrics.sock
// beside the control socket, created by the daemon itself (no socket unit passes it).
const metricsSocket = "/run/mmiobroker/metrics.sock"

// TestMetricsUnderUnit scrapes the metrics of the daemon as the shipped unit runs it
// (private network, the unit's sandbox and file system view): every rig device is
// usable, the limits and the process's fds are there, and a lease allocated and
// released through the CLI moves the claim and gRPC counters.
func TestMetricsUnderUnit(t *testing.T) {
	requireDaemon(t)
	daemonRunning(t)
	before := metricstest.Socket(t, metricsSocket)
	metricstest.Lint(t, before)
	for _, name := range []string{"EDU1", "EDU2", "IVSHMEM", "TESTDEV", "PCIE"} {
		if got := before.Value("mmiobroker_device_usable", "bdf", env(t, name)); got != 1 {
			t.Errorf("mmiobroker_device_usable{bdf=%s} = %v, want 1", env(t, name), got)
		}
	}
	if before.Value("mmiobroker_leases_limit") <= 0 || before.Value("process_open_fds") <= 0 || before.Value("process_max_fds") <= 0 {
		t.Errorf("limits and fds missing: leases_limit %v, process_open_fds %v, process_max_fds %v",
			before.Value("mmiobroker_leases_limit"), before.Value("process_open_fds"), before.Value("process_max_fds"))
	}
	ok := func(s metricstest.Scrape) float64 { return s.Value("mmiobroker_claims_total", "code", "OK") }
	handled := func(s metricstest.Scrape) float64 {
		return s.Value("grpc_server_handled_total", "grpc_method", "AllocateLease", "grpc_code", "OK")
	}
	// allocate -exec claims the lease, runs true with it and releases it.
	if out, err := ctl("allocate", "-exec", env(t, "IVSHMEM"), "2", "--", "true"); err != nil {
		t.Fatalf("mmiobrokerctl allocate -exec: %v\n%s", err, out)
	}
	released := func(s metricstest.Scrape) float64 { return s.Value("mmiobroker_events_total", "type", "released") }
	after := metricstest.Wait(t, metricsSocket, 30*time.Second, func(s metricstest.Scrape) bool {
		return ok(s) == ok(before)+1 && released(s) >= released(before)+1
	})
	if d := handled(after) - handled(before); d != 1 {
		t.Errorf("grpc_server_handled_total{AllocateLease, OK} moved by %v, want 1", d)
	}
}
