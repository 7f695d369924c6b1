package vmrig

import (
	"bytes"
	"compress/gzip"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// An excerpt of Debian 7.2.13+deb14-amd64's modules.dep and modules.softdep.
const (
	testModulesDep = `kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/vfio/vfio.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/crypto/ccp/ccp.ko.xz
kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/virt/lib/irqbypass.ko.xz kernel/drivers/vfio/vfio.ko.xz
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/crypto/ccp/ccp.ko.xz:
kernel/drivers/vfio/vfio.ko.xz:
`
	testSoftdep = `# Soft dependencies extracted from modules themselves.
softdep vfio post: vfio_iommu_type1 vfio_iommu_spapr_tce
softdep kvm_amd pre: not_here
`
)

func testDB(t *testing.T, dep, soft string) *ModuleDB {
	t.Helper()
	db, err := ParseModuleDB(strings.NewReader(dep), strings.NewReader(soft))
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/vfio/pci/vfio-pci.ko.xz": "vfio_pci",
		"vfio-pci-core":                          "vfio_pci_core",
		"x.ko.zst":                               "x",
		"y.ko.gz":                                "y",
		"z.ko":                                   "z",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestLoadOrder(t *testing.T) {
	db := testDB(t, testModulesDep, testSoftdep)
	got, err := db.LoadOrder(RequiredModules, []string{"udmabuf", "kvm-amd"})
	if err != nil {
		t.Fatal(err)
	}
	// Dependencies before dependents; vfio's post softdep right after it; udmabuf (absent)
	// and kvm_amd's missing pre softdep are skipped.
	want := []string{"irqbypass", "vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci", "kvm", "ccp", "kvm_amd"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("load order (-want +got):\n%s", diff)
	}
	pos := map[string]int{}
	for i, m := range got {
		pos[m] = i
	}
	for m := range pos {
		for _, d := range db.deps[m] {
			if pos[d] > pos[m] {
				t.Errorf("%s loads before its dependency %s", m, d)
			}
		}
	}
}

func TestLoadOrderErrors(t *testing.T) {
	db := testDB(t, testModulesDep, "")
	if _, err := db.LoadOrder([]string{"vfio-pci", "nonexistent"}, nil); err == nil || !strings.Contains(err.Error(), "nonexistent") {
		t.Errorf("missing required module: err = %v", err)
	}
	db = testDB(t, "a.ko: b.ko\nb.ko: a.ko\n", "")
	if _, err := db.LoadOrder([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
	db = testDB(t, "a.ko: gone.ko\n", "")
	if _, err := db.LoadOrder([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "gone") {
		t.Errorf("dangling dependency: err = %v", err)
	}
	if _, err := ParseModuleDB(strings.NewReader("no colon here\n"), strings.NewReader("")); err == nil {
		t.Error("malformed modules.dep accepted")
	}
}

func TestReadModule(t *testing.T) {
	dir := t.TempDir()
	payload := []byte("\x7fELF fake module")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(payload)
	zw.Close()
	files := map[string][]byte{"plain.ko": payload, "gz.ko.gz": gz.Bytes()}
	dep := "plain.ko:\ngz.ko.gz:\n"
	if _, err := exec.LookPath("xz"); err == nil {
		xz := exec.Command("xz", "-c")
		xz.Stdin = bytes.NewReader(payload)
		out, err := xz.Output()
		if err != nil {
			t.Fatal(err)
		}
		files["xz.ko.xz"] = out
		dep += "xz.ko.xz:\n"
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	db, err := LoadModuleDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	for n := range files {
		got, err := db.ReadModule(context.Background(), ModuleName(n))
		if err != nil || !bytes.Equal(got, payload) {
			t.Errorf("ReadModule(%s) = %q, %v", n, got, err)
		}
	}
	if _, err := db.ReadModule(context.Background(), "absent"); err == nil {
		t.Error("ReadModule of an unknown module succeeded")
	}
}
