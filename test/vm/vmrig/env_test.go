package vmrig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseEnv(t *testing.T) {
	got, err := ParseEnv(strings.NewReader("# rig.env\nKVER=7.2.13+deb14-amd64\n\nexport A='x y'\nB=\"q\"\nC=\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"KVER": "7.2.13+deb14-amd64", "A": "x y", "B": "q", "C": ""}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for _, bad := range []string{"novalue\n", "=x\n", "A B=c\n"} {
		if _, err := ParseEnv(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseEnv(%q) accepted", bad)
		}
	}
}

func TestLoadEnvAndKernel(t *testing.T) {
	dir := t.TempDir()
	mods := filepath.Join(dir, "modules")
	os.MkdirAll(mods, 0o755)
	os.WriteFile(filepath.Join(mods, "modules.dep"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "vmlinuz"), []byte("k"), 0o644)
	env := "KVER=7.2.13+deb14-amd64\nKSRCVER=7.2.13-1\nSTOCK_KERNEL=" + filepath.Join(dir, "vmlinuz") +
		"\nSTOCK_MODULES=" + mods + "\nBUSYBOX=/nonexistent/busybox\nUAPI_INCLUDE=" + filepath.Join(dir, "include") + "\n"
	p := filepath.Join(dir, "rig.env")
	os.WriteFile(p, []byte(env), 0o644)
	t.Setenv("MMIOBROKER_VM_CACHE", dir)
	e, err := LoadEnv()
	if err != nil {
		t.Fatal(err)
	}
	if e.KVer != "7.2.13+deb14-amd64" || e.Path != p {
		t.Errorf("env %+v", e)
	}
	if k, err := e.Kernel(Stock); err != nil || k.Modules != mods {
		t.Errorf("Kernel(stock) = %+v, %v", k, err)
	}
	// Not built yet: the error says how to fix it.
	if _, err := e.Kernel(IOMMUFD); err == nil || !strings.Contains(err.Error(), "setup.sh") {
		t.Errorf("Kernel(iommufd) err = %v, want a pointer to setup.sh", err)
	}
	if _, err := e.BusyboxPath(); err == nil {
		t.Error("missing busybox accepted")
	}
	// Written by an older setup.sh: no uapi headers yet.
	if _, err := (Env{Path: p}).UAPIHeaders(); err == nil || !strings.Contains(err.Error(), "setup.sh") {
		t.Errorf("UAPIHeaders() err = %v, want a pointer to setup.sh", err)
	}
	inc := filepath.Join(dir, "include")
	if e.UAPIInclude != inc {
		t.Errorf("UAPIInclude = %q, want %q", e.UAPIInclude, inc)
	}
	if _, err := e.UAPIHeaders(); err == nil {
		t.Error("UAPIHeaders accepted a directory without linux/vfio.h")
	}
	os.MkdirAll(filepath.Join(inc, "linux"), 0o755)
	os.WriteFile(filepath.Join(inc, "linux", "vfio.h"), nil, 0o644)
	if got, err := e.UAPIHeaders(); err != nil || got != inc {
		t.Errorf("UAPIHeaders() = %q, %v, want %q", got, err, inc)
	}
	if _, err := LoadEnvFile(filepath.Join(dir, "absent.env")); err == nil || !strings.Contains(err.Error(), "setup.sh") {
		t.Errorf("missing rig.env: err = %v", err)
	}
	if _, err := ParseKernel("rt"); err == nil {
		t.Error("ParseKernel accepted an unknown kernel")
	}
}

func TestCheckStatic(t *testing.T) {
	// /bin/sh on Debian is always dynamically linked.
	if err := checkStatic("/bin/sh"); err == nil {
		t.Error("checkStatic accepted /bin/sh (dynamically linked)")
	}
	if err := checkStatic(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("checkStatic accepted a missing file")
	}
}
