package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
)

func testHost() *brokerv1.Host {
	return &brokerv1.Host{
		KernelRelease: "7.2.13-mmiobroker-iommufd",
		Probes: []*brokerv1.Probe{
			{Name: "vfio", Ok: true, Value: "/dev/vfio/vfio, vfio_iommu_type1"},
			{Name: "iommufd", Ok: true, Value: "/dev/iommu"},
			{Name: "dma_buf_revoke", Reason: "the kernel has no VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE"},
			{Name: "kvm", Ok: true, Value: "/dev/kvm, API 12"},
			{Name: "kvm.vm_types", Ok: true, Value: "0x13 (default, sw-protected, snp)"},
			{Name: "tsm", Reason: "no /sys/class/tsm"},
		},
		VmTypes: []*brokerv1.VmType{{Name: "default"}, {Name: "sw-protected", Type: 1}, {Name: "snp", Type: 4}},
		Tsms: []*brokerv1.Tsm{{Name: "tsm0", Parent: "0000:00:00.2", Driver: "ccp", ConnectedDevices: []string{"0000:3b:00.0", "0000:3c:00.0"},
			BoundDevices: []string{"0000:3b:00.0"}}, {Name: "tsm1"}},
		Limits: &brokerv1.Limits{MaxLeases: 4096, MaxLeasesPerHolder: 64, MaxRangesPerLease: 16,
			ClaimTimeout: durationpb.New(30 * time.Second), RevokeWithin: durationpb.New(0), TenantCycleInterval: durationpb.New(10 * time.Second),
			TenantCycleBudget: 60, MinTtl: durationpb.New(0), MaxConnections: 1024, MaxConnectionsPerTenant: 128, MaxConcurrentClaims: 64,
			FdLimit: 524288, FdBudget: 15000, TenantsBy: "cgroup"},
	}
}

func TestWriteHost(t *testing.T) {
	var b bytes.Buffer
	if err := writeHost(&b, testHost()); err != nil {
		t.Fatal(err)
	}
	want := `Kernel:   7.2.13-mmiobroker-iommufd
VM types: default, sw-protected, snp
TSMs:     tsm0, tsm1

PROBE           OK   VALUE                              REASON
vfio            yes  /dev/vfio/vfio, vfio_iommu_type1   -
iommufd         yes  /dev/iommu                         -
dma_buf_revoke  no   -                                  the kernel has no VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE
kvm             yes  /dev/kvm, API 12                   -
kvm.vm_types    yes  0x13 (default, sw-protected, snp)  -
tsm             no   -                                  no /sys/class/tsm

TSM   PARENT        DRIVER  CONNECTED                  BOUND
tsm0  0000:00:00.2  ccp     0000:3b:00.0,0000:3c:00.0  0000:3b:00.0
tsm1  -             -       -                          -

Limits:
  Max leases:                 4096
  Max leases per tenant:      64
  Max ranges per lease:       16
  Claim timeout:              30s
  Revoke within (R):          0s (at once)
  Tenant cycle interval (C):  10s
  Tenant cycle budget:        60 per tenant and hour
  Min ttl:                    0s (none)
  Max connections:            1024
  Max connections per tenant: 128
  Max concurrent claims:      64
  File descriptors:           15000 needed at most, limit 524288
  Tenants by:                 cgroup
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("host (-want +got):\n%s", diff)
	}

	// No KVM, no TSM: no TSM table, "none" for both lists.
	h := testHost()
	h.VmTypes, h.Tsms = nil, nil
	b.Reset()
	if err := writeHost(&b, h); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "VM types: none\nTSMs:     none\n") || strings.Contains(b.String(), "PARENT") {
		t.Errorf("host without KVM and TSMs:\n%s", b.String())
	}
}

// TestEndToEndHost: mmiobrokerctl host against the real daemon wiring, on empty sysfs and
// dev roots.
func TestEndToEndHost(t *testing.T) {
	sysfs, dev := t.TempDir(), t.TempDir()
	d := daemontest.Start(t, fmt.Sprintf(`sysfs_root = %q
dev_root = %q

[limits]
max_leases = 50

[[device]]
address = %q
`, sysfs, dev, e2eBDF), brokertest.NewDevice(e2eBDF))
	ctl := &testDaemon{Daemon: d}

	out := ctl.mustCtl(t, "host")
	kvm := filepath.Join(dev, "kvm")
	for _, want := range []string{
		"Kernel:   ", "VM types: none\n", "TSMs:     none\n",
		"kvm " + kvm + ": open: open " + kvm + ": no such file or directory",
		"\n  Max leases:                 50\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("mmiobrokerctl host lacks %q:\n%s", want, out)
		}
	}
	for _, re := range []string{`(?m)^dma_buf_export +yes +` + regexp.QuoteMeta(e2eBDF) + ` +-$`, `(?m)^kvm +no +- +kvm `} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("mmiobrokerctl host has no line matching %s:\n%s", re, out)
		}
	}

	var doc struct {
		Host struct {
			KernelRelease string `json:"kernel_release"`
			Probes        []struct {
				Name   string `json:"name"`
				OK     bool   `json:"ok"`
				Value  string `json:"value"`
				Reason string `json:"reason"`
			} `json:"probes"`
			VMTypes []any          `json:"vm_types"`
			Limits  map[string]any `json:"limits"`
		} `json:"host"`
	}
	js := ctl.mustCtl(t, "-json", "host")
	if err := json.Unmarshal([]byte(js), &doc); err != nil {
		t.Fatalf("-json host is not JSON: %v\n%s", err, js)
	}
	if doc.Host.KernelRelease == "" || len(doc.Host.Probes) < 9 || doc.Host.VMTypes == nil {
		t.Errorf("-json host: kernel %q, %d probes, vm_types %v; want a kernel, every probe, vm_types []", doc.Host.KernelRelease, len(doc.Host.Probes), doc.Host.VMTypes)
	}
	for _, p := range doc.Host.Probes {
		if !p.OK && p.Reason == "" {
			t.Errorf("probe %s is absent without a reason", p.Name)
		}
	}
	for k, want := range map[string]any{"max_leases": float64(50), "claim_timeout": "30s", "revoke_within": "30s", "fd_limit": "1048576", "tenants_by": "cgroup"} {
		if got := doc.Host.Limits[k]; !cmp.Equal(got, want) {
			t.Errorf("-json host: limits.%s = %#v, want %#v", k, got, want)
		}
	}

	if _, errs, code := ctl.ctl(t, "host", "extra"); code != exitUsage || !strings.Contains(errs, "host: want 0 argument(s), got 1") {
		t.Errorf("host extra: exit %d, stderr %q; want a usage error", code, errs)
	}
}
