// Command rig boots mmiobroker's real-kernel test VM (see package vmrig).
//
//	rig run   [-kernel stock|iommufd|all] [-mode busybox|systemd|all] [-run REGEX] [-tests a,b] [-v]
//	          [-bench REGEX [-benchtime T]]
//	rig bench [-kernel stock|iommufd|all] [-bench REGEX] [-benchtime T] [-out FILE]
//	                                                                       the real-kernel benchmarks, docs/benchmarks-vm.md
//	rig demo  [-kernel stock|iommufd]                                      the daemon demo
//	rig shell [-kernel stock|iommufd] [-mode busybox|systemd]              a shell in the VM
//
// -mode picks the boot mode: busybox (guest/init.sh, the vmtest binaries) or systemd (real
// systemd as PID 1 with deploy/'s units, the vmsystemd binaries); run defaults to busybox.
// Common flags: -topology rootport|flat, -timeout DURATION. test/vm/setup.sh (make setup)
// must have run. Serial logs go to bin/vm-logs/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/mmiobroker/mmiobroker/test/vm/vmrig"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		var ex exitError
		if errors.As(err, &ex) {
			os.Exit(int(ex))
		}
		fmt.Fprintln(os.Stderr, "rig:", err)
		os.Exit(2)
	}
}

// exitError carries an exit status without a message (the report was printed).
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

const usage = `usage: rig run|bench|demo|shell [flags]
  run    boot each kernel, run the guest test binaries, print the results
  bench  boot each kernel, run test/vm/e2e's benchmarks, print them and write their table
         (default docs/benchmarks-vm.md)
  demo   boot the VM, start mmiobrokerd on the emulated devices, show a VMM's view
  shell  boot the VM with a shell on this terminal (Ctrl-A x quits QEMU)`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprintln(stderr, usage)
		return exitError(2)
	}
	cmd := args[0]
	if cmd != "run" && cmd != "bench" && cmd != "demo" && cmd != "shell" {
		fmt.Fprintln(stderr, usage)
		return exitError(2)
	}
	fs := flag.NewFlagSet("rig "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	kernel := fs.String("kernel", "", "guest kernel: stock, iommufd (run, bench: also all; default all for run and bench, stock otherwise)")
	topology := fs.String("topology", string(vmrig.RootPort), "device topology: rootport (VFIO_DEVICE_RESET works) or flat")
	timeout := fs.Duration("timeout", 6*time.Minute, "limit per boot (bench: default "+benchTimeout.String()+")")
	runRe := fs.String("run", "", "run: -test.run for the guest test binaries")
	bench := fs.String("bench", "", "run: -test.bench for the guest test binaries (with -run '^$' to run only benchmarks); bench: default "+benchRegex)
	benchTime := fs.String("benchtime", "", "run, bench: -test.benchtime for the guest test binaries (default 1s; bench: "+benchTimeDefault+")")
	out := fs.String("out", benchDoc, `bench: the Markdown file to write ("" = none)`)
	tests := fs.String("tests", "", "run: only these test binaries (comma separated, e.g. vfio,dmabuf)")
	verbose := fs.Bool("v", false, "run: print every test and its output, and progress")
	mode := fs.String("mode", string(vmrig.Busybox), "boot mode: busybox or systemd (run: also all)")
	if err := fs.Parse(args[1:]); err != nil {
		return exitError(2)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if cmd == "bench" {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["timeout"] {
			*timeout = benchTimeout
		}
		if *benchTime == "" {
			*benchTime = benchTimeDefault
		}
	}
	var kernels []vmrig.Kernel
	switch {
	case *kernel == "" && (cmd == "run" || cmd == "bench"), *kernel == "all":
		kernels = vmrig.Kernels
	case *kernel == "":
		kernels = []vmrig.Kernel{vmrig.Stock}
	default:
		k, err := vmrig.ParseKernel(*kernel)
		if err != nil {
			return err
		}
		kernels = []vmrig.Kernel{k}
	}
	var modes []vmrig.BootMode
	if *mode == "all" && cmd == "run" {
		modes = vmrig.BootModes
	} else {
		m, err := vmrig.ParseBootMode(*mode)
		if err != nil {
			return err
		}
		if m != vmrig.Busybox && (cmd == "demo" || cmd == "bench") {
			return fmt.Errorf("%s: only -mode busybox", cmd)
		}
		modes = []vmrig.BootMode{m}
	}
	topo := vmrig.Topology(*topology)
	if topo != vmrig.RootPort && topo != vmrig.Flat {
		return fmt.Errorf("unknown -topology %q", *topology)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	r, err := vmrig.Open(wd)
	if err != nil {
		return err
	}
	defer r.Close()
	progress := func(s string) { fmt.Fprintln(stderr, "rig:", s) }
	r.Log = progress

	switch cmd {
	case "run":
		var opts vmrig.RunOptions
		opts.Topology, opts.Timeout, opts.Run, opts.Bench, opts.BenchTime = topo, *timeout, *runRe, *bench, *benchTime
		if *tests != "" {
			opts.Tests = strings.Split(*tests, ",")
		}
		if *verbose {
			opts.Progress = func(s string) { fmt.Fprintln(stderr, "guest:", s) }
		}
		failed := false
		for _, m := range modes {
			for _, k := range kernels {
				opts.Boot = m
				rep, err := r.Run(ctx, k, opts)
				if err != nil {
					return err
				}
				rep.WriteText(stdout, *verbose)
				if *bench != "" {
					writeBenchmarks(stdout, k, rep)
				}
				failed = failed || rep.Failed()
			}
		}
		if failed {
			fmt.Fprintln(stdout, "FAIL")
			return exitError(1)
		}
		fmt.Fprintln(stdout, "PASS")
		return nil
	case "bench":
		return runBench(ctx, r, benchOptions{kernels: kernels, topology: topo, timeout: *timeout, bench: *bench,
			benchTime: *benchTime, out: *out, verbose: *verbose, args: args}, stdout, stderr)
	case "demo":
		if len(kernels) != 1 {
			return errors.New("demo: pick one -kernel")
		}
		return demo(ctx, r, kernels[0], topo, *timeout, stdout, stderr)
	case "shell":
		if len(kernels) != 1 {
			return errors.New("shell: pick one -kernel")
		}
		ki, img, err := r.ImageFor(ctx, modes[0], kernels[0])
		if err != nil {
			return err
		}
		fmt.Fprintln(stderr, "rig: booting; the shell starts when the devices are bound. Ctrl-A x leaves QEMU.")
		return vmrig.Shell(ctx, vmrig.MachineConfig{Kernel: ki, Initrd: img.Path, Boot: modes[0], Topology: topo})
	default:
		fmt.Fprintln(stderr, usage)
		return exitError(2)
	}
}

// demo boots the VM in demo mode and prints the guest's transcript as it arrives.
func demo(ctx context.Context, r *vmrig.Rig, k vmrig.Kernel, topo vmrig.Topology, timeout time.Duration, stdout, stderr io.Writer) error {
	p, err := r.Payload(ctx)
	if err != nil {
		return err
	}
	for _, m := range p.Missing {
		fmt.Fprintf(stderr, "rig: note: %s is not in the tree yet; the demo will say so\n", m)
	}
	for _, f := range p.Failures {
		fmt.Fprintf(stderr, "rig: note: %s does not build:\n%s\n", f.Package, f.Output)
	}
	fmt.Fprintf(stdout, "== mmiobroker demo: %s kernel in QEMU (TCG, q35, intel-iommu, 2x edu, ivshmem, pci-testdev) ==\n", k)
	rep, err := r.Run(ctx, k, vmrig.RunOptions{Mode: vmrig.ModeDemo, Topology: topo, Timeout: timeout,
		Transcript: stdout})
	if err != nil {
		return err
	}
	o := rep.Outcome
	fmt.Fprintf(stdout, "== boot to /init %.1fs, total %.1fs; serial log: %s\n", o.InitAt.Seconds(), o.Total.Seconds(), o.LogPath)
	if rep.Infra != "" || len(o.Problems()) > 0 {
		rep.WriteText(stdout, false)
		return exitError(1)
	}
	for _, b := range o.Binaries {
		if b.Ended && b.ExitCode != 0 {
			fmt.Fprintf(stdout, "== the demo failed (exit status %d)\n", b.ExitCode)
			return exitError(1)
		}
	}
	return nil
}

// writeBenchmarks prints the guest's benchmark result lines, prefixed with the kernel and
// the test binary, in the go test format (benchstat reads them).
func writeBenchmarks(w io.Writer, k vmrig.Kernel, rep *vmrig.Report) {
	if rep.Outcome == nil {
		return
	}
	var walk func(bin string, lines []string, tests []*vmrig.TestCase)
	walk = func(bin string, lines []string, tests []*vmrig.TestCase) {
		for _, l := range lines {
			if strings.HasPrefix(l, "Benchmark") && strings.Contains(l, "ns/op") {
				fmt.Fprintf(w, "%s\t# %s/%s\n", l, k, bin)
			}
		}
		for _, tc := range tests {
			walk(bin, tc.Output, tc.Subtests)
		}
	}
	for _, b := range rep.Outcome.Binaries {
		walk(b.Name, b.Output, b.Tests)
	}
}
