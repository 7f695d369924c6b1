package vmrig

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Rig ties the pieces together for one repository checkout: the rig environment written
// by setup.sh, the payload built from the tree, and one initramfs per guest kernel.
type Rig struct {
	Root     string // repository root
	Env      Env
	CacheDir string
	LogDir   string                // serial logs (default Root/bin/vm-logs)
	Log      func(string)          // progress lines (may be nil)
	QEMU     string                // default qemu-system-x86_64
	Level    int                   // initramfs zstd level; negative: uncompressed (see ImageOptions)
	payloads map[BootMode]*Payload // built once per Rig and boot mode
	workDir  string                // holds the payloads
	images   map[imageKey]*Image
}

type imageKey struct {
	boot   BootMode
	kernel Kernel
}

// Open finds the repository around dir and reads the rig environment. It fails, saying
// how to fix it, when setup.sh has not run. MMIOBROKER_VM_COMPRESS=none keeps the
// initramfs uncompressed.
func Open(dir string) (*Rig, error) {
	root, err := FindRepoRoot(dir)
	if err != nil {
		return nil, err
	}
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	env, err := LoadEnv()
	if err != nil {
		return nil, err
	}
	r := &Rig{Root: root, Env: env, CacheDir: cache, LogDir: filepath.Join(root, "bin", "vm-logs"),
		images: map[imageKey]*Image{}, payloads: map[BootMode]*Payload{}}
	if os.Getenv("MMIOBROKER_VM_COMPRESS") == "none" {
		r.Level = -1
	}
	return r, nil
}

func (r *Rig) logf(format string, a ...any) {
	if r.Log != nil {
		r.Log(fmt.Sprintf(format, a...))
	}
}

// Close removes the built payload.
func (r *Rig) Close() error {
	if r.workDir != "" {
		return os.RemoveAll(r.workDir)
	}
	return nil
}

// Payload builds the busybox boot mode's guest binaries from the tree once and returns them.
func (r *Rig) Payload(ctx context.Context) (*Payload, error) {
	return r.PayloadFor(ctx, Busybox)
}

// PayloadFor builds the guest binaries of boot mode b from the tree once and returns them.
// The programs are built once for all boot modes.
func (r *Rig) PayloadFor(ctx context.Context, b BootMode) (*Payload, error) {
	if p := r.payloads[b]; p != nil {
		return p, nil
	}
	if r.workDir == "" {
		dir, err := os.MkdirTemp("", "mmbvm-payload-")
		if err != nil {
			return nil, err
		}
		r.workDir = dir
	}
	opt := BuildOptions{Root: r.Root, Dir: filepath.Join(r.workDir, string(b)), Log: r.Log, Boot: b}
	for _, other := range r.payloads {
		if other.Programs != nil {
			opt.Programs = other.Programs
		}
	}
	p, err := BuildPayload(ctx, opt)
	if err != nil {
		return nil, err
	}
	r.logf("payload (%s): %d test binaries, programs %v, missing %v, %d build failures (%.1fs)",
		b, len(p.Tests), names(p.Programs), p.Missing, len(p.Failures), p.Took.Seconds())
	r.payloads[b] = p
	return p, nil
}

func names(bs []Binary) []string {
	n := make([]string, len(bs))
	for i, b := range bs {
		n[i] = b.Name
	}
	return n
}

// Image returns the busybox initramfs of kernel k (built or from the cache) and the kernel
// itself.
func (r *Rig) Image(ctx context.Context, k Kernel) (KernelImage, *Image, error) {
	return r.ImageFor(ctx, Busybox, k)
}

// ImageFor returns the initramfs of boot mode b for kernel k (built or from the cache) and
// the kernel itself.
func (r *Rig) ImageFor(ctx context.Context, b BootMode, k Kernel) (KernelImage, *Image, error) {
	ki, err := r.Env.Kernel(k)
	if err != nil {
		return ki, nil, err
	}
	if img, ok := r.images[imageKey{b, k}]; ok {
		return ki, img, nil
	}
	var base, bb string
	switch b {
	case Systemd:
		base, err = r.Env.SystemdBase()
	case Busybox:
		bb, err = r.Env.BusyboxPath()
	default:
		err = fmt.Errorf("unknown boot mode %q", b)
	}
	if err != nil {
		return ki, nil, err
	}
	p, err := r.PayloadFor(ctx, b)
	if err != nil {
		return ki, nil, err
	}
	var img *Image
	if b == Systemd {
		img, err = BuildSystemdImage(ctx, SystemdImageOptions{Kernel: ki, Base: base, DeployDir: filepath.Join(r.Root, "deploy"),
			Payload: p, CacheDir: r.CacheDir, Level: r.Level})
	} else {
		img, err = BuildImage(ctx, ImageOptions{Kernel: ki, Busybox: bb, Payload: p, CacheDir: r.CacheDir, Level: r.Level})
	}
	if err != nil {
		return ki, nil, err
	}
	how := "built"
	if img.Cached {
		how = "cached"
	}
	r.logf("initramfs %s/%s: %s %s (%.1f MB, %.1fs), modules %v", k, b, how, img.Path, float64(img.Size)/1e6, img.Took.Seconds(), img.Modules)
	r.images[imageKey{b, k}] = img
	return ki, img, nil
}

// RunOptions configures Run.
type RunOptions struct {
	Boot        BootMode // default Busybox
	Mode        Mode
	Topology    Topology
	Run         string   // -test.run in the guest
	Bench       string   // -test.bench in the guest ("" = no benchmarks)
	BenchTime   string   // -test.benchtime in the guest ("" = the default, 1s)
	Tests       []string // only these test binaries
	Timeout     time.Duration
	BootTimeout time.Duration
	TestTimeout time.Duration
	Soak        int    // kill -9 restarts of the systemd guest's soak test (0: its short default)
	Retries     int    // infrastructure-failure retries (default 1; -1 for none)
	LogName     string // log file base name (default "<kernel>-<mode>[-flat]")
	Transcript  io.Writer
	Progress    func(string)
}

// Report is the result of Run: the last attempt's outcome plus what came before it.
type Report struct {
	Kernel   Kernel
	Boot     BootMode
	Image    *Image
	Payload  *Payload
	Outcome  *Outcome
	Attempts []*Outcome // every attempt, the last one is Outcome
	Infra    string     // non-empty if the last attempt still was an infrastructure failure
}

// Failed reports whether anything failed: infrastructure, a build, a check, a test.
func (rep *Report) Failed() bool {
	return rep.Infra != "" || rep.Payload != nil && len(rep.Payload.Failures) > 0 || rep.Outcome.Failed()
}

// Run boots kernel k and runs the payload, retrying once (by default) when the guest died
// before it ran anything. The serial log of each attempt stays in LogDir.
func (r *Rig) Run(ctx context.Context, k Kernel, opt RunOptions) (*Report, error) {
	if opt.Boot == "" {
		opt.Boot = Busybox
	}
	ki, img, err := r.ImageFor(ctx, opt.Boot, k)
	if err != nil {
		return nil, err
	}
	if opt.Mode == "" {
		opt.Mode = ModeTests
	}
	if opt.LogName == "" {
		opt.LogName = fmt.Sprintf("%s-%s", k, opt.Mode)
		if opt.Boot != Busybox {
			opt.LogName = fmt.Sprintf("%s-%s-%s", k, opt.Boot, opt.Mode)
		}
		if opt.Topology == Flat {
			opt.LogName += "-flat"
		}
	}
	retries := opt.Retries
	if retries == 0 {
		retries = 1
	} else if retries < 0 {
		retries = 0
	}
	rep := &Report{Kernel: k, Boot: opt.Boot, Image: img, Payload: r.payloads[opt.Boot]}
	err = retryInfra(ctx, retries, func(attempt int) (*Outcome, error) {
		logPath := filepath.Join(r.LogDir, opt.LogName+".log")
		if attempt > 0 {
			logPath = filepath.Join(r.LogDir, fmt.Sprintf("%s.retry%d.log", opt.LogName, attempt))
		}
		o, err := Boot(ctx, MachineConfig{QEMU: r.QEMU, Kernel: ki, Initrd: img.Path, Boot: opt.Boot, Mode: opt.Mode,
			Topology: opt.Topology, Run: opt.Run, Bench: opt.Bench, BenchTime: opt.BenchTime, Tests: opt.Tests, Timeout: opt.Timeout,
			BootTimeout: opt.BootTimeout, TestTimeout: opt.TestTimeout, Soak: opt.Soak, LogPath: logPath,
			Transcript: opt.Transcript, Progress: opt.Progress})
		if err == nil {
			if infra := o.InfraFailure(); infra != "" && attempt < retries {
				r.logf("%s: infrastructure failure, retrying: %s (log %s)", k, infra, logPath)
			}
		}
		return o, err
	}, rep)
	if err != nil {
		return nil, err
	}
	return rep, nil
}

// retryInfra calls boot until it returns an outcome that is not an infrastructure
// failure, at most retries+1 times, and records the attempts in rep.
func retryInfra(ctx context.Context, retries int, boot func(attempt int) (*Outcome, error), rep *Report) error {
	for attempt := 0; ; attempt++ {
		o, err := boot(attempt)
		if err != nil {
			return err
		}
		rep.Attempts = append(rep.Attempts, o)
		rep.Outcome = o
		rep.Infra = o.InfraFailure()
		if rep.Infra == "" || attempt >= retries || ctx.Err() != nil {
			return nil
		}
	}
}

// WriteText prints a report the way `go test -v` would, plus the rig's checks and timings.
func (rep *Report) WriteText(w io.Writer, verbose bool) {
	o := rep.Outcome
	fmt.Fprintf(w, "== %s kernel %s (%s): boot to /init %.1fs, ready %.1fs, total %.1fs (attempts %d)%s\n",
		rep.Kernel, o.KernelRelease, rep.Boot, o.InitAt.Seconds(), o.ReadyAt.Seconds(), o.Total.Seconds(), len(rep.Attempts), o.GuestTimes())
	if rep.Infra != "" {
		fmt.Fprintf(w, "INFRASTRUCTURE FAILURE: %s\n", rep.Infra)
		writeTail(w, o)
	}
	for _, f := range rep.buildFailures() {
		fmt.Fprintf(w, "--- FAIL: build %s\n%s\n", f.Package, indent(f.Output, "    "))
	}
	for _, c := range o.Checks {
		if verbose || c.Status == "fail" {
			fmt.Fprintf(w, "rig check %-22s %-4s %s\n", c.Name, c.Status, c.Detail)
		}
	}
	for _, b := range o.Binaries {
		p, f, s, n := b.Counts()
		status := "ok  "
		if b.Failed() {
			status = "FAIL"
		}
		fmt.Fprintf(w, "%s %s: %d passed, %d failed, %d skipped, %d without result\n", status, b.Name, p, f, s, n)
		var walk func([]*TestCase, string, string)
		walk = func(l []*TestCase, parent, ind string) {
			for _, tc := range l {
				st := string(tc.Status)
				if st == "" {
					st = "NO RESULT"
				}
				if verbose || tc.Status == Fail || tc.Status == NoResult {
					fmt.Fprintf(w, "%s--- %s: %s (%s)\n", ind, st, tc.Name, tc.Elapsed)
					if tc.Status != Pass || verbose {
						for _, l := range tc.Output {
							fmt.Fprintf(w, "%s    %s\n", ind, strings.TrimSpace(l))
						}
					}
				}
				walk(tc.Subtests, tc.Name, ind+"    ")
			}
		}
		walk(b.Tests, "", "    ")
		if probs := b.Problems(); len(probs) > 0 {
			for _, p := range probs {
				fmt.Fprintf(w, "    problem: %s\n", p)
			}
			for _, l := range b.Output {
				fmt.Fprintf(w, "    | %s\n", l)
			}
		}
	}
	if rep.Infra == "" {
		for _, p := range o.Problems() {
			fmt.Fprintf(w, "problem: %s\n", p)
		}
		if len(o.Panic) > 0 {
			fmt.Fprintf(w, "kernel panic:\n%s\n", indent(strings.Join(o.Panic, "\n"), "    "))
		}
	}
	for _, wl := range o.Warnings {
		fmt.Fprintf(w, "kernel warning: %s\n", wl)
	}
	fmt.Fprintf(w, "serial log: %s\n", o.LogPath)
}

func writeTail(w io.Writer, o *Outcome) {
	if len(o.Tail) == 0 {
		return
	}
	tail := o.Tail
	if len(tail) > 25 {
		tail = tail[len(tail)-25:]
	}
	fmt.Fprintf(w, "last console lines:\n%s\n", indent(strings.Join(tail, "\n"), "    "))
}

func indent(s, prefix string) string {
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix)
}

func (rep *Report) buildFailures() []BuildFailure {
	if rep.Payload == nil {
		return nil
	}
	return rep.Payload.Failures
}
