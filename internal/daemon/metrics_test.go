package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/metrics/metricstest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestMetricsScrape runs the daemon on a fake device and scrapes its metrics socket
// before, during and after an allocation, its claim, an admin's revoke and a tenant's
// release: the values move, and the exposition is promlint-clean.
func TestMetricsScrape(t *testing.T) {
	testutil.FDLeakCheck(t)
	const bdf = "0000:00:03.0"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev := brokertest.NewDevice(bdf)
	// R = 0: a tenant's release of a claimed lease cycles the device at once.
	d := daemontest.Start(t, fmt.Sprintf("holder_check = \"1s\"\n[limits]\nrevoke_within = \"0s\"\ntenant_cycle_interval = \"0s\"\n[[device]]\naddress = %q\nallow_uids = [%d]\n",
		bdf, os.Getuid()), dev)
	sock := filepath.Join(d.Dir, "metrics.sock") // [metrics] socket's default: beside the control socket
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 || fi.Sys().(*syscall.Stat_t).Gid != uint32(os.Getgid()) {
		t.Errorf("metrics socket: mode %v gid %d, want a socket with 0660 and the daemon's group", fi.Mode(), fi.Sys().(*syscall.Stat_t).Gid)
	}

	before := metricstest.Socket(t, sock)
	metricstest.Lint(t, before)
	if got := before.Value("mmiobroker_device_usable", "bdf", bdf); got != 1 {
		t.Errorf("device_usable before = %v, want 1", got)
	}
	// The periodic holder check ([daemon] holder_check) runs an interval after the start:
	// its scan of /proc finds none of the fake device's buffers (they are not vfio-pci dma-bufs).
	checked := metricstest.Wait(t, sock, 10*time.Second, func(s metricstest.Scrape) bool { return s.Value("mmiobroker_holder_check_timestamp_seconds") > 0 })
	if got := checked.Value("mmiobroker_holder_check_duration_seconds"); got <= 0 {
		t.Errorf("holder_check_duration_seconds = %v after the first check", got)
	}

	c, err := client.Dial(d.Control, client.WithClaimSocket(d.Claim))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	held, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer held.File.Close()
	other, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 4096, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.File.Close()
	pending, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: 0, Ranges: []*brokerv1.Range{{Offset: 8192, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Claim(ctx, pending.GetLease().GetId(), strings.Repeat("0", 32)); err == nil {
		t.Fatal("a claim with a wrong token succeeded")
	}
	// A claim's count follows its fd's delivery, which the client may see first: wait
	// for the two deliveries (and the refused claim) by scraping again.
	during := metricstest.Wait(t, sock, 10*time.Second, func(s metricstest.Scrape) bool {
		return s.Value("mmiobroker_claims_total", "code", "OK") == 2 && s.Value("mmiobroker_claims_total", "code", "BAD_TOKEN") == 1
	})
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "active"}, 2},
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "allocated"}, 1},
		{"mmiobroker_leases_in_use", nil, 3},
		{"mmiobroker_lease_round_trip_seconds", nil, 2},
		{"grpc_server_handled_total", []string{"grpc_method", "AllocateLease", "grpc_code", "OK"}, 3},
		{"grpc_server_started_total", []string{"grpc_method", "AllocateLease"}, 3},
		{"mmiobroker_grpc_connections", nil, 1},
		{"mmiobroker_events_total", []string{"type", "claimed"}, 2},
	} {
		if got := during.Value(c.name, c.labels...); got != c.want {
			t.Errorf("after allocations: %s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}

	// An admin's revoke (the test process is an admin) cycles the device at once and
	// reissues its other leases (their new generations wait for a claim, so releasing
	// them cycles nothing); a tenant's release of a claimed lease with revoke_within 0
	// cycles it again.
	if _, err := c.Revoke(ctx, held.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Release(ctx, pending.GetLease().GetId()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Release(ctx, other.ID); err != nil {
		t.Fatal(err)
	}
	third, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	third.File.Close()
	if _, err := c.Release(ctx, third.ID); err != nil {
		t.Fatal(err)
	}
	after := metricstest.Wait(t, sock, 10*time.Second, func(s metricstest.Scrape) bool { return s.Value("mmiobroker_claims_total", "code", "OK") == 3 })
	metricstest.Lint(t, after)
	for _, c := range []struct {
		name   string
		labels []string
		before float64
		want   float64
	}{
		{"mmiobroker_device_cycles_total", []string{"bdf", bdf, "cause", "admin", "result", "ok"}, 0, 1},
		{"mmiobroker_device_cycles_total", []string{"bdf", bdf, "cause", "tenant", "result", "ok"}, 0, 1},
		{"mmiobroker_revoke_latency_seconds", nil, 0, 2},
		{"mmiobroker_device_cycle_duration_seconds", nil, 0, 2},
		{"mmiobroker_lease_reissues_total", []string{"bdf", bdf}, 0, 2}, // the admin's cycle: other and pending
		{"mmiobroker_leases_ended_total", []string{"reason", "revoked"}, 0, 1},
		{"mmiobroker_leases_ended_total", []string{"reason", "released"}, 0, 3},
		{"mmiobroker_claims_total", []string{"code", "OK"}, 0, 3},
		{"mmiobroker_claims_total", []string{"code", "BAD_TOKEN"}, 0, 1},
		{"mmiobroker_lease_round_trip_seconds", nil, 0, 3},
		{"grpc_server_handled_total", []string{"grpc_method", "AllocateLease", "grpc_code", "OK"}, 0, 4},
		{"grpc_server_handled_total", []string{"grpc_method", "RevokeLease", "grpc_code", "OK"}, 0, 1},
		{"grpc_server_handled_total", []string{"grpc_method", "ReleaseLease", "grpc_code", "OK"}, 0, 3},
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "active"}, 0, 0},
		{"mmiobroker_leases_in_use", nil, 0, 0},
	} {
		if got := before.Value(c.name, c.labels...); got != c.before {
			t.Errorf("before: %s%v = %v, want %v", c.name, c.labels, got, c.before)
		}
		if got := after.Value(c.name, c.labels...); got != c.want {
			t.Errorf("after: %s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if open, max := after.Value("process_open_fds"), after.Value("process_max_fds"); open <= 0 || max < open {
		t.Errorf("process_open_fds %v, process_max_fds %v: want fds in use below RLIMIT_NOFILE", open, max)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("metrics socket left behind after stop: %v", err)
	}
}

// TestMetricsListenAddress serves the metrics on a loopback TCP address only, and a start
// whose address is taken fails without leaving its sockets behind.
func TestMetricsListenAddress(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	control, claim := filepath.Join(dir, "c.sock"), filepath.Join(dir, "f.sock")
	cfg, res := resolve(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n[metrics]\nsocket = \"\"\nlisten = \"127.0.0.1:0\"\n", control, claim))
	var logBuf lockedBuffer
	stop := runReady(t, cfg, res, slog.New(slog.NewJSONHandler(&logBuf, nil)))
	addr := logBuf.field(t, "serving metrics", "addr")
	resp, err := (&http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}).Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "mmiobroker_leases_limit 4096") {
		t.Errorf("GET http://%s/metrics: %s, %v\n%.500s", addr, resp.Status, err, body)
	}
	if _, err := os.Lstat(filepath.Join(dir, "metrics.sock")); !os.IsNotExist(err) {
		t.Errorf("metrics socket created although socket = \"\": %v", err)
	}

	// A second daemon (other sockets) on the same address fails to start, and closes
	// (removes) the sockets it had created.
	err = runOnce(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n[metrics]\nlisten = %q\n",
		filepath.Join(dir, "c2.sock"), filepath.Join(dir, "f2.sock"), addr))
	if err == nil || !strings.Contains(err.Error(), "metrics listen address") {
		t.Errorf("second daemon on %s: %v, want an error about the metrics listen address", addr, err)
	}
	for _, name := range []string{"c2.sock", "f2.sock", "metrics.sock"} {
		if _, err := os.Lstat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("%s left behind by the failed start: %v", name, err)
		}
	}
	if err := stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
}

// lockedBuffer is a log sink safe for the daemon's goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// field returns attribute key of the first JSON log line with message msg.
func (b *lockedBuffer) field(t *testing.T, msg, key string) string {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for line := range strings.SplitSeq(b.buf.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
			if v, ok := rec[key].(string); ok {
				return v
			}
		}
	}
	t.Fatalf("no log line %q with %s:\n%s", msg, key, b.buf.String())
	return ""
}
