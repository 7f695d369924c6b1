package vm_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/test/vm/vmrig"
)

// TestVM boots each guest kernel once per boot mode, runs the mode's guest test binaries
// inside it and reports each guest test as a subtest. Boot mode busybox (the vmtest
// binaries) is TestVM/<kernel>/<binary>/<TestName>[/<subtest>...], boot mode systemd (real
// systemd as PID 1 with deploy/'s units, the vmsystemd binaries) is
// TestVM/<kernel>-systemd/<binary>/<TestName>. The rig's own checks (modules loaded,
// devices bound to vfio-pci, bus reset available, the ivshmem BAR visible in its host
// file; under systemd also no failed unit) are TestVM/<kernel>[-systemd]/rig/<check>.
//
// Environment: MMIOBROKER_VM=1 enables it; MMIOBROKER_VM_KERNELS="stock iommufd" (default
// both) picks kernels; MMIOBROKER_VM_MODES="busybox,systemd" (default both) picks boot
// modes; MMIOBROKER_VM_RUN is passed to the guest binaries as -test.run;
// MMIOBROKER_VM_TESTS="vfio,dmabuf" runs only those binaries; MMIOBROKER_VM_TOPOLOGY=flat
// puts the devices on the root bus; MMIOBROKER_VM_BENCH and MMIOBROKER_VM_BENCHTIME set
// the benchmark smoke test (see benchSmoke).
func TestVM(t *testing.T) {
	if os.Getenv("MMIOBROKER_VM") != "1" {
		t.Skip("real-kernel VM tests are off; enable them with `make test-vm` " +
			"(or test/vm/setup.sh, then MMIOBROKER_VM=1 go test ./test/vm/)")
	}
	ctx := t.Context()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-30*time.Second))
		t.Cleanup(cancel) // after the parallel suites too
	}
	r, err := vmrig.Open(".")
	if err != nil {
		t.Fatalf("rig: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	r.Log = func(s string) { fmt.Printf("vm: %s\n", s) }

	kernels := vmrig.Kernels
	if s := os.Getenv("MMIOBROKER_VM_KERNELS"); s != "" {
		kernels = nil
		for _, f := range strings.Fields(strings.ReplaceAll(s, ",", " ")) {
			k, err := vmrig.ParseKernel(f)
			if err != nil {
				t.Fatalf("MMIOBROKER_VM_KERNELS: %v", err)
			}
			kernels = append(kernels, k)
		}
	}
	modes := vmrig.BootModes
	if s := os.Getenv("MMIOBROKER_VM_MODES"); s != "" {
		modes = nil
		for _, f := range strings.Fields(strings.ReplaceAll(s, ",", " ")) {
			m, err := vmrig.ParseBootMode(f)
			if err != nil {
				t.Fatalf("MMIOBROKER_VM_MODES: %v", err)
			}
			modes = append(modes, m)
		}
	}
	opts := vmrig.RunOptions{Run: os.Getenv("MMIOBROKER_VM_RUN")}
	if s := os.Getenv("MMIOBROKER_VM_TESTS"); s != "" {
		opts.Tests = strings.Split(s, ",")
	}
	if s := os.Getenv("MMIOBROKER_VM_TOPOLOGY"); s != "" {
		opts.Topology = vmrig.Topology(s)
	}
	bench, benchTime := benchSmoke, benchSmokeTime
	if s, ok := os.LookupEnv("MMIOBROKER_VM_BENCH"); ok {
		bench = s
	} else if opts.Run != "" {
		bench = "" // the tests someone picked, and no benchmarks unless asked for
	}
	if bench == "none" {
		bench = ""
	}
	if s := os.Getenv("MMIOBROKER_VM_BENCHTIME"); s != "" {
		benchTime = s
	}
	if s := os.Getenv("MMIOBROKER_VM_SOAK"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("MMIOBROKER_VM_SOAK=%q: want the number of kill -9 restarts of the soak", s)
		}
		opts.Soak = n
	}
	// Build every image first, one at a time (the rig's image and payload caches are not
	// for concurrent use); a failure is reported by the suite that needs the image.
	type suite struct {
		mode vmrig.BootMode
		k    vmrig.Kernel
	}
	imageErr := map[suite]error{}
	for _, mode := range modes {
		for _, k := range kernels {
			if _, _, err := r.ImageFor(ctx, mode, k); err != nil {
				imageErr[suite{mode, k}] = err
			}
		}
	}
	for _, mode := range modes {
		for _, k := range kernels {
			name := string(k)
			if mode != vmrig.Busybox {
				name += "-" + string(mode)
			}
			t.Run(name, func(t *testing.T) {
				if mode == vmrig.Systemd && len(kernels) > 1 {
					// The systemd suites take minutes each: the two kernels' guests run
					// side by side (one vCPU each; the host has two cores), after the
					// short busybox suites.
					t.Parallel()
				}
				if err := imageErr[suite{mode, k}]; err != nil {
					t.Fatalf("rig: %v", err)
				}
				start := time.Now()
				opts := opts
				opts.Boot = mode
				if mode == vmrig.Busybox {
					opts.Bench, opts.BenchTime = bench, benchTime
				}
				rep, err := r.Run(ctx, k, opts)
				if err != nil {
					t.Fatalf("rig: %v", err)
				}
				o := rep.Outcome
				fmt.Printf("vm: %s: kernel %s: /init marker after %.1fs, ready after %.1fs, tests done after %.1fs, %d attempt(s), %.1fs with build%s; serial log %s\n",
					name, o.KernelRelease, o.InitAt.Seconds(), o.ReadyAt.Seconds(), o.Total.Seconds(), len(rep.Attempts),
					time.Since(start).Seconds(), o.GuestTimes(), o.LogPath)
				report(t, rep, opts)
			})
		}
	}
}

// The benchmark smoke test: the busybox guests run the real-kernel benchmarks of
// test/vm/e2e (BenchmarkVM*) after the tests of their binary, in the boot the e2e tests
// have anyway, so that a benchmark that breaks fails TestVM (TestVM/<kernel>/e2e/<name>),
// and so does a suite where none ran. Their speed fails nothing; `make bench`
// (test/vm/cmd/rig bench) measures them. -benchtime 1x runs each once with one
// iteration: its setup, timed operation, teardown and report (about 2 s per kernel under
// TCG). 3x would run each twice (one iteration, then three) with twice the daemon starts:
// 5-11 s per kernel measured on the shared 2-CPU host.
// MMIOBROKER_VM_BENCH replaces the -test.bench regex ("none": no benchmarks),
// MMIOBROKER_VM_BENCHTIME the -test.benchtime; with MMIOBROKER_VM_RUN set, benchmarks run
// only if MMIOBROKER_VM_BENCH is set too.
const (
	benchSmoke     = "^BenchmarkVM"
	benchSmokeTime = "1x"
)

// ranBenchmark reports whether a benchmark of b ran and passed (a skipped one did not
// run).
func ranBenchmark(b *vmrig.BinaryResult) bool {
	ran := false
	b.Walk(func(tc *vmrig.TestCase) {
		ran = ran || strings.HasPrefix(tc.Name, "Benchmark") && tc.Status == vmrig.Pass
	})
	return ran
}

// report turns one run into subtests and failures of t.
func report(t *testing.T, rep *vmrig.Report, opts vmrig.RunOptions) {
	o := rep.Outcome
	defer func() {
		if t.Failed() {
			t.Logf("serial log (kernel console and guest output): %s", o.LogPath)
		}
	}()
	if rep.Infra != "" {
		tail := o.Tail
		if len(tail) > 30 {
			tail = tail[len(tail)-30:]
		}
		t.Fatalf("infrastructure failure (%d attempts): %s\nlast console lines:\n  %s",
			len(rep.Attempts), rep.Infra, strings.Join(tail, "\n  "))
	}
	t.Run("rig", func(t *testing.T) {
		for _, c := range o.Checks {
			t.Run(c.Name, func(t *testing.T) {
				switch c.Status {
				case "fail":
					t.Error(c.Detail)
				case "skip":
					t.Skip(c.Detail)
				default:
					t.Log(c.Detail)
				}
			})
		}
	})
	if rep.Payload != nil {
		for _, f := range rep.Payload.Failures {
			t.Run(f.Name, func(t *testing.T) {
				t.Errorf("%s does not build for the guest:\n%s", f.Package, f.Output)
			})
		}
	}
	ran := map[string]bool{}
	for _, b := range o.Binaries {
		if b.Name == "vfio" && rep.Boot == vmrig.Busybox {
			checkK9FromHost(t, b, o.Ivshmem)
		}
		if b.Name == "systemd" && rep.Boot == vmrig.Systemd && rep.Kernel == vmrig.IOMMUFD {
			checkRestartDMAFromHost(t, b, o.Ivshmem)
		}
		if b.Name == "dravm" && rep.Boot == vmrig.Busybox && rep.Kernel == vmrig.IOMMUFD {
			checkDRAFromHost(t, b, o.Ivshmem)
		}
		ran[b.Name] = true
		t.Run(b.Name, func(t *testing.T) {
			reportTests(t, b.Tests, "")
			if b.Name == "e2e" && opts.Bench == benchSmoke && !ranBenchmark(b) {
				t.Errorf("no benchmark matching -test.bench %q ran", opts.Bench)
			}
			if probs := b.Problems(); len(probs) > 0 {
				for _, p := range probs {
					t.Error(p)
				}
				t.Logf("output of %s outside any test:\n  %s", b.Name, strings.Join(b.Output, "\n  "))
			}
		})
	}
	want := rep.Image.Tests
	if len(opts.Tests) > 0 {
		want = opts.Tests
	}
	for _, name := range want {
		if !ran[name] {
			t.Run(name, func(t *testing.T) {
				t.Error("never ran: the guest stopped before this binary began")
			})
		}
	}
	for _, p := range o.Problems() {
		t.Error(p)
	}
	if len(o.Panic) > 0 {
		t.Logf("guest kernel panic:\n  %s", strings.Join(o.Panic, "\n  "))
	}
	for _, w := range o.Warnings {
		t.Logf("guest kernel warning: %s", w)
	}
}

// reportTests mirrors guest tests as subtests of t, with their output and status.
func reportTests(t *testing.T, tests []*vmrig.TestCase, parent string) {
	for _, tc := range tests {
		t.Run(tc.Leaf(parent), func(t *testing.T) {
			for _, l := range tc.Output {
				t.Log(strings.TrimSpace(l))
			}
			reportTests(t, tc.Subtests, tc.Name)
			switch tc.Status {
			case vmrig.Fail:
				if tc.Elapsed == "" { // a benchmark: its FAIL line has no duration
					t.Errorf("guest benchmark %s failed", tc.Name)
				} else {
					t.Errorf("guest test %s failed (%s)", tc.Name, tc.Elapsed)
				}
			case vmrig.Skip:
				t.SkipNow()
			case vmrig.NoResult:
				t.Errorf("guest test %s started but never reported a result (crash, kernel panic or timeout)", tc.Name)
			}
		})
	}
}

// checkK9FromHost checks, on the host, what internal/vfio's TestK9PeerToPeerDMA made a
// device write into the ivshmem BAR through the IOMMU: the ivshmem BAR2 is this host
// file, so the DMA that landed is visible here and the one issued after the revoke is not.
func checkK9FromHost(t *testing.T, b *vmrig.BinaryResult, shm []byte) {
	var k9 *vmrig.TestCase
	for _, tc := range b.Tests {
		if tc.Name == "TestK9PeerToPeerDMA" {
			k9 = tc
		}
	}
	if k9 == nil || k9.Status != vmrig.Pass {
		return // skipped (stock kernel) or failed in the guest: reported there
	}
	t.Run("K9HostSeesDMA", func(t *testing.T) {
		for _, c := range []struct {
			off  int
			want string
		}{{0x20000, "MMB-K9-P2P-DMA-LANDED"}, {0x21000, "MMB-K9-REISSUED-LANDED"}} {
			if len(shm) < c.off+len(c.want) || string(shm[c.off:c.off+len(c.want)]) != c.want {
				t.Errorf("ivshmem backing file at %#x lacks %q", c.off, c.want)
			}
		}
		if bytes.Contains(shm, []byte("MMB-K9-REVOKED")) {
			t.Error("the DMA issued after the revoke landed in the ivshmem backing file")
		}
	})
}

// checkDRAFromHost checks, on the host, that the DMA internal/dra/dravm's
// TestVMDelegatedLease had the pod's process do through its delegated lease (claimed with
// nothing but the CDI spec's environment and mounts) landed in the ivshmem BAR, this host
// file.
func checkDRAFromHost(t *testing.T, b *vmrig.BinaryResult, shm []byte) {
	for _, tc := range b.Tests {
		if tc.Name != "TestVMDelegatedLease" || tc.Status != vmrig.Pass {
			continue // failed in the guest: reported there
		}
		t.Run("DRAHostSeesDMA", func(t *testing.T) {
			const off, want = 0x60000, "MMB-DRA-P2P-LANDED"
			if len(shm) < off+len(want) || string(shm[off:off+len(want)]) != want {
				t.Errorf("ivshmem backing file at %#x lacks %q", off, want)
			}
		})
	}
}

// restartDMAModes and restartDMAOffset mirror test/vm/systemd's TestRestartModes: before
// the first restart and after each way of replacing the daemon, its ivshmem holder has the
// edu DMA "MMB-RESTART-<mode>" through its IOAS mapping of the brokered BAR2 dma-buf
// (made once, before the first restart), one page apart from restartDMAOffset.
var restartDMAModes = []string{"BEFORE", "RESTART", "KILL", "SWAP", "STOP-REACTIVATE"}

const restartDMAOffset = 0x40000

// checkRestartDMAFromHost checks, on the host, that every peer-to-peer DMA of
// TestRestartModes landed in the ivshmem BAR (its host backing file): the mapping of the
// dma-buf taken before the restarts still reached the device memory after each of them.
func checkRestartDMAFromHost(t *testing.T, b *vmrig.BinaryResult, shm []byte) {
	var tc *vmrig.TestCase
	for _, c := range b.Tests {
		if c.Name == "TestRestartModes" {
			tc = c
		}
	}
	if tc == nil || tc.Status != vmrig.Pass {
		return // not run, skipped or failed in the guest: reported there
	}
	t.Run("RestartModesHostSeesDMA", func(t *testing.T) {
		for i, m := range restartDMAModes {
			off, want := restartDMAOffset+i*0x1000, "MMB-RESTART-"+m
			if len(shm) < off+len(want) || string(shm[off:off+len(want)]) != want {
				got := ""
				if len(shm) >= off+len(want) {
					got = fmt.Sprintf(" (found %q)", shm[off:off+len(want)])
				}
				t.Errorf("ivshmem backing file at %#x lacks %q%s", off, want, got)
			} else {
				t.Logf("ivshmem backing file at %#x: %q", off, want)
			}
		}
	})
}
