package vmrig

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Module roots the stock guest needs. Their dependencies come from modules.dep (and
// modules.softdep), so nothing here breaks when Debian moves a symbol between modules.
var (
	// RequiredModules must load for the VFIO tests to mean anything.
	RequiredModules = []string{"vfio-pci", "vfio_iommu_type1"}
	// OptionalModules are loaded when the kernel ships them as modules: udmabuf for
	// dma-buf tests (Debian builds it in), kvm_amd for the KVM probes of GetHost (QEMU's
	// TCG -cpu max offers SVM, not VMX, so kvm_intel would fail to load).
	OptionalModules = []string{"udmabuf", "kvm_amd"}
)

// ModuleName normalizes a module name or path the way kmod does: base name without
// .ko[.xz|.zst|.gz], with '-' replaced by '_'.
func ModuleName(s string) string {
	s = filepath.Base(s)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		s = strings.TrimSuffix(s, ext)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// ModuleDB is a parsed modules.dep (+ modules.softdep) of one kernel.
type ModuleDB struct {
	Dir  string
	path map[string]string   // name -> path relative to Dir
	deps map[string][]string // name -> names of hard dependencies
	pre  map[string][]string // softdep pre:
	post map[string][]string // softdep post:
}

// LoadModuleDB reads dir/modules.dep and, if present, dir/modules.softdep.
func LoadModuleDB(dir string) (*ModuleDB, error) {
	dep, err := os.ReadFile(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("modules of %s: %w", dir, err)
	}
	soft, err := os.ReadFile(filepath.Join(dir, "modules.softdep"))
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("modules of %s: %w", dir, err)
	}
	db, err := ParseModuleDB(bytes.NewReader(dep), bytes.NewReader(soft))
	if err != nil {
		return nil, fmt.Errorf("modules of %s: %w", dir, err)
	}
	db.Dir = dir
	return db, nil
}

// ParseModuleDB parses modules.dep and modules.softdep text (softdep may be empty).
func ParseModuleDB(dep, softdep io.Reader) (*ModuleDB, error) {
	db := &ModuleDB{path: map[string]string{}, deps: map[string][]string{},
		pre: map[string][]string{}, post: map[string][]string{}}
	sc := bufio.NewScanner(dep)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: no colon in %q", n, line)
		}
		name := ModuleName(mod)
		db.path[name] = mod
		for _, d := range strings.Fields(rest) {
			db.deps[name] = append(db.deps[name], ModuleName(d))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	sc = bufio.NewScanner(softdep)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "softdep" {
			continue
		}
		name := ModuleName(f[1])
		var pre, post []string
		var list *[]string
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				list = &pre
			case "post:":
				list = &post
			default:
				if list != nil {
					*list = append(*list, ModuleName(w))
				}
			}
		}
		db.pre[name] = append(db.pre[name], pre...)
		db.post[name] = append(db.post[name], post...)
	}
	return db, sc.Err()
}

// Has reports whether the kernel ships module name as a loadable module.
func (db *ModuleDB) Has(name string) bool { _, ok := db.path[ModuleName(name)]; return ok }

// Path returns the path of module name relative to the modules directory.
func (db *ModuleDB) Path(name string) string { return db.path[ModuleName(name)] }

// LoadOrder returns the modules to insmod, dependencies first, for the required roots
// (an error if one is missing) and the optional ones the kernel has. Soft dependencies are
// honoured when the kernel has them.
func (db *ModuleDB) LoadOrder(required, optional []string) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		}
		state[name] = 1
		chain = append(chain, name)
		for _, d := range db.pre[name] {
			if db.Has(d) { // a soft dependency this kernel lacks is fine
				if err := visit(d, chain); err != nil {
					return err
				}
			}
		}
		for _, d := range db.deps[name] {
			if !db.Has(d) {
				return fmt.Errorf("module %s depends on %s, which modules.dep does not list", name, d)
			}
			if err := visit(d, chain); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name)
		for _, d := range db.post[name] {
			if db.Has(d) {
				if err := visit(d, chain); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for _, r := range required {
		n := ModuleName(r)
		if !db.Has(n) {
			return nil, fmt.Errorf("required module %s is not in modules.dep", n)
		}
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	for _, r := range optional {
		if n := ModuleName(r); db.Has(n) {
			if err := visit(n, nil); err != nil {
				return nil, err
			}
		}
	}
	return order, nil
}

// ReadModule returns the decompressed contents of module name (.ko, .ko.xz, .ko.zst or
// .ko.gz). xz and zstd are run as the host's xz and zstd tools.
func (db *ModuleDB) ReadModule(ctx context.Context, name string) ([]byte, error) {
	rel := db.Path(name)
	if rel == "" {
		return nil, fmt.Errorf("module %s: not in modules.dep", name)
	}
	p := filepath.Join(db.Dir, rel)
	var tool []string
	switch {
	case strings.HasSuffix(p, ".ko"):
		return os.ReadFile(p)
	case strings.HasSuffix(p, ".ko.gz"):
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", name, err)
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", name, err)
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(p, ".ko.xz"):
		tool = []string{"xz", "-dc", p}
	case strings.HasSuffix(p, ".ko.zst"):
		tool = []string{"zstd", "-dcq", p}
	default:
		return nil, fmt.Errorf("module %s: unknown compression of %s", name, p)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool[0], tool[1:]...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("module %s: %s: %w: %s", name, strings.Join(tool, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Names returns every module name in the database, sorted (for diagnostics and tests).
func (db *ModuleDB) Names() []string {
	n := make([]string, 0, len(db.path))
	for k := range db.path {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}
