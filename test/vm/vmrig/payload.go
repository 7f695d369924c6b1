package vmrig

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// ModulePath is the module path of the repository the rig builds.
const ModulePath = "github.com/mmiobroker/mmiobroker"

// Programs are the binaries the guest gets when their packages exist: the project's
// daemon and CLI, the rig's demo importer and the systemd guest tests' lease holder.
var Programs = []string{"cmd/mmiobrokerd", "cmd/mmiobrokerctl", "test/vm/cmd/iommufd-import", "test/vm/cmd/mmb-holder", "test/vm/cmd/mmb-tenant"}

// CProgram is a one-file C program of the repository that the guest gets on its PATH,
// built by gcc with [CFlags].
type CProgram struct {
	Name   string // file name in the guest
	Source string // repository-relative path of the .c file
}

// CPrograms are the C programs the guest gets next to [Programs]: the claim protocol's C
// client (examples/c), which test/vm/e2e's TestClaimC runs against the daemon.
var CPrograms = []CProgram{{Name: "mmb-claim-c", Source: "examples/c/mmb-claim.c"}}

// CFlags are the flags of [CPrograms]: C11, every warning an error, and static, as the
// busybox guest has no C library.
var CFlags = []string{"-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-static"}

// SwapDaemon is the second build of cmd/mmiobrokerd that the payload carries for the
// systemd guest tests' binary swap (an upgrade: another binary installed at
// /usr/bin/mmiobrokerd, then a restart). Its link flags differ (-X of SwapDaemonStamp), so
// its Go build id and its content differ from mmiobrokerd's. Only the systemd image
// installs it.
const (
	SwapDaemon      = "mmiobrokerd-swap"
	SwapDaemonStamp = "main.mmbRigSwap=swap"
)

// Binary is one program or test binary built for the guest.
type Binary struct {
	Name    string // file name in the guest (tests: <name>.test under /tests)
	Package string // repository-relative package directory, e.g. internal/vfio
	Path    string // the built file on the host
}

// BuildFailure records a guest binary that did not compile.
type BuildFailure struct {
	Name    string
	Package string
	Output  string
}

// Payload is everything built from the repository for one guest image.
type Payload struct {
	Dir      string // directory holding the built files
	Tests    []Binary
	Programs []Binary
	Missing  []string // program packages not in the tree (yet)
	Failures []BuildFailure
	Took     time.Duration
}

// Program returns the built program with the given base name, if any.
func (p *Payload) Program(name string) (Binary, bool) {
	for _, b := range p.Programs {
		if b.Name == name {
			return b, true
		}
	}
	return Binary{}, false
}

// FindRepoRoot walks up from dir to the directory whose go.mod declares ModulePath.
func FindRepoRoot(dir string) (string, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module "+ModulePath+"\n")) {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod of %s above %s", ModulePath, dir)
		}
		d = parent
	}
}

// FindVMTestPackages returns the repository-relative directories of every package that
// has a *_vm_test.go file (the busybox boot mode's guest tests), sorted. testdata, vendor,
// bin and hidden directories are skipped.
func FindVMTestPackages(root string) ([]string, error) {
	return FindGuestTestPackages(root, Busybox)
}

// FindGuestTestPackages returns the packages with guest tests of boot mode b: files named
// *_vm_test.go for busybox, *_vmsd_test.go for systemd.
func FindGuestTestPackages(root string, b BootMode) ([]string, error) {
	suffix, _ := b.testSpec()
	seen := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if p != root && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") ||
				name == "testdata" || name == "vendor" || name == "bin" || name == "node_modules") {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(name, suffix) {
			rel, err := filepath.Rel(root, filepath.Dir(p))
			if err != nil {
				return err
			}
			seen[filepath.ToSlash(rel)] = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find %s guest test packages under %s: %w", b, root, err)
	}
	pkgs := make([]string, 0, len(seen))
	for p := range seen {
		pkgs = append(pkgs, p)
	}
	sort.Strings(pkgs)
	return pkgs, nil
}

// TestBinaryNames gives each package directory a short, unique binary name: the last path
// element (internal/vfio -> vfio), or the whole path with '-' separators where two packages
// share a last element.
func TestBinaryNames(pkgs []string) map[string]string {
	count := map[string]int{}
	for _, p := range pkgs {
		count[path.Base(p)]++
	}
	names := make(map[string]string, len(pkgs))
	for _, p := range pkgs {
		n := path.Base(p)
		if count[n] > 1 || p == "." {
			n = strings.ReplaceAll(strings.Trim(p, "./"), "/", "-")
			if n == "" {
				n = "root"
			}
		}
		names[p] = n
	}
	return names
}

// hasGoFiles reports whether dir holds at least one non-test .go file.
func hasGoFiles(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		n := e.Name()
		if !e.IsDir() && strings.HasSuffix(n, ".go") && !strings.HasSuffix(n, "_test.go") {
			return true
		}
	}
	return false
}

// BuildOptions configures BuildPayload.
type BuildOptions struct {
	Root string            // repository root
	Dir  string            // output directory (created)
	Go   string            // go command ("" = "go" from PATH)
	Log  func(msg string)  // progress lines (may be nil)
	Env  map[string]string // extra environment for the go command
	CC   string            // C compiler for CPrograms ("" = "gcc" from PATH)
	// Boot selects the guest tests: busybox (default) builds `go test -c -tags vmtest` of
	// every package with *_vm_test.go files, systemd `-tags vmsystemd` of *_vmsd_test.go.
	Boot BootMode
	// Programs, if not nil, are programs already built (for another boot mode) to reuse.
	Programs []Binary
}

// BuildPayload compiles the guest binaries: static builds (CGO_ENABLED=0) of the
// programs in Programs that exist, static gcc builds of CPrograms, and a test binary for
// every package with guest tests of the boot mode (vmtest: *_vm_test.go; vmsystemd:
// *_vmsd_test.go). A program or package that fails to compile (for a C program also: a
// warning, or no C compiler) is recorded in Failures and the rest are still built; only a
// failure to run the go command at all is an error.
func BuildPayload(ctx context.Context, opt BuildOptions) (*Payload, error) {
	start := time.Now()
	if opt.Go == "" {
		opt.Go = "go"
	}
	logf := func(format string, a ...any) {
		if opt.Log != nil {
			opt.Log(fmt.Sprintf(format, a...))
		}
	}
	if err := os.MkdirAll(filepath.Join(opt.Dir, "tests"), 0o755); err != nil {
		return nil, err
	}
	p := &Payload{Dir: opt.Dir}
	run := func(name, pkg string, args ...string) (bool, error) {
		cmd := exec.CommandContext(ctx, opt.Go, args...)
		cmd.Dir = opt.Root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		for k, v := range opt.Env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		out, err := cmd.CombinedOutput()
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		if err != nil {
			if _, ok := err.(*exec.ExitError); !ok {
				return false, fmt.Errorf("%s %s: %w", opt.Go, strings.Join(args, " "), err)
			}
			p.Failures = append(p.Failures, BuildFailure{Name: name, Package: pkg, Output: strings.TrimSpace(string(out))})
			logf("build %s: FAILED", pkg)
			return false, nil
		}
		return true, nil
	}
	ldflags := "-ldflags=-s -w"
	programs := Programs
	if opt.Programs != nil {
		p.Programs = opt.Programs
		programs = nil
	}
	for _, prog := range programs {
		name := path.Base(prog)
		if !hasGoFiles(filepath.Join(opt.Root, filepath.FromSlash(prog))) {
			p.Missing = append(p.Missing, prog)
			logf("build %s: not in the tree yet, skipped", prog)
			continue
		}
		out := filepath.Join(opt.Dir, name)
		logf("build %s", prog)
		ok, err := run(name, prog, "build", "-trimpath", ldflags, "-o", out, "./"+prog)
		if err != nil {
			return nil, err
		}
		if ok {
			p.Programs = append(p.Programs, Binary{Name: name, Package: prog, Path: out})
		}
		if ok && prog == "cmd/mmiobrokerd" {
			out := filepath.Join(opt.Dir, SwapDaemon)
			logf("build %s (-X %s)", prog, SwapDaemonStamp)
			ok, err := run(SwapDaemon, prog, "build", "-trimpath", ldflags+" -X "+SwapDaemonStamp, "-o", out, "./"+prog)
			if err != nil {
				return nil, err
			}
			if ok {
				p.Programs = append(p.Programs, Binary{Name: SwapDaemon, Package: prog, Path: out})
			}
		}
	}
	if opt.Programs == nil {
		for _, prog := range CPrograms {
			if err := buildC(ctx, opt, prog, p, logf); err != nil {
				return nil, err
			}
		}
	}
	boot := opt.Boot
	if boot == "" {
		boot = Busybox
	}
	_, tag := boot.testSpec()
	pkgs, err := FindGuestTestPackages(opt.Root, boot)
	if err != nil {
		return nil, err
	}
	names := TestBinaryNames(pkgs)
	for _, pkg := range pkgs {
		name := names[pkg]
		out := filepath.Join(opt.Dir, "tests", name+".test")
		logf("build %s (go test -c -tags %s)", pkg, tag)
		ok, err := run(name, pkg, "test", "-c", "-tags", tag, "-trimpath", ldflags, "-o", out, "./"+pkg)
		if err != nil {
			return nil, err
		}
		if ok {
			p.Tests = append(p.Tests, Binary{Name: name, Package: pkg, Path: out})
		}
	}
	p.Took = time.Since(start)
	return p, nil
}

// buildC compiles prog with CFlags into opt.Dir and adds it to p.Programs. A compiler that
// does not run, fails or prints anything (with -Werror every warning fails anyway) is a
// build failure in p.Failures; only ctx ending is an error.
func buildC(ctx context.Context, opt BuildOptions, prog CProgram, p *Payload, logf func(string, ...any)) error {
	src := filepath.Join(opt.Root, filepath.FromSlash(prog.Source))
	if _, err := os.Stat(src); err != nil {
		p.Missing = append(p.Missing, prog.Source)
		logf("build %s: not in the tree yet, skipped", prog.Source)
		return nil
	}
	cc := opt.CC
	if cc == "" {
		cc = "gcc"
	}
	out := filepath.Join(opt.Dir, prog.Name)
	args := append(append([]string{}, CFlags...), "-o", out, src)
	logf("build %s (%s %s)", prog.Source, cc, strings.Join(CFlags, " "))
	text, err := exec.CommandContext(ctx, cc, args...).CombinedOutput()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ee *exec.ExitError
	switch {
	case err != nil && !errors.As(err, &ee):
		text = []byte(fmt.Sprintf("cannot run the C compiler: %v (install build-essential: %s)", err, setupHint))
	case err == nil && len(bytes.TrimSpace(text)) > 0:
		text = append([]byte("gcc succeeded but printed diagnostics; the build must be clean:\n"), text...)
	case err == nil:
		p.Programs = append(p.Programs, Binary{Name: prog.Name, Package: prog.Source, Path: out})
		return nil
	}
	p.Failures = append(p.Failures, BuildFailure{Name: prog.Name, Package: prog.Source,
		Output: strings.TrimSpace(cc + " " + strings.Join(args, " ") + "\n" + string(text))})
	logf("build %s: FAILED", prog.Source)
	return nil
}
