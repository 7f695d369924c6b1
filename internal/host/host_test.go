package host

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/kvm"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// fakeHost is a host made of fake trees: sysfs (pcitest), /dev, /proc and /boot in
// temporary directories, all empty to begin with.
type fakeHost struct {
	sys             *pcitest.Tree
	dev, proc, boot string
	opt             Options
}

const testRelease = "7.2.13-test"

func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	h := &fakeHost{sys: pcitest.New(t), dev: t.TempDir(), proc: t.TempDir(), boot: t.TempDir()}
	h.opt = Options{SysfsRoot: h.sys.Root, DevRoot: h.dev, ProcRoot: h.proc, BootDir: h.boot,
		Uname: func() (string, error) { return testRelease, nil }}
	return h
}

// file creates path (relative to root) with content, and its directories.
func file(t *testing.T, root, path, content string) {
	t.Helper()
	p := filepath.Join(root, path)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (h *fakeHost) report(t *testing.T, devs ...Device) Report {
	t.Helper()
	return New(h.opt).Report(devs)
}

func probe(t *testing.T, r Report, name string) Probe {
	t.Helper()
	p, ok := r.Lookup(name)
	if !ok {
		t.Fatalf("no probe %q in %v", name, names(r))
	}
	return p
}

func names(r Report) []string {
	var n []string
	for _, p := range r.Probes {
		n = append(n, p.Name)
	}
	return n
}

// wantAbsent fails unless the probe is absent and its reason contains every one of subs.
func wantAbsent(t *testing.T, p Probe, subs ...string) {
	t.Helper()
	if p.OK {
		t.Errorf("probe %s is OK (value %q), want absent", p.Name, p.Value)
		return
	}
	if p.Reason == "" {
		t.Errorf("probe %s is absent without a reason", p.Name)
	}
	for _, s := range subs {
		if !strings.Contains(p.Reason, s) {
			t.Errorf("probe %s: reason %q lacks %q", p.Name, p.Reason, s)
		}
	}
}

// wantOK fails unless the probe is OK, without a reason, and its value contains every one
// of subs.
func wantOK(t *testing.T, p Probe, subs ...string) {
	t.Helper()
	if !p.OK || p.Reason != "" {
		t.Errorf("probe %s: ok=%v reason %q, want OK", p.Name, p.OK, p.Reason)
		return
	}
	for _, s := range subs {
		if !strings.Contains(p.Value, s) {
			t.Errorf("probe %s: value %q lacks %q", p.Name, p.Value, s)
		}
	}
}

// An empty host: every probe absent, each with a reason, in the documented order.
func TestEmptyHost(t *testing.T) {
	testutil.FDLeakCheck(t)
	h := newFakeHost(t)
	r := h.report(t)
	if r.KernelRelease != testRelease {
		t.Errorf("KernelRelease = %q, want %q", r.KernelRelease, testRelease)
	}
	want := []string{"vfio", "vfio_cdev", "iommufd", "dma_buf_export", "dma_buf_revoke", "p2pdma", "kvm", "tsm", "private_mmio"}
	if diff := cmp.Diff(want, names(r)); diff != "" {
		t.Errorf("probes (-want +got):\n%s", diff)
	}
	for _, p := range r.Probes {
		wantAbsent(t, p)
	}
	if r.VMTypes != nil || r.TSMs != nil {
		t.Errorf("VMTypes %v, TSMs %v; want none", r.VMTypes, r.TSMs)
	}
	wantAbsent(t, probe(t, r, "vfio"), "VFIO is not loaded", "modprobe vfio-pci", "(ENOENT)")
	wantAbsent(t, probe(t, r, "dma_buf_export"), "no configured device is open")
	wantAbsent(t, probe(t, r, "dma_buf_revoke"), "no configured device is open")
	wantAbsent(t, probe(t, r, "p2pdma"), "cannot tell", "kallsyms", "(ENOENT)")
	wantAbsent(t, probe(t, r, "private_mmio"), "no TSM is registered", "no confidential VM type", "KVM is not usable",
		"no open device that allows private leases is TSM-bound")
}

// No /dev/kvm: the kvm probe is absent, naming the node and ENOENT, with no kvm.* checks.
// If sysfs shows KVM, the reason says the node is missing from this process's /dev.
func TestKVMAbsent(t *testing.T) {
	testutil.FDLeakCheck(t)
	h := newFakeHost(t)
	node := filepath.Join(h.dev, "kvm")
	r := h.report(t)
	p := probe(t, r, "kvm")
	wantAbsent(t, p, node, "no such file or directory", "(ENOENT)", "is kvm_intel or kvm_amd loaded?")
	if !errors.Is(p.Err, unix.ENOENT) || !errors.Is(p.Err, errdefs.ErrNotSupported) {
		t.Errorf("kvm probe error %v: want ENOENT, errdefs.ErrNotSupported", p.Err)
	}
	for _, n := range names(r) {
		if strings.HasPrefix(n, "kvm.") {
			t.Errorf("probe %s reported without KVM", n)
		}
	}
	if strings.Contains(p.Reason, "not in this process's /dev") {
		t.Errorf("reason %q blames a private /dev, but sysfs has no KVM", p.Reason)
	}

	file(t, h.sys.Root, "class/misc/kvm/dev", "10:232\n")
	wantAbsent(t, probe(t, h.report(t), "kvm"), node, "(ENOENT)",
		filepath.Join(h.sys.Root, "class/misc/kvm")+" exists) but "+node+" is not in this process's /dev", "DeviceAllow="+node+" rw")
}

// A /dev/kvm that is not KVM: the kvm probe fails on KVM_GET_API_VERSION (ENOTTY) and
// kvm.api_version says so.
func TestKVMNotKVM(t *testing.T) {
	testutil.FDLeakCheck(t)
	h := newFakeHost(t)
	file(t, h.dev, "kvm", "")
	r := h.report(t)
	wantAbsent(t, probe(t, r, "kvm"), "get-api-version", "not a KVM device", "(ENOTTY)")
	wantAbsent(t, probe(t, r, "kvm.api_version"), "not a KVM device", "(ENOTTY)")
	if r.VMTypes != nil {
		t.Errorf("VMTypes = %v without KVM", r.VMTypes)
	}
}

// kvmFacts is what kvm.Probe reports on a 7.2 host with SNP.
func kvmFacts(path string) kvm.Facts {
	return kvm.Facts{Path: path, APIVersion: 12,
		VMTypes: []kvm.VMType{kvm.KVM_X86_DEFAULT_VM, kvm.KVM_X86_SW_PROTECTED_VM, kvm.KVM_X86_SNP_VM},
		Checks: []kvm.Check{
			{Name: kvm.CheckOpen, OK: true, Value: path},
			{Name: kvm.CheckAPIVersion, OK: true, Value: "12"},
			{Name: kvm.CheckVMTypes, OK: true, Value: "0x13 (default, sw-protected, snp)"},
			{Name: kvm.CheckUserMemory2, OK: true, Value: "1"},
			{Name: kvm.CheckGuestMemfd, OK: true, Value: "1"},
			{Name: kvm.CheckGuestMemfdFlags, OK: true, Value: "0x3 (mmap, init-shared)"},
			{Name: kvm.CheckMemoryAttributes, OK: true, Value: "0x8 (private)"},
			{Name: kvm.CheckVFIODevice, Reason: "the kernel has no kvm-vfio device (built without CONFIG_KVM_VFIO): no such device", Err: unix.ENODEV},
		}}
}

// With KVM: the kvm probe, one kvm.* probe per check in kvm's order, the VM types; KVM's
// answers are cached for KVMMaxAge.
func TestKVMPresent(t *testing.T) {
	h := newFakeHost(t)
	var calls atomic.Int32
	var gotPath string
	h.opt.ProbeKVM = func(path string) (kvm.Facts, error) {
		calls.Add(1)
		gotPath = path
		return kvmFacts(path), nil
	}
	p := New(h.opt)
	r := p.Report(nil)
	node := filepath.Join(h.dev, "kvm")
	if gotPath != node {
		t.Errorf("KVM probed at %q, want %q", gotPath, node)
	}
	wantOK(t, probe(t, r, "kvm"), node, "API 12")
	want := []Probe{
		{Name: "kvm.api_version", OK: true, Value: "12"},
		{Name: "kvm.vm_types", OK: true, Value: "0x13 (default, sw-protected, snp)"},
		{Name: "kvm.user_memory2", OK: true, Value: "1"},
		{Name: "kvm.guest_memfd", OK: true, Value: "1"},
		{Name: "kvm.guest_memfd_flags", OK: true, Value: "0x3 (mmap, init-shared)"},
		{Name: "kvm.memory_attributes", OK: true, Value: "0x8 (private)"},
		{Name: "kvm.vfio_device", Reason: "the kernel has no kvm-vfio device (built without CONFIG_KVM_VFIO): no such device (ENODEV)", Err: unix.ENODEV},
	}
	var got []Probe
	for _, pr := range r.Probes {
		if strings.HasPrefix(pr.Name, "kvm.") {
			got = append(got, pr)
		}
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b error) bool { return errors.Is(a, b) })); diff != "" {
		t.Errorf("kvm checks (-want +got):\n%s", diff)
	}
	i := slices.IndexFunc(r.Probes, func(p Probe) bool { return p.Name == "kvm" })
	if i < 0 || r.Probes[i+1].Name != "kvm.api_version" || r.Probes[i+7].Name != "kvm.vfio_device" || r.Probes[i+8].Name != "tsm" {
		t.Errorf("probe order %v: want the kvm.* checks right after kvm, then tsm", names(r))
	}
	if diff := cmp.Diff([]kvm.VMType{0, 1, 4}, r.VMTypes); diff != "" {
		t.Errorf("VMTypes (-want +got):\n%s", diff)
	}
	p.Report(nil)
	if n := calls.Load(); n != 1 {
		t.Errorf("KVM probed %d times in two reports, want once (cached)", n)
	}
	h.opt.KVMMaxAge = -1
	p = New(h.opt)
	p.Report(nil)
	p.Report(nil)
	if n := calls.Load(); n != 3 {
		t.Errorf("KVM probed %d times, want 3 (not cached with a negative KVMMaxAge)", n)
	}

	// A kernel before KVM_CAP_VM_TYPES: the default type.
	h.opt.ProbeKVM = func(path string) (kvm.Facts, error) {
		f := kvmFacts(path)
		f.VMTypes = nil
		return f, nil
	}
	if got := New(h.opt).Report(nil).VMTypes; !slices.Equal(got, []kvm.VMType{kvm.KVM_X86_DEFAULT_VM}) {
		t.Errorf("VMTypes without KVM_CAP_VM_TYPES = %v, want [default]", got)
	}
}

func TestTSM(t *testing.T) {
	h := newFakeHost(t)
	class := filepath.Join(h.sys.Root, "class/tsm")
	wantAbsent(t, probe(t, h.report(t), "tsm"), "no "+class, "CONFIG_TSM")

	if err := os.MkdirAll(class, 0o755); err != nil {
		t.Fatal(err)
	}
	r := h.report(t)
	wantAbsent(t, probe(t, r, "tsm"), class+" is empty")
	if r.TSMs != nil {
		t.Errorf("TSMs = %v with an empty class", r.TSMs)
	}

	// tsm0 from AMD's PSP (driver ccp); tsm1 without a parent. Three PCI devices: one bound
	// to tsm0, one connected to it, one TSM-capable but idle.
	psp := pci.MustParseAddress("0000:00:00.2")
	h.sys.AddDevice(t, pcitest.DeviceSpec{Address: psp, Vendor: 0x1022, DeviceID: 0x1649, IOMMUGroup: -1, Driver: "ccp"})
	file(t, h.sys.DevicePath(psp), "tsm/tsm0/uevent", "")
	mustSymlink(t, "../../devices/pci0000:00/0000:00:00.2/tsm/tsm0", filepath.Join(class, "tsm0"))
	mustSymlink(t, "../..", filepath.Join(h.sys.DevicePath(psp), "tsm/tsm0/device"))
	file(t, class, "tsm1/uevent", "")
	for bdf, st := range map[string]pci.TSMState{
		"0000:3b:00.0": {Present: true, Connect: "tsm0", Bound: "tsm0"},
		"0000:3c:00.0": {Present: true, Connect: "tsm0"},
		"0000:3d:00.0": {Present: true},
	} {
		h.sys.AddDevice(t, pcitest.DeviceSpec{Address: pci.MustParseAddress(bdf), IOMMUGroup: -1, TSM: &st})
	}
	r = h.report(t)
	wantOK(t, probe(t, r, "tsm"), "tsm0, tsm1")
	want := []TSM{
		{Name: "tsm0", Parent: "0000:00:00.2", Driver: "ccp", Connected: []string{"0000:3b:00.0", "0000:3c:00.0"}, Bound: []string{"0000:3b:00.0"}},
		{Name: "tsm1"},
	}
	if diff := cmp.Diff(want, r.TSMs); diff != "" {
		t.Errorf("TSMs (-want +got):\n%s", diff)
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func TestVFIOPaths(t *testing.T) {
	testutil.FDLeakCheck(t)
	h := newFakeHost(t)
	sys := h.sys.Root
	dev := h.dev

	// Stock Debian: VFIO and type1 loaded, no iommufd, devices without cdevs.
	file(t, sys, "module/vfio/refcnt", "0\n")
	file(t, sys, "module/vfio_iommu_type1/parameters/dma_entry_limit", "65535\n")
	file(t, sys, "class/misc/vfio/dev", "10:196\n")
	file(t, dev, "vfio/vfio", "")
	a := pci.MustParseAddress("0000:00:03.0")
	h.sys.AddDevice(t, pcitest.DeviceSpec{Address: a, IOMMUGroup: 3, Driver: "vfio-pci"})
	r := h.report(t)
	wantOK(t, probe(t, r, "vfio"), filepath.Join(dev, "vfio/vfio"), "vfio_iommu_type1")
	wantAbsent(t, probe(t, r, "vfio_cdev"), "vfio0", "CONFIG_VFIO_DEVICE_CDEV")
	wantAbsent(t, probe(t, r, "iommufd"), filepath.Join(dev, "iommu"), "CONFIG_IOMMUFD", "(ENOENT)")

	// The iommufd kernel: cdevs and /dev/iommu.
	h.sys.AddDevice(t, pcitest.DeviceSpec{Address: pci.MustParseAddress("0000:00:04.0"), IOMMUGroup: 4, Driver: "vfio-pci", Cdev: true})
	file(t, dev, "vfio/devices/vfio1", "")
	file(t, dev, "iommu", "")
	r = h.report(t)
	wantOK(t, probe(t, r, "vfio_cdev"), filepath.Join(dev, "vfio/devices")+" (vfio1)")
	wantOK(t, probe(t, r, "iommufd"), filepath.Join(dev, "iommu"))

	// A private /dev without the nodes, on a kernel that has them.
	file(t, sys, "class/misc/iommu/dev", "10:123\n")
	for _, n := range []string{"iommu", "vfio"} {
		if err := os.RemoveAll(filepath.Join(dev, n)); err != nil {
			t.Fatal(err)
		}
	}
	r = h.report(t)
	wantAbsent(t, probe(t, r, "vfio"), "class/misc/vfio exists) but "+filepath.Join(dev, "vfio/vfio")+" is not in this process's /dev", "(ENOENT)")
	wantAbsent(t, probe(t, r, "vfio_cdev"), "vfio1/dev exists) but "+filepath.Join(dev, "vfio/devices")+" is not in this process's /dev")
	wantAbsent(t, probe(t, r, "iommufd"), "class/misc/iommu exists) but "+filepath.Join(dev, "iommu")+" is not in this process's /dev", "(ENOENT)")

	// The container without type1 is usable only if a device is open in group mode.
	file(t, dev, "vfio/vfio", "")
	if err := os.RemoveAll(filepath.Join(sys, "module/vfio_iommu_type1")); err != nil {
		t.Fatal(err)
	}
	wantAbsent(t, probe(t, h.report(t), "vfio"), "modprobe vfio_iommu_type1")
	wantOK(t, probe(t, h.report(t, Device{BDF: a.String(), Mode: "group"}), "vfio"), "1 device(s) open in group mode")
}

// writeConfigGz writes /proc/config.gz.
func writeConfigGz(t *testing.T, proc, config string) {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write([]byte(config))
	zw.Close()
	file(t, proc, "config.gz", b.String())
}

func TestDMABufAndP2PDMA(t *testing.T) {
	devA := Device{BDF: "0000:00:03.0", Mode: "cdev"}
	devB := Device{BDF: "0000:00:04.0", Mode: "cdev", DMABuf: fmt.Errorf("vfio 0000:00:04.0: probe-dma-buf: %w", unix.EOPNOTSUPP)}
	lost := Device{BDF: "0000:00:05.0", Err: errors.New("device lost"), RevokeBuffers: true}
	kallsyms := "ffffffff81000000 T _stext\nffffffff81234560 T " + p2pdmaSymbol + "\n"
	for _, tt := range []struct {
		name                string
		config, boot, syms  string // /proc/config.gz, /boot/config-<release>, /proc/kallsyms; "" for none
		devs                []Device
		export, revoke, p2p string // "ok: value" or "absent: reason"
	}{
		{name: "nothing to go by",
			export: "absent: cannot tell: no configured device is open", revoke: "absent: cannot tell",
			p2p: "absent: cannot tell: no kernel config to read, no device exporting dma-bufs, and open " + "{proc}/kallsyms: no such file or directory (ENOENT)"},
		{name: "devices on 7.2", devs: []Device{devA, devB, lost}, syms: "0 T _stext\n",
			export: "ok: 0000:00:03.0; 0000:00:04.0 cannot: vfio 0000:00:04.0: probe-dma-buf: operation not supported",
			revoke: "absent: the kernel has no VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE",
			p2p:    "ok: implied by dma_buf_export"},
		{name: "per-buffer revoke", devs: []Device{devA, {BDF: "0000:00:06.0", RevokeBuffers: true}},
			export: "ok: 0000:00:03.0, 0000:00:06.0", revoke: "ok: 0000:00:06.0", p2p: "ok: implied by dma_buf_export"},
		{name: "no device exports", devs: []Device{devB}, syms: kallsyms,
			export: "absent: no open device can export: 0000:00:04.0 cannot: vfio 0000:00:04.0: probe-dma-buf: operation not supported",
			revoke: "absent: the kernel has no VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE",
			p2p:    "ok: " + p2pdmaSymbol + " in {proc}/kallsyms"},
		{name: "kallsyms without p2pdma", syms: kallsyms[:strings.Index(kallsyms, "\n")+1],
			export: "absent: cannot tell", revoke: "absent: cannot tell",
			p2p: "absent: the kernel is built without CONFIG_PCI_P2PDMA ({proc}/kallsyms has no pci_p2pdma_add_resource)"},
		{name: "config.gz says yes", config: "CONFIG_VFIO_PCI_DMABUF=y\nCONFIG_PCI_P2PDMA=y\n",
			export: "ok: CONFIG_VFIO_PCI_DMABUF=y ({proc}/config.gz; no open device to ask)", revoke: "absent: cannot tell",
			p2p: "ok: CONFIG_PCI_P2PDMA=y ({proc}/config.gz)"},
		{name: "boot config says no", boot: "# CONFIG_PCI_P2PDMA is not set\nCONFIG_VFIO=m\n", syms: kallsyms,
			export: "absent: the kernel is built without CONFIG_VFIO_PCI_DMABUF ({boot}/config-" + testRelease + ")",
			revoke: "absent: cannot tell",
			p2p:    "absent: the kernel is built without CONFIG_PCI_P2PDMA ({boot}/config-" + testRelease + ")"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newFakeHost(t)
			if tt.config != "" {
				writeConfigGz(t, h.proc, tt.config)
			}
			if tt.boot != "" {
				file(t, h.boot, "config-"+testRelease, tt.boot)
			}
			if tt.syms != "" {
				file(t, h.proc, "kallsyms", tt.syms)
			}
			r := h.report(t, tt.devs...)
			expand := strings.NewReplacer("{proc}", h.proc, "{boot}", h.boot)
			for name, want := range map[string]string{"dma_buf_export": tt.export, "dma_buf_revoke": tt.revoke, "p2pdma": tt.p2p} {
				want = expand.Replace(want)
				p := probe(t, r, name)
				got := "absent: " + p.Reason
				if p.OK {
					got = "ok: " + p.Value
				}
				if !strings.HasPrefix(got, want) {
					t.Errorf("%s = %q, want it to start with %q", name, got, want)
				}
			}
		})
	}
}

func TestPrivateMMIO(t *testing.T) {
	h := newFakeHost(t)
	devs := []Device{
		{BDF: "0000:3b:00.0", Private: true, TSMPresent: true, TSMConnect: "tsm0"},
		{BDF: "0000:3c:00.0", Private: true, Unattested: true},
		{BDF: "0000:3d:00.0", TSMPresent: true, TSMConnect: "tsm0", TSMBound: "tsm0"}, // shared only
	}
	p := probe(t, h.report(t, devs...), "private_mmio")
	wantAbsent(t, p, "no TSM is registered; no confidential VM type (snp or tdx): KVM is not usable; "+
		"no open device that allows private leases is TSM-bound: 0000:3b:00.0 (connected to tsm0, not bound), 0000:3c:00.0 (not TSM-capable); "+
		"0000:3c:00.0 grant(s) unattested private leases (test rigs only)")

	h.opt.ProbeKVM = func(path string) (kvm.Facts, error) {
		f := kvmFacts(path)
		f.VMTypes = f.VMTypes[:2]
		return f, nil
	}
	file(t, h.sys.Root, "class/tsm/tsm0/uevent", "")
	wantAbsent(t, probe(t, h.report(t, devs...), "private_mmio"), "no confidential VM type (snp or tdx): KVM creates only default, sw-protected; no open device")

	h.opt.ProbeKVM = func(path string) (kvm.Facts, error) { return kvmFacts(path), nil }
	devs[0].TSMBound = "tsm0"
	wantOK(t, probe(t, h.report(t, devs...), "private_mmio"), "snp; 0000:3b:00.0 (bound to tsm0)")
}

func TestKconfig(t *testing.T) {
	syms, err := parseKconfig(strings.NewReader("#\n# Automatically generated file\n#\nCONFIG_PCI_P2PDMA=y\n# CONFIG_IOMMUFD is not set\nCONFIG_LOCALVERSION=\"-x\"\nCONFIG_NR_CPUS=64\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"CONFIG_PCI_P2PDMA": "y", "CONFIG_IOMMUFD": "n", "CONFIG_LOCALVERSION": "-x", "CONFIG_NR_CPUS": "64"}
	if diff := cmp.Diff(want, syms); diff != "" {
		t.Errorf("parseKconfig (-want +got):\n%s", diff)
	}
	kc := kconfig{syms: syms, from: "x"}
	if v, ok := kc.lookup("CONFIG_VFIO_PCI_DMABUF"); !ok || v != "n" {
		t.Errorf("an unmentioned symbol = %q, %v; want n, known", v, ok)
	}
	if _, ok := (kconfig{}).lookup("CONFIG_PCI_P2PDMA"); ok {
		t.Error("the unknown config knows a symbol")
	}
}

// TestRealHost reports this machine. Whatever it has, every absent probe has a reason.
func TestRealHost(t *testing.T) {
	testutil.FDLeakCheck(t)
	r := New(Options{}).Report(nil)
	if r.KernelRelease == "" {
		t.Error("no kernel release")
	}
	t.Logf("kernel %s, VM types %v, TSMs %v", r.KernelRelease, r.VMTypes, r.TSMs)
	for _, p := range r.Probes {
		t.Logf("%-22s ok=%-5v value=%q reason=%q", p.Name, p.OK, p.Value, p.Reason)
		if !p.OK && p.Reason == "" {
			t.Errorf("probe %s is absent without a reason", p.Name)
		}
	}
}
