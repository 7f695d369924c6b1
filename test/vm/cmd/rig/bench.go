package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/mmiobroker/mmiobroker/test/vm/vmrig"
)

// rig bench: the real-kernel benchmarks of test/vm/e2e on each guest kernel, their result
// lines on stdout (go test format, as rig run -bench prints them) and a generated Markdown
// table of them (docs/benchmarks-vm.md).

const (
	benchRegex       = "^BenchmarkVM"
	benchDoc         = "docs/benchmarks-vm.md"
	benchTimeDefault = "2s"
	// benchTimeout limits a bench boot; its test binary gets all but two minutes of it
	// (-test.timeout): at -benchtime 2s the benchmarks take about 1.5 minutes under TCG.
	benchTimeout = 15 * time.Minute
	// leaseVsSelfBlock is test/vm/e2e's block size of BenchmarkVMLeaseVsSelf.
	leaseVsSelfBlock = 8
)

type benchOptions struct {
	kernels   []vmrig.Kernel
	topology  vmrig.Topology
	timeout   time.Duration
	bench     string
	benchTime string
	out       string
	verbose   bool
	args      []string // the command line after "rig", for the document
}

// kernelBench is one kernel's benchmark run.
type kernelBench struct {
	Kernel  vmrig.Kernel
	Release string
	Device  string // the benchmarks' device (BDF)
	Results map[string]benchResult
	Lines   []string // the result lines, as printed
	// Load is the host's 1-minute load average before and after the boot (/proc/loadavg):
	// the guest's one vCPU is a host thread that shares the host's CPUs.
	Load [2]string
}

// benchResult is one benchmark's result line.
type benchResult struct {
	Name    string
	N       int
	Metrics map[string]float64 // by unit: ns/op, p50-µs, ...
}

// runBench boots each kernel, runs the e2e binary's benchmarks (no tests), prints the
// report to stderr and only the result lines to stdout (for bench/results.txt), and writes
// the document unless a run failed.
func runBench(ctx context.Context, r *vmrig.Rig, o benchOptions, stdout, stderr io.Writer) error {
	if o.bench == "" {
		o.bench = benchRegex
	}
	var runs []kernelBench
	failed := false
	start := time.Now()
	for _, k := range o.kernels {
		load0 := loadAverage()
		rep, err := r.Run(ctx, k, vmrig.RunOptions{Topology: o.topology, Timeout: o.timeout,
			TestTimeout: max(o.timeout-2*time.Minute, time.Minute), Run: "^$",
			Bench: o.bench, BenchTime: o.benchTime, Tests: []string{"e2e"}})
		if err != nil {
			return err
		}
		rep.WriteText(stderr, o.verbose)
		writeBenchmarks(stdout, k, rep)
		if rep.Failed() {
			failed = true
			continue
		}
		kb := kernelBench{Kernel: k, Release: rep.Outcome.KernelRelease, Device: rep.Outcome.Env["MMIOBROKER_VM_IVSHMEM"],
			Results: map[string]benchResult{}, Load: [2]string{load0, loadAverage()}}
		for _, b := range rep.Outcome.Binaries {
			b.Walk(func(tc *vmrig.TestCase) {
				for _, l := range tc.Output {
					if res, ok := parseBenchLine(l); ok {
						kb.Results[res.Name] = res
						kb.Lines = append(kb.Lines, strings.TrimSpace(l))
					}
				}
			})
		}
		if len(kb.Results) == 0 {
			fmt.Fprintf(stderr, "rig bench: %s: no benchmark matching %q reported a result\n", k, o.bench)
			failed = true
		}
		runs = append(runs, kb)
	}
	if failed {
		fmt.Fprintln(stderr, "FAIL")
		if o.out != "" {
			fmt.Fprintf(stderr, "rig bench: a run failed; %s not written\n", o.out)
		}
		return exitError(1)
	}
	fmt.Fprintln(stderr, "PASS")
	if o.out == "" {
		return nil
	}
	doc := renderBenchDoc(benchDocInput{
		Bench:     o.bench,
		BenchTime: o.benchTime,
		Date:      start.UTC(),
		Host:      hostDescription(r.QEMU),
		Tree:      treeDescription(r.Root),
		Command:   commandLine(o.args),
		Runs:      runs,
	})
	tmp := o.out + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, o.out); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "rig bench: wrote %s\n", o.out)
	return nil
}

var reBenchLine = regexp.MustCompile(`^(Benchmark\S*)\s+(\d+)\s+(.*\sns/op.*)$`)

// parseBenchLine parses a go test benchmark result line: name (without a -GOMAXPROCS
// suffix), iterations, and each "value unit" pair.
func parseBenchLine(l string) (benchResult, bool) {
	m := reBenchLine.FindStringSubmatch(strings.TrimSpace(l))
	if m == nil {
		return benchResult{}, false
	}
	n, err := strconv.Atoi(m[2])
	if err != nil {
		return benchResult{}, false
	}
	name := m[1]
	if i := strings.LastIndexByte(name, '-'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			name = name[:i]
		}
	}
	res := benchResult{Name: name, N: n, Metrics: map[string]float64{}}
	f := strings.Fields(m[3])
	for i := 0; i+1 < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			return benchResult{}, false
		}
		res.Metrics[f[i+1]] = v
	}
	return res, true
}

type benchDocInput struct {
	Bench     string // -test.bench
	BenchTime string // -test.benchtime
	Date      time.Time
	Host      string
	Tree      string
	Command   string
	Runs      []kernelBench
}

// benchRow is one row of a kernel's table: a benchmark, or one step of one (metric
// prefix).
type benchRow struct {
	label, what, bench, step string
}

// The rows of a kernel's table, in order. The first is the floor (× bare ioctl), the
// third the VMM alone (× VMM alone).
var benchRows = []benchRow{
	{"bare ioctl", "VFIO_DEVICE_GET_REGION_INFO on an open device", "BenchmarkVMIoctlBare", ""},
	{"export only", "VFIO_DEVICE_FEATURE_DMA_BUF of the range, device opened before: the kernel's floor of the export", "BenchmarkVMExportOnly", ""},
	{"**VMM alone: open + export**", "the VMM opens the device as mmiobrokerd does (hostdev.Open: VFIO open, memory decode on, notifiers) and exports the range, until the fd is in hand", "BenchmarkVMExportSelf", ""},
	{"**brokered lease**", "AllocateLease + claim until the fd is in hand (client.Allocate on a connected client)", "BenchmarkVMLease/brokered", ""},
	{"brokered lease with client.Dial", "a VMM's first lease: client.Dial, then AllocateLease + claim until the fd is in hand", "BenchmarkVMLease/dial", ""},
	{"· bare gRPC call", "grpc.health.v1.Health/Check to the daemon (the floor of any call to it)", "BenchmarkVMLease/steps", "grpc"},
	{"· AllocateLease", "AllocateLease alone", "BenchmarkVMLease/steps", "allocate"},
	{"· claim", "the claim alone: connect to the claim socket, token, fd by SCM_RIGHTS", "BenchmarkVMLease/steps", "claim"},
	{"brokered lease, alternately", "as brokered lease, in blocks alternating with the next row's (the target's pair)", "BenchmarkVMLeaseVsSelf", "brokered"},
	{"VMM alone, alternately", "as VMM alone, in blocks alternating with the previous row's", "BenchmarkVMLeaseVsSelf", "self"},
	{"revoke", "RevokeLease (broker in process) until the fd is dead for good and 1 survivor reissued", "BenchmarkVMRevoke", ""},
	{"holder exit", "SIGKILL of a holder until its fd is dead and the survivor reissued", "BenchmarkVMHolderExit", ""},
	{"device cycle", "memory decode off, device fd closed and reopened, decode on", "BenchmarkVMDeviceCycle", ""},
}

// stat returns a row's statistic in µs ("p50", "p99" or "mean"), if measured.
func (kb kernelBench) stat(row benchRow, which string) (float64, bool) {
	res, ok := kb.Results[row.bench]
	if !ok {
		return 0, false
	}
	if which == "mean" {
		if row.step != "" {
			return 0, false
		}
		v, ok := res.Metrics["ns/op"]
		return v / 1e3, ok
	}
	unit := which + "-µs"
	if row.step != "" {
		unit = row.step + "-" + unit
	}
	v, ok := res.Metrics[unit]
	return v, ok
}

func (kb kernelBench) runs(row benchRow) string {
	if res, ok := kb.Results[row.bench]; ok {
		return strconv.Itoa(res.N)
	}
	return "—"
}

func rowNamed(bench string) benchRow {
	for _, r := range benchRows {
		if r.bench == bench && r.step == "" {
			return r
		}
	}
	panic("no row for " + bench)
}

var (
	rowBare      = rowNamed("BenchmarkVMIoctlBare")
	rowExport    = rowNamed("BenchmarkVMExportOnly")
	rowSelf      = rowNamed("BenchmarkVMExportSelf")
	rowBrokered  = rowNamed("BenchmarkVMLease/brokered")
	rowDial      = rowNamed("BenchmarkVMLease/dial")
	rowPairLease = benchRow{bench: "BenchmarkVMLeaseVsSelf", step: "brokered"}
	rowPairSelf  = benchRow{bench: "BenchmarkVMLeaseVsSelf", step: "self"}
	rowRevoke    = rowNamed("BenchmarkVMRevoke")
	rowCycle     = rowNamed("BenchmarkVMDeviceCycle")
)

// fmtUS formats a duration given in µs.
func fmtUS(us float64) string {
	switch {
	case us < 10:
		return fmt.Sprintf("%.2f µs", us)
	case us < 1000:
		return fmt.Sprintf("%.1f µs", us)
	case us < 1e6:
		return fmt.Sprintf("%.2f ms", us/1e3)
	default:
		return fmt.Sprintf("%.2f s", us/1e6)
	}
}

func fmtStat(v float64, ok bool) string {
	if !ok {
		return "—"
	}
	return fmtUS(v)
}

func fmtRatio(a float64, aok bool, b float64, bok bool) string {
	if !aok || !bok || b == 0 {
		return "—"
	}
	switch r := a / b; {
	case r >= 100:
		return fmt.Sprintf("%.0f×", r)
	case r >= 0.01:
		return fmt.Sprintf("%.2f×", r)
	case r > 0:
		// two significant digits, no exponent: 0.00026×
		return fmt.Sprintf("%.*f×", int(math.Ceil(-math.Log10(r)))+1, r)
	default:
		return "0×"
	}
}

func kernelTitle(k vmrig.Kernel) string {
	if k == vmrig.IOMMUFD {
		return "iommufd kernel: VFIO cdev + iommufd"
	}
	return "stock kernel: VFIO group/container"
}

// renderBenchDoc writes docs/benchmarks-vm.md.
func renderBenchDoc(in benchDocInput) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("# Benchmarks on a real kernel: lease, export and revoke in the VM\n\n")
	p("Generated by `rig bench` (test/vm/cmd/rig, run by `make bench`): do not edit by hand, run it again. ")
	p("Each kernel's figures come from one boot of the [real-kernel rig](../test/vm/README.md) that runs the benchmarks of ")
	p("[test/vm/e2e](../test/vm/e2e/benchcmp_vm_test.go) one after another on the same device and range, so that every row of a kernel ")
	p("stands next to the bare ioctl and the VMM-alone figure of the same run. The guest is QEMU's software emulation (TCG), one vCPU ")
	p("that is a thread of a host shared with other work: absolute times are far slower than on hardware, and not slower by one factor for ")
	p("every row (the guest's instructions are emulated, the emulated devices and the kernel's waits are not); the ratios hold for this machine. ")
	p("The same lease round trip on the host, against fake devices, is in [benchmarks.md](benchmarks.md). [How it measures](#method) is at the end.\n\n")
	p("- Date: %s\n", in.Date.Format("2006-01-02 15:04 UTC"))
	p("- Host: %s\n", in.Host)
	p("- Guest: QEMU TCG, q35 with intel-iommu, 1 vCPU, 768 MiB, busybox init; every benchmark in one process of the e2e test binary, mmiobrokerd in its own\n")
	for _, kb := range in.Runs {
		p("- %s: Linux `%s`, device `%s`; host load average %s before the boot, %s after\n", kernelTitle(kb.Kernel), kb.Release, kb.Device, kb.Load[0], kb.Load[1])
	}
	p("- Range: the ivshmem device's BAR2 (1 MiB), bytes 0–4095, in every benchmark\n")
	p("- Tree: %s\n", in.Tree)
	p("- Command: `%s`\n\n", in.Command)

	p("## Target\n\n")
	p("A brokered lease costs a VMM no more than opening the device and exporting the dma-buf itself. ")
	p("The verdict is the p50 of the two measured alternately (BenchmarkVMLeaseVsSelf: blocks of leases and of opens + exports in turn, so that both saw the same host load); ")
	p("the p99 of the same, and the p50s of the two separate benchmarks of the tables below, are for reference.\n\n")
	p("| kernel | statistic | brokered lease | VMM alone: open + export | ratio | goal | met |\n")
	p("|---|---|---:|---:|---:|---|---|\n")
	for _, kb := range in.Runs {
		for _, c := range []struct {
			label, which string
			lease, self  benchRow
		}{
			{"**p50, alternately**", "p50", rowPairLease, rowPairSelf},
			{"p99, alternately", "p99", rowPairLease, rowPairSelf},
			{"p50, separate benchmarks", "p50", rowBrokered, rowSelf},
		} {
			lv, lok := kb.stat(c.lease, c.which)
			sv, sok := kb.stat(c.self, c.which)
			met := "not measured"
			if lok && sok && sv > 0 {
				met = "no"
				if lv/sv <= 1.0 {
					met = "yes"
				}
				if c.label == "**p50, alternately**" {
					met = "**" + met + "**"
				}
			}
			p("| %s | %s | %s | %s | %s | ≤ 1.0× | %s |\n", kb.Kernel, c.label, fmtStat(lv, lok), fmtStat(sv, sok),
				fmtRatio(lv, lok, sv, sok), met)
		}
	}
	p("\n")
	for _, kb := range in.Runs {
		dv, dok := kb.stat(rowDial, "p50")
		sv, sok := kb.stat(rowSelf, "p50")
		if dok && sok {
			p("A VMM's first lease, client.Dial included, on the %s kernel: p50 %s, %s the VMM alone (separate benchmarks).\n", kb.Kernel, fmtUS(dv), fmtRatio(dv, dok, sv, sok))
		}
	}
	p("\n")

	for _, kb := range in.Runs {
		p("## %s\n\n", kernelTitle(kb.Kernel))
		p("Linux `%s`. Ratios are of the p50s.\n\n", kb.Release)
		p("| | what is timed | runs | p50 | p99 | mean | × bare ioctl | × VMM alone |\n")
		p("|---|---|---:|---:|---:|---:|---:|---:|\n")
		bare, bareOK := kb.stat(rowBare, "p50")
		self, selfOK := kb.stat(rowSelf, "p50")
		for _, row := range benchRows {
			p50, ok50 := kb.stat(row, "p50")
			p99, ok99 := kb.stat(row, "p99")
			mean, okMean := kb.stat(row, "mean")
			p("| %s | %s | %s | %s | %s | %s | %s | %s |\n", row.label, row.what, kb.runs(row), fmtStat(p50, ok50),
				fmtStat(p99, ok99), fmtStat(mean, okMean), fmtRatio(p50, ok50, bare, bareOK), fmtRatio(p50, ok50, self, selfOK))
		}
		p("\n")
		lease, leaseOK := kb.stat(rowBrokered, "p50")
		export, exportOK := kb.stat(rowExport, "p50")
		grpcRow := benchRow{bench: "BenchmarkVMLease/steps", step: "grpc"}
		allocRow := benchRow{bench: "BenchmarkVMLease/steps", step: "allocate"}
		claimRow := benchRow{bench: "BenchmarkVMLease/steps", step: "claim"}
		g, gok := kb.stat(grpcRow, "p50")
		a, aok := kb.stat(allocRow, "p50")
		c, cok := kb.stat(claimRow, "p50")
		if leaseOK && exportOK && gok && aok && cok {
			p("Where the lease's time goes (p50s): AllocateLease %s (%s a bare gRPC call to the daemon, %s), the claim %s; ",
				fmtUS(a), fmtRatio(a, aok, g, gok), fmtUS(g), fmtUS(c))
			p("the kernel's export in it is %s, %.1f%% of the lease.", fmtUS(export), 100*export/lease)
			rv, rok := kb.stat(rowRevoke, "p50")
			cv, cok := kb.stat(rowCycle, "p50")
			if rok && cok {
				p(" A revoke is %s the device cycle it contains.", fmtRatio(rv, rok, cv, cok))
			}
			p("\n\n")
		}
	}

	p("## Method\n\n")
	p("- One guest boot per kernel runs the e2e test binary with `-test.run '^$' -test.bench '%s' -test.benchtime %s`: the benchmarks run one after another in one process, the tests not at all. ", in.Bench, in.BenchTime)
	p("Go's benchmark framework calls each benchmark with a growing iteration count until a run lasts the benchtime (of timed work) or reaches its count; the row is the last run: \"runs\" is its iteration count, ")
	p("p50 and p99 are nearest-rank percentiles of its operations, each timed on its own (time.Now around it), and the mean is its ns/op. Nothing is timed that the \"what is timed\" column does not name.\n")
	p("- The device and range are the same in every row: the ivshmem device's BAR2, its first 4 KiB. The benchmarks open the device one at a time; each closes it (or stops its daemon) before the next begins.\n")
	p("- **VMM alone** (BenchmarkVMExportSelf) opens the device the way mmiobrokerd does, with internal/hostdev on the access path of the kernel (`auto`: the VFIO cdev bound to an iommufd and attached to an IOAS on the iommufd kernel, the group joined to a type1 container on the stock kernel; the benchmark fails if the path is not the expected one), turns memory decode on (a dma-buf exported with it off is born revoked), registers the request and error notifiers, and exports the range: the timed part ends with the fd in hand. ")
	p("Closing the dma-buf and the device (vfio-pci resets the device at the open and at the last close) is not timed. **Export only** (BenchmarkVMExportOnly) is the export ioctl alone on a device opened once before: the kernel's floor of the export.\n")
	p("- **Brokered lease** (BenchmarkVMLease/brokered) is the lease round trip of [benchmarks.md](benchmarks.md#method) against a real mmiobrokerd in the guest, started as the e2e tests start it (test/vm/guestd: the guest's binary, a configuration file, READY=1 by sd_notify) with the device alone, which it opens at start: the benchmark, root (an administrator), calls client.Allocate on a connected client (one warm-up lease first): AllocateLease on the control socket, then the claim on the claim socket until the dma-buf fd is in hand. ")
	p("Closing the fd and ReleaseLease follow, not timed. One daemon serves the three BenchmarkVMLease sub-benchmarks. It runs with `revoke_within = \"1h\"`, `tenant_cycle_interval = \"0s\"`, `tenant_cycle_budget = 0`, `max_leases` and `max_leases_per_holder` 2048 and `log_level = \"info\"`: a release costs no device cycle (the lease stays ended-but-live), and the 1025th ended-but-live lease of the device would make the next allocation cycle it, inside the timed part. ")
	p("**Alternately** (BenchmarkVMLeaseVsSelf, the target's pair) runs blocks of %d brokered leases and %d opens + exports in turn, in the order ABBA, against a daemon started for each block of leases and stopped after it (it holds the device open; its start, warm-up lease and stop are not timed). ", leaseVsSelfBlock, leaseVsSelfBlock)
	p("**With client.Dial** (BenchmarkVMLease/dial) times a new client's dial and its first lease (gRPC connects at the first call). **The steps** (BenchmarkVMLease/steps) time a bare unary gRPC call to the daemon (Health/Check, on a connection of its own), AllocateLease and the claim (client.Claim) each on its own, all three in every iteration.\n")
	p("- **Revoke** (BenchmarkVMRevoke) is the broker's RevokeLease in the benchmark's process (internal/broker over internal/hostdev, no gRPC) on a claimed lease while another lease of the device lives: from the call until the revoked fd is dead for good and the survivor re-exported. **Holder exit** (BenchmarkVMHolderExit) is from the SIGKILL of a child holding a lease until the survivor's reissue event. **Device cycle** (BenchmarkVMDeviceCycle) is hostdev's revoke alone: memory decode off, the device fd closed and reopened, decode on.\n")
	p("- A run fails, and writes no table, if a benchmark fails or the guest does; it never fails on speed. `make test` runs the same benchmarks once each (`-benchtime 1x`) as a smoke test (test/vm's TestVM, MMIOBROKER_VM_BENCH).\n\n")

	p("## Raw results\n\n")
	for _, kb := range in.Runs {
		p("%s (`%s`):\n\n```\n", kernelTitle(kb.Kernel), kb.Release)
		for _, l := range kb.Lines {
			p("%s\n", l)
		}
		p("```\n\n")
	}
	return strings.TrimRight(b.String(), "\n") + "\n"
}

// loadAverage returns the host's 1-minute load average.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "unknown"
}

// hostDescription names the machine the rig runs on.
func hostDescription(qemu string) string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.Join(strings.Fields(v), " ")
				break
			}
		}
		f.Close()
	}
	release := "unknown"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		release = strings.TrimSpace(string(b))
	}
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	qv := "QEMU version unknown"
	if out, err := exec.Command(qemu, "--version").Output(); err == nil {
		qv, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	}
	return fmt.Sprintf("%d CPUs (%s), Linux %s, %s, %s", runtime.NumCPU(), model, release, runtime.Version(), qv)
}

// treeDescription names the commit the payload was built from, and whether the tree had
// changes.
func treeDescription(root string) string {
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "not a git checkout"
	}
	s := "commit " + strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "-C", root, "status", "--porcelain").Output(); err == nil && len(st) > 0 {
		s += ", with uncommitted changes"
	}
	return s
}

// commandLine renders the command that produced the document.
func commandLine(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"\\$^*?[]|&;<>()") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.TrimSpace("go run ./test/vm/cmd/rig " + strings.Join(q, " "))
}
