package vmrig

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func writeFiles(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(root, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFindVMTestPackages(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{
		"go.mod":                               "module " + ModulePath + "\n\ngo 1.26\n",
		"internal/vfio/vfio_vm_test.go":        "",
		"internal/vfio/other_vm_test.go":       "",
		"internal/dmabuf/dmabuf_vm_test.go":    "",
		"internal/pci/pci_test.go":             "",
		"internal/a/x/y_vm_test.go":            "",
		"internal/b/x/z_vm_test.go":            "",
		"internal/vfio/testdata/t_vm_test.go":  "",
		".hidden/h_vm_test.go":                 "",
		"bin/vm-logs/l_vm_test.go":             "",
		"internal/vfio/nested/deep_vm_test.go": "",
	})
	pkgs, err := FindVMTestPackages(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"internal/a/x", "internal/b/x", "internal/dmabuf", "internal/vfio", "internal/vfio/nested"}
	if diff := cmp.Diff(want, pkgs); diff != "" {
		t.Errorf("packages (-want +got):\n%s", diff)
	}
	names := TestBinaryNames(pkgs)
	wantNames := map[string]string{"internal/a/x": "internal-a-x", "internal/b/x": "internal-b-x",
		"internal/dmabuf": "dmabuf", "internal/vfio": "vfio", "internal/vfio/nested": "nested"}
	if diff := cmp.Diff(wantNames, names); diff != "" {
		t.Errorf("names (-want +got):\n%s", diff)
	}
	sub := filepath.Join(root, "internal", "vfio")
	if got, err := FindRepoRoot(sub); err != nil || got != root {
		t.Errorf("FindRepoRoot = %q, %v; want %q", got, err, root)
	}
	if _, err := FindRepoRoot(t.TempDir()); err == nil {
		t.Error("FindRepoRoot outside a checkout succeeded")
	}
}

// staticELF writes the smallest ELF file debug/elf accepts: a header with no program
// headers, hence no PT_INTERP.
func staticELF(t *testing.T, path string) {
	t.Helper()
	h := elf.Header64{Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: 1, Ehsize: 64}
	copy(h.Ident[:], elf.ELFMAG)
	h.Ident[elf.EI_CLASS], h.Ident[elf.EI_DATA], h.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), 1
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, h)
	if err := os.WriteFile(path, b.Bytes(), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestBuildImage(t *testing.T) {
	if _, err := exec.LookPath("zstd"); err != nil {
		t.Skip("no zstd on this host (apt-get install zstd)")
	}
	dir := t.TempDir()
	mods := filepath.Join(dir, "modules")
	writeFiles(t, mods, map[string]string{
		"modules.dep":        "kernel/vfio-pci.ko: kernel/vfio.ko\nkernel/vfio.ko:\nkernel/vfio_iommu_type1.ko: kernel/vfio.ko\n",
		"kernel/vfio-pci.ko": "PCI", "kernel/vfio.ko": "VFIO", "kernel/vfio_iommu_type1.ko": "T1",
	})
	writeFiles(t, dir, map[string]string{"payload/tests/vfio.test": "TEST", "payload/mmiobrokerd": "DAEMON"})
	bb := filepath.Join(dir, "busybox")
	staticELF(t, bb)
	p := &Payload{
		Tests:    []Binary{{Name: "vfio", Package: "internal/vfio", Path: filepath.Join(dir, "payload/tests/vfio.test")}},
		Programs: []Binary{{Name: "mmiobrokerd", Package: "cmd/mmiobrokerd", Path: filepath.Join(dir, "payload/mmiobrokerd")}},
	}
	opt := ImageOptions{Kernel: KernelImage{Kernel: Stock, Modules: mods}, Busybox: bb, Payload: p, CacheDir: filepath.Join(dir, "cache")}
	img, err := BuildImage(context.Background(), opt)
	if err != nil {
		t.Fatal(err)
	}
	if img.Cached || !strings.HasPrefix(filepath.Base(img.Path), "stock-") {
		t.Errorf("first build: %+v", img)
	}
	if diff := cmp.Diff([]string{"vfio", "vfio_pci", "vfio_iommu_type1"}, img.Modules); diff != "" {
		t.Errorf("modules (-want +got):\n%s", diff)
	}
	out, err := exec.Command("zstd", "-dc", img.Path).Output()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, e := range readCPIO(t, out) {
		files[e.Name] = e.Data
	}
	for name, want := range map[string]string{
		"tests/vfio.test":         "TEST",
		"bin/mmiobrokerd":         "DAEMON",
		"lib/modules/vfio.ko":     "VFIO",
		"lib/modules/vfio_pci.ko": "PCI",
		"etc/mmb/modules":         "vfio\nvfio_pci\nvfio_iommu_type1\n",
		"etc/mmb/tests":           "vfio\n",
		"init":                    string(initScript),
		"etc/mmb/demo.sh":         string(demoScript),
	} {
		if got, ok := files[name]; !ok || got != want {
			t.Errorf("%s = %.40q (present %v), want %.40q", name, got, ok, want)
		}
	}
	if _, ok := files["dev/console"]; !ok {
		t.Error("no dev/console")
	}
	again, err := BuildImage(context.Background(), opt)
	if err != nil || !again.Cached || again.Path != img.Path {
		t.Errorf("second build: %+v, %v; want the cached %s", again, err, img.Path)
	}
	// Any content change gives a new image.
	writeFiles(t, dir, map[string]string{"payload/tests/vfio.test": "TEST2"})
	changed, err := BuildImage(context.Background(), opt)
	if err != nil || changed.Cached || changed.Path == img.Path {
		t.Errorf("after a change: %+v, %v", changed, err)
	}
	// Uncompressed images are plain cpio.
	opt.Level = -1
	raw, err := BuildImage(context.Background(), opt)
	if err != nil || !strings.HasSuffix(raw.Path, ".cpio") {
		t.Fatalf("uncompressed: %+v, %v", raw, err)
	}
	if b, err := os.ReadFile(raw.Path); err != nil || len(readCPIO(t, b)) != len(files) {
		t.Errorf("uncompressed image: %v", err)
	}
	// A dynamically linked busybox is refused.
	opt.Busybox = "/bin/sh"
	if _, err := BuildImage(context.Background(), opt); err == nil || !strings.Contains(err.Error(), "busybox-static") {
		t.Errorf("dynamic busybox: err = %v", err)
	}
}

// TestBuildPayloadC: the C programs are built static with CFlags, and a warning, a missing
// compiler or a missing source shows in the payload instead of passing silently.
func TestBuildPayloadC(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Fatalf("no gcc (%v): install build-essential (make setup)", err)
	}
	root := t.TempDir()
	src := map[string]string{"go.mod": "module " + ModulePath + "\n\ngo 1.26\n"}
	for _, prog := range CPrograms {
		src[prog.Source] = "int main(void) { return 0; }\n"
	}
	writeFiles(t, root, src)
	build := func(name string, opt BuildOptions) *Payload {
		t.Helper()
		opt.Root, opt.Dir = root, filepath.Join(root, "out-"+name)
		p, err := BuildPayload(context.Background(), opt)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return p
	}
	p := build("clean", BuildOptions{})
	if len(p.Failures) != 0 {
		t.Fatalf("clean C programs failed: %+v", p.Failures)
	}
	for _, prog := range CPrograms {
		b, ok := p.Program(prog.Name)
		if !ok || b.Package != prog.Source {
			t.Fatalf("payload programs %+v lack %s", p.Programs, prog.Name)
		}
		if err := checkStatic(b.Path); err != nil {
			t.Errorf("%s: %v", prog.Name, err)
		}
		if out, err := exec.Command(b.Path).CombinedOutput(); err != nil {
			t.Errorf("run %s: %v %s", prog.Name, err, out)
		}
	}
	// Programs reused from another boot mode: nothing is rebuilt.
	if again := build("reuse", BuildOptions{Programs: p.Programs}); len(again.Programs) != len(p.Programs) || len(again.Failures) != 0 {
		t.Errorf("with programs to reuse: programs %+v, failures %+v", again.Programs, again.Failures)
	}

	for name, tc := range map[string]struct {
		source, cc, want string
	}{
		"warning":  {"int main(void) { int unused; return 0; }\n", "", "unused"},
		"compiler": {"int main(void) { return 0; }\n", filepath.Join(root, "no-gcc"), "make setup"},
	} {
		for _, prog := range CPrograms {
			writeFiles(t, root, map[string]string{prog.Source: tc.source})
		}
		p := build(name, BuildOptions{CC: tc.cc})
		if len(p.Failures) != len(CPrograms) {
			t.Fatalf("%s: failures %+v, want one per C program", name, p.Failures)
		}
		for i, f := range p.Failures {
			if f.Name != CPrograms[i].Name || !strings.Contains(f.Output, tc.want) {
				t.Errorf("%s: failure %+v, want %s with %q", name, f, CPrograms[i].Name, tc.want)
			}
			if _, ok := p.Program(f.Name); ok {
				t.Errorf("%s: %s failed but is in the payload", name, f.Name)
			}
		}
	}

	for _, prog := range CPrograms {
		os.Remove(filepath.Join(root, filepath.FromSlash(prog.Source)))
	}
	p = build("missing", BuildOptions{})
	for _, prog := range CPrograms {
		found := false
		for _, m := range p.Missing {
			found = found || m == prog.Source
		}
		if !found {
			t.Errorf("%s is not in the tree, but Missing = %v", prog.Source, p.Missing)
		}
	}
}

// TestCProgramsBuildClean builds the repository's own C programs exactly as the guest
// gets them (CFlags, static): no diagnostics, a static executable.
func TestCProgramsBuildClean(t *testing.T) {
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Fatalf("no gcc (%v): install build-essential (make setup)", err)
	}
	root, err := FindRepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, prog := range CPrograms {
		out := filepath.Join(t.TempDir(), prog.Name)
		args := append(append([]string{}, CFlags...), "-o", out, filepath.Join(root, filepath.FromSlash(prog.Source)))
		if text, err := exec.Command(gcc, args...).CombinedOutput(); err != nil || len(text) > 0 {
			t.Errorf("gcc %s: %v\n%s", strings.Join(args, " "), err, text)
			continue
		}
		if err := checkStatic(out); err != nil {
			t.Errorf("%s: %v", prog.Name, err)
		}
	}
}
