//go:build vmtest

package e2e

import (
	"path/filepath"
	"testing"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/metrics/metricstest"
)

// TestE2EMetrics scrapes the daemon's metrics socket (its default, metrics.sock beside the
// control socket) around a lease on the real kernel: allocated and claimed (ivshmem BAR2),
// then revoked by an admin, which cycles the real device. The counters, gauges and
// histograms of that round trip move by exactly what happened, and the exposition is
// promlint-clean.
func TestE2EMetrics(t *testing.T) {
	d := startDaemon(t)
	sock := filepath.Join(d.dir, "metrics.sock")
	ivshmem := env(t, "IVSHMEM")
	before := metricstest.Socket(t, sock)
	metricstest.Lint(t, before)
	if got := before.Value("mmiobroker_device_usable", "bdf", ivshmem); got != 1 {
		t.Errorf("mmiobroker_device_usable{bdf=%s} = %v, want 1", ivshmem, got)
	}

	c := d.client(t)
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Offset: 0, Length: 64 << 10}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	ok := func(s metricstest.Scrape) float64 { return s.Value("mmiobroker_claims_total", "code", "OK") }
	during := metricstest.Wait(t, sock, 30*time.Second, func(s metricstest.Scrape) bool { return ok(s) == ok(before)+1 })
	type sample struct {
		name   string
		labels []string
	}
	moved := func(from, to metricstest.Scrape, want float64, ss ...sample) {
		t.Helper()
		for _, s := range ss {
			if d := to.Value(s.name, s.labels...) - from.Value(s.name, s.labels...); d != want {
				t.Errorf("%s%v moved by %v, want %v", s.name, s.labels, d, want)
			}
		}
	}
	active := sample{"mmiobroker_leases", []string{"bdf", ivshmem, "kind", "shared", "state", "active"}}
	moved(before, during, 1,
		active,
		sample{"mmiobroker_lease_round_trip_seconds", nil},
		sample{"grpc_server_handled_total", []string{"grpc_method", "AllocateLease", "grpc_code", "OK"}},
		sample{"mmiobroker_events_total", []string{"type", "allocated"}},
		sample{"mmiobroker_events_total", []string{"type", "claimed"}},
	)

	if _, err := c.API().RevokeLease(ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l.ID}); err != nil {
		t.Fatal(err)
	}
	cycles := sample{"mmiobroker_device_cycles_total", []string{"bdf", ivshmem, "cause", "admin", "result", "ok"}}
	after := metricstest.Wait(t, sock, 30*time.Second, func(s metricstest.Scrape) bool {
		return s.Value(cycles.name, cycles.labels...) == during.Value(cycles.name, cycles.labels...)+1
	})
	moved(during, after, 1,
		sample{"mmiobroker_revoke_latency_seconds", nil},
		sample{"mmiobroker_device_cycle_duration_seconds", nil},
		sample{"mmiobroker_leases_ended_total", []string{"reason", "revoked"}},
		sample{"mmiobroker_events_total", []string{"type", "revoked"}},
	)
	moved(during, after, -1, active)
	metricstest.Lint(t, after)
	if fds := after.Value("process_open_fds"); fds <= 0 || fds > after.Value("process_max_fds") {
		t.Errorf("process_open_fds = %v of process_max_fds %v", fds, after.Value("process_max_fds"))
	}
}
