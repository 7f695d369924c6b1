//go:build vmtest

package e2e

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

// hostDoc is mmiobrokerctl -json host.
type hostDoc struct {
	Host struct {
		KernelRelease string `json:"kernel_release"`
		Probes        []struct {
			Name   string `json:"name"`
			OK     bool   `json:"ok"`
			Value  string `json:"value"`
			Reason string `json:"reason"`
		} `json:"probes"`
		VMTypes []struct {
			Name string `json:"name"`
			Type uint32 `json:"type"`
		} `json:"vm_types"`
		TSMs   []map[string]any `json:"tsms"`
		Limits map[string]any   `json:"limits"`
	} `json:"host"`
}

// TestE2EHost: GetHost on the rig's real kernel. Both kernels: VFIO's group path and dma-buf
// export (so P2PDMA) are there, per-buffer revoke and TSMs are not (Linux 7.2, QEMU has no
// TSM). The iommufd kernel adds iommufd, VFIO cdevs and KVM (built in; nested SVM under
// TCG with -cpu max), whose VM types include "default". The stock kernel has neither
// iommufd nor cdevs, and each says why; its KVM is a module the rig loads only if it is in
// the image, so either KVM works or the probe names /dev/kvm and says why not.
func TestE2EHost(t *testing.T) {
	d := startDaemon(t)
	d.ctl(t, 1000, "host") // anyone may ask; the table goes to the log
	out, code := d.ctl(t, 1000, "-json", "host")
	if code != 0 {
		t.Fatalf("mmiobrokerctl -json host: exit %d", code)
	}
	var doc hostDoc
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("mmiobrokerctl -json host is not JSON: %v", err)
	}
	h := doc.Host
	if h.KernelRelease == "" {
		t.Error("no kernel release")
	}
	type probe = struct {
		ok            bool
		value, reason string
	}
	probes := map[string]probe{}
	var names []string
	for _, p := range h.Probes {
		probes[p.Name] = probe{p.OK, p.Value, p.Reason}
		names = append(names, p.Name)
		if !p.OK && p.Reason == "" {
			t.Errorf("probe %s is absent without a reason", p.Name)
		}
	}
	t.Logf("kernel %s; probes %v; VM types %v", h.KernelRelease, names, h.VMTypes)
	wantOK := func(name string, inValue ...string) {
		t.Helper()
		p, ok := probes[name]
		if !ok || !p.ok {
			t.Errorf("probe %s = %+v (reported: %v), want OK", name, p, ok)
			return
		}
		for _, s := range inValue {
			if !strings.Contains(p.value, s) {
				t.Errorf("probe %s: value %q lacks %q", name, p.value, s)
			}
		}
	}
	wantAbsent := func(name string, inReason ...string) {
		t.Helper()
		p, ok := probes[name]
		if !ok || p.ok {
			t.Errorf("probe %s = %+v (reported: %v), want absent", name, p, ok)
			return
		}
		for _, s := range inReason {
			if !strings.Contains(p.reason, s) {
				t.Errorf("probe %s: reason %q lacks %q", name, p.reason, s)
			}
		}
	}

	wantOK("vfio", "/dev/vfio/vfio")
	wantOK("dma_buf_export", env(t, "EDU1"), env(t, "EDU2"), env(t, "IVSHMEM"))
	wantOK("p2pdma")
	wantAbsent("dma_buf_revoke", "VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE")
	wantAbsent("tsm")
	wantAbsent("private_mmio", "no TSM is registered")
	if len(h.TSMs) != 0 {
		t.Errorf("TSMs %v in QEMU", h.TSMs)
	}
	for _, k := range []string{"max_leases", "claim_timeout", "revoke_within", "fd_limit", "fd_budget", "tenants_by"} {
		if _, ok := h.Limits[k]; !ok {
			t.Errorf("limits lack %s: %v", k, h.Limits)
		}
	}

	var types []string
	for _, vt := range h.VMTypes {
		types = append(types, vt.Name)
	}
	if iommufdKernel() {
		wantOK("iommufd", "/dev/iommu")
		wantOK("vfio_cdev", "/dev/vfio/devices")
		wantOK("p2pdma", "CONFIG_PCI_P2PDMA=y")
	} else {
		wantAbsent("iommufd", "/dev/iommu", "CONFIG_IOMMUFD", "(ENOENT)")
		wantAbsent("vfio_cdev", "CONFIG_VFIO_DEVICE_CDEV")
	}
	// Nested SVM under TCG (-cpu max): kvm_amd is built in (iommufd kernel) or loaded by
	// the rig (stock, vmrig.OptionalModules).
	wantOK("kvm", "/dev/kvm", "API 12")
	wantOK("kvm.api_version", "12")
	wantOK("kvm.vfio_device", "kvm-vfio")
	wantOK("kvm.vm_types", "default")
	if !slices.Contains(types, "default") {
		t.Errorf("KVM's VM types %v lack default", types)
	}
}
