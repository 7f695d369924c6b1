package bench

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/config"
)

func TestMaxLeasesFor(t *testing.T) {
	for _, tc := range []struct {
		devices, clients, ops int
		batched               bool
		want                  int
	}{
		{1, 1, 100020, true, 1024 + 1 + 16},    // one device fills up to the cap
		{32, 32, 3145, true, 32*(1024+1) + 16}, // one device per client
		{4, 32, 3145, true, 4*(1024+8) + 16},   // eight clients per device
		{1, 1, 10, true, 64},                   // at least 64
		{1, 1, 300, true, 300 + 1 + 16},        // fewer round trips than the cap
		{32, 32, 3145, false, 64},              // nothing waits: live leases only
		{250, 250, 100, false, 250 + 16},       // ...one per client
		{2000, 2000, 100000, true, 1 << 20},    // at most the daemon's maximum
		{0, 1, 10, true, 64},                   // no devices counts as one
	} {
		if got := MaxLeasesFor(tc.devices, tc.clients, tc.ops, tc.batched); got != tc.want {
			t.Errorf("MaxLeasesFor(%d, %d, %d, %v) = %d, want %d", tc.devices, tc.clients, tc.ops, tc.batched, got, tc.want)
		}
	}
}

// TestConfigValid: the generated configuration is one the daemon accepts, with the
// devices and limits asked for.
func TestConfigValid(t *testing.T) {
	for _, rw := range []string{revokeBatched, revokeAtOnce} {
		dir := t.TempDir()
		c := DaemonConfig{Dir: dir, Devices: 3, MaxLeases: 3091, RevokeWithin: rw, TenantsBy: "uid", LogLevel: "warn"}
		path := filepath.Join(dir, configFile)
		if err := os.WriteFile(path, []byte(c.TOML()), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatalf("R %s: %v", rw, err)
		}
		res, err := cfg.Resolve(config.OSLookup())
		if err != nil {
			t.Fatalf("R %s: %v", rw, err)
		}
		b := res.Broker
		if len(b.Devices) != 3 || b.Devices[2].BDF != DeviceBDF(2) {
			t.Errorf("R %s: devices %+v, want %s, %s, %s", rw, b.Devices, DeviceBDF(0), DeviceBDF(1), DeviceBDF(2))
		}
		wantR, _ := time.ParseDuration(rw)
		if b.Limits.MaxLeases != 3091 || b.Limits.MaxLeasesPerHolder != 3091 || b.RevokeWithin != wantR ||
			b.TenantCycleInterval != 0 || b.TenantCycleBudget != 0 {
			t.Errorf("R %s: limits %+v, R %v, C %v, budget %d", rw, b.Limits, b.RevokeWithin, b.TenantCycleInterval, b.TenantCycleBudget)
		}
		if got := cfg.MetricsSocket(); got != filepath.Join(dir, metricsSocket) {
			t.Errorf("R %s: metrics socket %s, want %s", rw, got, filepath.Join(dir, metricsSocket))
		}
	}
}

// TestScaleConfigValid: the scale scenario's configuration (other uids, BAR 4, sockets
// open to every user) is one the daemon accepts, with the policy asked for.
func TestScaleConfigValid(t *testing.T) {
	dir := t.TempDir()
	c := DaemonConfig{Dir: dir, Devices: 2, MaxLeases: 100000, RevokeWithin: revokeBatched,
		Bars: []int{scaleBAR}, AllowUIDs: []int{200000, 200001}, SocketMode: "0666"}
	path := filepath.Join(dir, configFile)
	if err := os.WriteFile(path, []byte(c.TOML()), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	res, err := cfg.Resolve(config.OSLookup())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range res.Broker.Devices {
		if !cmp.Equal(d.BARs, []int{scaleBAR}) || !cmp.Equal(d.UIDs, []uint32{200000, 200001}) {
			t.Errorf("device %s: bars %v, uids %v", d.BDF, d.BARs, d.UIDs)
		}
	}
	if cfg.Daemon.ControlSocketMode.Perm() != 0o666 || cfg.Daemon.ClaimSocketMode.Perm() != 0o666 {
		t.Errorf("socket modes %v, %v; want 0666", cfg.Daemon.ControlSocketMode.Perm(), cfg.Daemon.ClaimSocketMode.Perm())
	}
	if res.Broker.Limits.MaxLeases != 100000 || res.Broker.Limits.MaxLeasesPerHolder != 100000 {
		t.Errorf("limits %+v", res.Broker.Limits)
	}
}
