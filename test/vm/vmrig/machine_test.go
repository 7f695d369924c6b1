package vmrig

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as a fake QEMU (started with QEMU's arguments, which begin with
// -M, plus -fake-scenario NAME): it speaks the init's marker protocol on the payload
// socket and prints kernel lines on stdout, so the runner's classification of passes,
// failures, panics and hangs is tested without a VM.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "-M" {
		os.Exit(fakeQEMU(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeQEMU(args []string) int {
	var scenario, payload, shm, appendArg string
	for i := 0; i+1 < len(args); i++ {
		switch v := args[i+1]; args[i] {
		case "-fake-scenario":
			scenario = v
		case "-chardev":
			if p, ok := strings.CutPrefix(v, "socket,id=payload,fd="); ok {
				payload = p
			}
		case "-object":
			for _, kv := range strings.Split(v, ",") {
				if p, ok := strings.CutPrefix(kv, "mem-path="); ok {
					shm = p
				}
			}
		case "-append":
			appendArg = v
		}
	}
	con := func(s string) { fmt.Printf("[    0.100000] %s\r\n", s) }
	if scenario == "qemu-error" {
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: -device edu: 'edu' is not a valid device model name")
		return 1
	}
	fd, err := strconv.Atoi(payload)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake qemu: no payload fd:", err)
		return 1
	}
	c := os.NewFile(uintptr(fd), "payload")
	defer c.Close()
	pay := func(lines ...string) {
		for _, l := range lines {
			fmt.Fprintf(c, "%s\n", l)
		}
	}
	hang := func() { time.Sleep(time.Hour) } // the runner must kill us
	con("Linux version 7.2.13 (fake)")
	switch scenario {
	case "early-panic":
		con("Kernel panic - not syncing: timer doesn't work through Interrupt-remapped IO-APIC")
		con("CPU: 0 PID: 1 Comm: swapper/0")
		return 0
	case "hang-boot":
		hang()
	}
	pay("MMB-RIG: init kernel=7.2.13-fake uptime=1.0",
		"MMB-RIG: check modules ok loaded: vfio vfio_pci",
		"MMB-RIG: check ivshmem-write ok wrote it")
	var nonce uint64
	for _, w := range strings.Fields(appendArg) {
		if v, ok := strings.CutPrefix(w, "mmb.nonce="); ok {
			nonce, _ = strconv.ParseUint(v, 16, 32)
		}
	}
	if scenario == "bad-nonce" {
		nonce++
	}
	f, err := os.OpenFile(shm, os.O_WRONLY, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake qemu:", err)
		return 1
	}
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], uint32(nonce))
	f.WriteAt(b[:], ivshmemNonceOffset)
	f.Close()
	pay("MMB-RIG: env MMIOBROKER_VM_EDU1=0000:01:00.0", "MMB-RIG: ready uptime=1.5",
		"MMB-RIG: begin vfio", "=== RUN   TestK1GroupContainerOpen")
	switch scenario {
	case "mid-panic":
		con("BUG: kernel NULL pointer dereference, address: 0000000000000008")
		con("Kernel panic - not syncing: Fatal exception")
		return 0
	case "hang-test":
		hang()
	}
	pay("--- PASS: TestK1GroupContainerOpen (0.01s)", "=== RUN   TestK2CdevIommufdOpen",
		"    vfio_vm_test.go:20: no /dev/iommu on the stock kernel",
		"--- SKIP: TestK2CdevIommufdOpen (0.00s)", "PASS", "MMB-RIG: end vfio rc=0 uptime=2.0")
	if scenario == "test-fail" {
		pay("MMB-RIG: begin dmabuf", "=== RUN   TestK5FdinfoInode", "    x.go:1: inode mismatch",
			"--- FAIL: TestK5FdinfoInode (0.00s)", "FAIL", "MMB-RIG: end dmabuf rc=1 uptime=2.5")
	}
	pay("MMB-RIG: done uptime=3.0")
	con("reboot: Power down")
	return 0
}

func fakeBoot(t *testing.T, scenario string, mod func(*MachineConfig)) *Outcome {
	t.Helper()
	return fakeBootCtx(context.Background(), t, scenario, mod)
}

func fakeBootCtx(ctx context.Context, t *testing.T, scenario string, mod func(*MachineConfig)) *Outcome {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Parallel()
	cfg := MachineConfig{QEMU: exe, Kernel: KernelImage{Kernel: Stock, Image: "/fake/vmlinuz"},
		Initrd: "/fake/initrd", LogPath: t.TempDir() + "/serial.log", ExtraArgs: []string{"-fake-scenario", scenario}}
	if mod != nil {
		mod(&cfg)
	}
	o, err := Boot(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestBootPass(t *testing.T) {
	var transcript strings.Builder
	o := fakeBoot(t, "pass", func(c *MachineConfig) { c.Transcript = &transcript })
	if o.Failed() || o.InfraFailure() != "" {
		t.Fatalf("failed: infra %q, problems %q", o.InfraFailure(), o.Problems())
	}
	if o.KernelRelease != "7.2.13-fake" || o.Env["MMIOBROKER_VM_EDU1"] != "0000:01:00.0" {
		t.Errorf("release %q env %v", o.KernelRelease, o.Env)
	}
	if len(o.Binaries) != 1 || o.Binaries[0].Name != "vfio" || len(o.Binaries[0].Tests) != 2 {
		t.Fatalf("binaries %+v", o.Binaries)
	}
	if got := o.Binaries[0].Tests[1]; got.Status != Skip || len(got.Output) != 1 {
		t.Errorf("TestK2 = %+v", got)
	}
	var host *Check
	for i, c := range o.Checks {
		if c.Name == "ivshmem-host" {
			host = &o.Checks[i]
		}
	}
	if host == nil || host.Status != "ok" {
		t.Errorf("ivshmem-host check = %+v, want ok", host)
	}
	if !strings.Contains(transcript.String(), "=== RUN   TestK1GroupContainerOpen") || strings.Contains(transcript.String(), "MMB-RIG") {
		t.Errorf("transcript should hold the payload lines without markers:\n%s", transcript.String())
	}
	log, err := os.ReadFile(o.LogPath)
	if err != nil || !strings.Contains(string(log), "kernel| [    0.100000] reboot: Power down") ||
		!strings.Contains(string(log), "guest | MMB-RIG: done") {
		t.Errorf("serial log lacks console or payload lines (%v):\n%s", err, log)
	}
}

func TestBootTestFailure(t *testing.T) {
	o := fakeBoot(t, "test-fail", nil)
	if o.InfraFailure() != "" || len(o.Problems()) != 0 {
		t.Errorf("infra %q problems %q, want neither", o.InfraFailure(), o.Problems())
	}
	if !o.Failed() || len(o.Binaries) != 2 || !o.Binaries[1].Failed() {
		t.Errorf("a failed guest test must fail the run: %+v", o.Binaries)
	}
}

func TestBootBadNonce(t *testing.T) {
	o := fakeBoot(t, "bad-nonce", nil)
	if !o.Failed() || o.InfraFailure() != "" {
		t.Errorf("failed %v infra %q: a wrong ivshmem nonce must fail the run, not look like infrastructure", o.Failed(), o.InfraFailure())
	}
}

func TestBootInfraFailures(t *testing.T) {
	for _, tc := range []struct {
		name, scenario string
		want           string
		mod            func(*MachineConfig)
	}{
		{"panic before init", "early-panic", "Kernel panic - not syncing: timer", nil},
		{"qemu error", "qemu-error", "exit status 1", nil},
		{"boot limit", "hang-boot", "no /init marker within", func(c *MachineConfig) { c.BootTimeout = 200 * time.Millisecond }},
		{"run limit before init", "hang-boot", "the run took longer than", func(c *MachineConfig) { c.Timeout = 200 * time.Millisecond }},
		{"no qemu binary", "none", "QEMU did not start", func(c *MachineConfig) { c.QEMU = "/nonexistent/qemu" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := fakeBoot(t, tc.scenario, tc.mod)
			if got := o.InfraFailure(); !strings.Contains(got, tc.want) {
				t.Errorf("InfraFailure() = %q, want it to mention %q", got, tc.want)
			}
			if !o.Failed() {
				t.Error("Failed() = false")
			}
		})
	}
	t.Run("qemu-error-tail", func(t *testing.T) {
		o := fakeBoot(t, "qemu-error", nil)
		if !strings.Contains(strings.Join(o.Tail, "\n"), "is not a valid device model") {
			t.Errorf("QEMU's own error should be in the console tail: %q", o.Tail)
		}
	})
}

func TestBootFailuresDuringTests(t *testing.T) {
	t.Run("panic", func(t *testing.T) {
		o := fakeBoot(t, "mid-panic", nil)
		if o.InfraFailure() != "" {
			t.Errorf("a panic during a test is the test's failure, got infra %q", o.InfraFailure())
		}
		if p := strings.Join(o.Problems(), "; "); !strings.Contains(p, "BUG: kernel NULL pointer") {
			t.Errorf("problems %q, want the panic", p)
		}
		if len(o.Binaries) != 1 || o.Binaries[0].Ended || o.Binaries[0].Tests[0].Status != NoResult {
			t.Errorf("binaries %+v, want vfio unfinished with TestK1 without result", o.Binaries)
		}
		if len(o.Panic) < 2 {
			t.Errorf("panic lines %q", o.Panic)
		}
	})
	t.Run("hang", func(t *testing.T) {
		// Stop the run once the test binary began: whatever kills the hung guest after that
		// (limit or cancellation) is a failure of the run, not infrastructure.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		o := fakeBootCtx(ctx, t, "hang-test", func(c *MachineConfig) {
			c.Progress = func(m string) {
				if strings.HasPrefix(m, "begin ") {
					cancel()
				}
			}
		})
		if o.InfraFailure() != "" || !strings.Contains(o.Timeout, "cancelled") || !o.Failed() {
			t.Errorf("infra %q timeout %q failed %v", o.InfraFailure(), o.Timeout, o.Failed())
		}
		if len(o.Binaries) != 1 || o.Binaries[0].Ended {
			t.Errorf("binaries %+v, want vfio unfinished", o.Binaries)
		}
	})
}

func TestRetryInfra(t *testing.T) {
	infra := &Outcome{StartErr: fmt.Errorf("boom")}
	good := &Outcome{InitAt: time.Second, DoneAt: 2 * time.Second}
	for _, tc := range []struct {
		name      string
		seq       []*Outcome
		retries   int
		attempts  int
		wantInfra bool
	}{
		{"first ok", []*Outcome{good}, 1, 1, false},
		{"retry helps", []*Outcome{infra, good}, 1, 2, false},
		{"retry exhausted", []*Outcome{infra, infra, good}, 1, 2, true},
		{"no retries", []*Outcome{infra, good}, 0, 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := &Report{}
			err := retryInfra(context.Background(), tc.retries, func(a int) (*Outcome, error) { return tc.seq[a], nil }, rep)
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Attempts) != tc.attempts || (rep.Infra != "") != tc.wantInfra {
				t.Errorf("attempts %d infra %q, want %d attempts, infra %v", len(rep.Attempts), rep.Infra, tc.attempts, tc.wantInfra)
			}
		})
	}
}

func TestQEMUArgs(t *testing.T) {
	cfg := MachineConfig{Kernel: KernelImage{Kernel: IOMMUFD, Image: "/k/bzImage"}, Initrd: "/i.cpio.zst"}
	args, err := QEMUArgs(cfg, "/dev/shm/x", 3, []string{"console=ttyS0", "mmb.mode=tests"})
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Join(args, " ")
	for _, want := range []string{
		"-M q35 -accel tcg -cpu max -smp 1 -m 768M", "-no-reboot", "-device intel-iommu,intremap=on",
		"-device pcie-root-port,id=rp1,chassis=1,slot=1,addr=03.0 -device edu,bus=rp1",
		"-device pcie-root-port,id=rp2,chassis=2,slot=2,addr=04.0 -device edu,bus=rp2",
		"mem-path=/dev/shm/x,size=1048576,share=on", "-device ivshmem-plain,memdev=shm0,bus=rp3",
		"-device pci-testdev,membar=1M,bus=rp4", "-device pcie-root-port,id=rp5,chassis=5,slot=5,addr=07.0 -device e1000e,bus=rp5", "-serial stdio -chardev socket,id=payload,fd=3 -serial chardev:payload",
		"-kernel /k/bzImage -initrd /i.cpio.zst -append console=ttyS0 mmb.mode=tests",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("args lack %q:\n%s", want, s)
		}
	}
	cfg.Topology = Flat
	args, _ = QEMUArgs(cfg, "/dev/shm/x", 0, nil)
	if s := strings.Join(args, " "); strings.Contains(s, "pcie-root-port") || !strings.Contains(s, "-device edu,addr=03.0") ||
		strings.Contains(s, "payload") {
		t.Errorf("flat args:\n%s", s)
	}
	if _, err := QEMUArgs(cfg, "/dev/shm/a,b", 0, nil); err == nil {
		t.Error("a comma in a path was accepted")
	}
	cfg.Mode = ModeShell
	args, _ = QEMUArgs(cfg, "/dev/shm/x", 0, nil)
	if s := strings.Join(args, " "); !strings.Contains(s, "-serial mon:stdio") {
		t.Errorf("shell args:\n%s", s)
	}
}

func TestKernelCmdline(t *testing.T) {
	cfg := MachineConfig{Kernel: KernelImage{Kernel: Stock}, Run: "TestK1|TestK3/^einval$", Tests: []string{"vfio", "pci"},
		Bench: "^BenchmarkVM", BenchTime: "3x"}
	cl, err := KernelCmdline(cfg, true, 0xabc)
	if err != nil {
		t.Fatal(err)
	}
	s := " " + strings.Join(cl, " ") + " "
	for _, want := range []string{" console=ttyS0 ", " panic=-1 ", " oops=panic ", " intel_iommu=on ", " no_timer_check ",
		" mmb.mode=tests ", " mmb.kernel=stock ", " mmb.topology=rootport ", " mmb.out=ttyS1 ",
		" mmb.run=TestK1|TestK3/^einval$ ", " mmb.tests=vfio,pci ", " mmb.nonce=00000abc ", " mmb.timeout=3m0s ",
		" mmb.bench=^BenchmarkVM ", " mmb.benchtime=3x "} {
		if !strings.Contains(s, want) {
			t.Errorf("cmdline lacks %q: %s", want, s)
		}
	}
	cfg.BenchTime = "3 x"
	if _, err := KernelCmdline(cfg, true, 1); err == nil {
		t.Error("a -benchtime with a space was accepted")
	}
	cfg.BenchTime, cfg.Run = "", "Test A"
	if _, err := KernelCmdline(cfg, true, 1); err == nil {
		t.Error("a -run with a space was accepted")
	}
}
