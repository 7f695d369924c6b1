package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestGetHost: the daemon answers GetHost with its configured limits and its devices'
// dma-buf support (per-buffer revoke too, which only the opened device knows), probing the
// configured sysfs and dev roots (here empty: no VFIO, no KVM).
func TestGetHost(t *testing.T) {
	testutil.FDLeakCheck(t)
	sysfs, dev := t.TempDir(), t.TempDir()
	a, b, c := brokertest.NewDevice("0000:00:03.0"), brokertest.NewDevice("0000:00:04.0"), brokertest.NewDevice("0000:00:05.0")
	b.PerBuffer = true
	c.SetInfo(func(i *broker.DeviceInfo) { i.DMABuf = errors.New("no VFIO_DEVICE_FEATURE_DMA_BUF") })
	d := daemontest.Start(t, fmt.Sprintf(`sysfs_root = %q
dev_root = %q

[limits]
max_leases = 100
max_leases_per_holder = 7
max_ranges_per_lease = 4
claim_timeout = "12s"
revoke_within = "20s"
tenant_cycle_interval = "5s"
tenant_cycle_budget = 3
min_ttl = "0s"

[tenants]
by = "uid"

[[device]]
address = "0000:00:03.0"

[[device]]
address = "0000:00:04.0"

[[device]]
address = "0000:00:05.0"
kinds = ["shared", "private"]
`, sysfs, dev), a, b, c)
	cl, err := client.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cl.API().GetHost(ctx, &brokerv1.GetHostRequest{})
	if err != nil {
		t.Fatal(err)
	}
	h := resp.GetHost()
	if h.GetKernelRelease() == "" {
		t.Error("no kernel release")
	}
	l := h.GetLimits()
	if l.GetFdBudget() == 0 || l.GetFdBudget() > l.GetFdLimit() {
		t.Errorf("fd budget %d, fd limit %d: want 0 < budget <= limit", l.GetFdBudget(), l.GetFdLimit())
	}
	want := &brokerv1.Limits{MaxLeases: 100, MaxLeasesPerHolder: 7, MaxRangesPerLease: 4,
		ClaimTimeout: durationpb.New(12 * time.Second), RevokeWithin: durationpb.New(20 * time.Second),
		TenantCycleInterval: durationpb.New(5 * time.Second), TenantCycleBudget: 3, MinTtl: durationpb.New(0),
		MaxConnections: peercred.MaxConns, MaxConnectionsPerTenant: peercred.MaxConnsPerTenant, MaxConcurrentClaims: 64,
		FdLimit: 1 << 20, FdBudget: l.GetFdBudget(), TenantsBy: "uid"}
	if diff := cmp.Diff(want, l, protocmp.Transform()); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}

	probes := map[string]*brokerv1.Probe{}
	for _, p := range h.GetProbes() {
		probes[p.GetName()] = p
	}
	for name, want := range map[string]string{
		"dma_buf_export": "ok: 0000:00:03.0, 0000:00:04.0; 0000:00:05.0 cannot: no VFIO_DEVICE_FEATURE_DMA_BUF",
		"dma_buf_revoke": "ok: 0000:00:04.0",
		"kvm":            "absent: kvm " + filepath.Join(dev, "kvm") + ": open: open " + filepath.Join(dev, "kvm") + ": no such file or directory",
		"vfio":           "absent: VFIO is not loaded (no " + filepath.Join(sysfs, "module/vfio") + ")",
		"private_mmio":   "absent: no TSM is registered; no confidential VM type (snp or tdx): KVM is not usable; no open device that allows private leases is TSM-bound: 0000:00:05.0 (not TSM-capable)",
	} {
		p := probes[name]
		got := "absent: " + p.GetReason()
		if p.GetOk() {
			got = "ok: " + p.GetValue()
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("probe %s = %q, want it to start with %q", name, got, want)
		}
	}
	if len(h.GetVmTypes()) != 0 || len(h.GetTsms()) != 0 {
		t.Errorf("VM types %v, TSMs %v on an empty host", h.GetVmTypes(), h.GetTsms())
	}
}
