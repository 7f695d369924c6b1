package vmrig

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Mode is what the guest runs after booting.
type Mode string

// Guest modes (the init's mmb.mode).
const (
	ModeTests Mode = "tests" // every test binary in /tests, with -test.v
	ModeDemo  Mode = "demo"  // /etc/mmb/demo.sh
	ModeShell Mode = "shell" // an interactive shell on the console
)

// Topology is how the emulated devices are attached.
type Topology string

// Device topologies.
const (
	// RootPort puts every device behind its own pcie-root-port, so the guest can reset it
	// with a secondary bus reset and VFIO_DEVICE_RESET works.
	RootPort Topology = "rootport"
	// Flat puts the devices on the q35 root bus: no reset method, VFIO_DEVICE_RESET fails.
	Flat Topology = "flat"
)

// IvshmemSize is the size of the ivshmem BAR2 and of its host backing file.
const IvshmemSize = 1 << 20

// ivshmemNonceOffset is where the init writes the nonce (see guest/init.sh).
const ivshmemNonceOffset = 0xff000

// MachineConfig describes one boot of the rig VM.
type MachineConfig struct {
	QEMU        string // default qemu-system-x86_64
	Kernel      KernelImage
	Initrd      string
	Boot        BootMode // what runs as PID 1 (default Busybox)
	Mode        Mode
	Topology    Topology      // default RootPort
	Run         string        // -test.run for the guest test binaries
	Bench       string        // -test.bench for the guest test binaries ("" = none)
	BenchTime   string        // -test.benchtime for them, e.g. "3x" or "2s" ("" = the default, 1s)
	Tests       []string      // run only these test binaries
	TestTimeout time.Duration // -test.timeout per guest binary (default 3m; systemd: 8m, see SoakBudget)
	BootTimeout time.Duration // limit until the init's first marker (default 90s)
	Timeout     time.Duration // limit for the whole run (default 6m; systemd: 12m, see SoakBudget)
	// Soak, if not zero, is the number of kill -9 restarts the systemd guest's soak test
	// runs (kernel command line mmb.soak=N, MMIOBROKER_VM_SOAK in the tests' environment).
	Soak      int
	Memory    string   // default 768M (busybox: the test binaries unpack into RAM) or 1G (systemd: the rootfs lives in RAM)
	SMP       int      // default 1 (two vCPUs under TCG occasionally panic a loaded guest)
	LogPath   string   // serial log; "" = none
	ExtraArgs []string // more QEMU arguments
	Cmdline   []string // more kernel command line words

	// Transcript receives the payload channel's lines that are not markers, as they arrive
	// (the demo's transcript). Progress receives one line per marker. Both may be nil.
	Transcript io.Writer
	Progress   func(line string)
}

func (c *MachineConfig) defaults() {
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	if c.Mode == "" {
		c.Mode = ModeTests
	}
	if c.Boot == "" {
		c.Boot = Busybox
	}
	if c.Topology == "" {
		c.Topology = RootPort
	}
	if c.TestTimeout == 0 {
		c.TestTimeout = 3 * time.Minute
		if c.Boot == Systemd {
			// the restart, crash and short soak tests restart the daemon some 80 times
			c.TestTimeout = 8*time.Minute + SoakBudget(c.Soak)
		}
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 90 * time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = 6 * time.Minute
		if c.Boot == Systemd {
			c.Timeout = c.TestTimeout + 4*time.Minute
		}
	}
	if c.Memory == "" {
		// 512M left ~20M once the k8s-linked DRA test binary was in the image.
		c.Memory = "768M"
		if c.Boot == Systemd {
			c.Memory = "1G"
		}
	}
	if c.SMP == 0 {
		c.SMP = 1
	}
}

// Check is one of the init's self-checks (devices present, bound to vfio-pci, ...), or a
// host-side check of the run.
type Check struct {
	Name   string
	Status string // ok, fail or skip
	Detail string
}

// Outcome is everything one boot produced.
type Outcome struct {
	Kernel        Kernel
	Boot          BootMode
	Mode          Mode
	LogPath       string
	KernelRelease string
	Checks        []Check
	Env           map[string]string // MMIOBROKER_VM_* as exported by the init
	Binaries      []*BinaryResult   // in run order (the demo counts as one)

	InitAt, ReadyAt, DoneAt time.Duration // since QEMU start; 0 = marker not seen
	Total                   time.Duration
	// The guest's own clock (seconds since its kernel booted): when PID 1 started (the
	// systemd boot mode's init marker says; 0 = unknown) and the uptime of the init and
	// ready markers.
	GuestPID1, GuestInit, GuestReady float64

	StartErr error    // QEMU could not be started
	ExitErr  error    // QEMU's exit status (nil = 0)
	Timeout  string   // which limit fired, if any
	Panic    []string // console lines from the first panic/oops/BUG on
	Warnings []string // kernel WARNING lines
	Tail     []string // last console lines (kernel messages and QEMU errors)
	Ivshmem  []byte   // the ivshmem backing file after the run
}

// InfraFailure returns why the run says nothing about the code under test (QEMU did not
// start, the guest died or hung before the first test or demo began), or "". Such runs are
// worth one retry.
func (o *Outcome) InfraFailure() string {
	switch {
	case o.StartErr != nil:
		return fmt.Sprintf("QEMU did not start: %v", o.StartErr)
	case o.InitAt == 0:
		return "the guest never reached /init (" + o.death() + ")"
	case len(o.Binaries) == 0 && o.DoneAt == 0:
		return "the guest died before the first test began (" + o.death() + ")"
	}
	return ""
}

// death describes how the guest ended.
func (o *Outcome) death() string {
	var why []string
	if len(o.Panic) > 0 {
		why = append(why, "kernel: "+strings.TrimSpace(o.Panic[0]))
	}
	if o.Timeout != "" {
		why = append(why, o.Timeout)
	}
	if o.ExitErr != nil {
		why = append(why, "qemu: "+o.ExitErr.Error())
	}
	if len(why) == 0 {
		why = append(why, "QEMU exited without a done marker")
	}
	return strings.Join(why, "; ")
}

// GuestTimes describes the boot on the guest's clock: when PID 1 started (the systemd
// boot mode's "/init"), when the init marker and the ready marker were printed; "" if the
// guest did not say.
func (o *Outcome) GuestTimes() string {
	if o.GuestReady == 0 {
		return ""
	}
	if o.GuestPID1 > 0 {
		return fmt.Sprintf("; guest clock: PID 1 at %.2fs, ready at %.2fs (/init to ready %.2fs)",
			o.GuestPID1, o.GuestReady, o.GuestReady-o.GuestPID1)
	}
	return fmt.Sprintf("; guest clock: /init at %.2fs, ready at %.2fs (/init to ready %.2fs)",
		o.GuestInit, o.GuestReady, o.GuestReady-o.GuestInit)
}

// Problems lists run-level failures that are not any one binary's: a failed self-check,
// a panic, a timeout, a missing done marker.
func (o *Outcome) Problems() []string {
	var p []string
	if r := o.InfraFailure(); r != "" {
		return []string{r}
	}
	for _, c := range o.Checks {
		if c.Status == "fail" {
			p = append(p, fmt.Sprintf("rig check %s failed: %s", c.Name, c.Detail))
		}
	}
	if len(o.Panic) > 0 {
		p = append(p, "guest kernel panic/oops: "+strings.TrimSpace(o.Panic[0]))
	}
	if o.Timeout != "" {
		p = append(p, o.Timeout)
	}
	if o.DoneAt == 0 && len(p) == 0 {
		p = append(p, "the guest stopped before its done marker ("+o.death()+")")
	}
	return p
}

// Failed reports whether the run or any binary in it failed.
func (o *Outcome) Failed() bool {
	if len(o.Problems()) > 0 {
		return true
	}
	for _, b := range o.Binaries {
		if b.Failed() {
			return true
		}
	}
	return false
}

// QEMUArgs returns the QEMU command line (without the program) for cfg, with the ivshmem
// backing file shm, the payload channel on the connected stream socket QEMU inherits as
// payloadFD (0 = none) and the kernel command line cmdline.
func QEMUArgs(cfg MachineConfig, shm string, payloadFD int, cmdline []string) ([]string, error) {
	cfg.defaults()
	for _, p := range []string{shm, cfg.Kernel.Image, cfg.Initrd} {
		if strings.Contains(p, ",") {
			return nil, fmt.Errorf("path %q contains a comma, which QEMU's option syntax cannot take", p)
		}
	}
	args := []string{
		"-M", "q35", "-accel", "tcg", "-cpu", "max",
		"-smp", strconv.Itoa(cfg.SMP), "-m", cfg.Memory,
		"-display", "none", "-no-reboot", "-nodefaults",
		"-device", "intel-iommu,intremap=on",
	}
	shmObj := fmt.Sprintf("memory-backend-file,id=shm0,mem-path=%s,size=%d,share=on", shm, IvshmemSize)
	// e1000e is the PCI Express endpoint (the others are conventional PCI): vfio-pci offers
	// the AER error notifier only for PCIe devices. It has no network backend.
	devs := []string{"edu", "edu", "ivshmem-plain,memdev=shm0", "pci-testdev,membar=1M", "e1000e"}
	args = append(args, "-object", shmObj)
	for i, d := range devs {
		slot := 3 + i
		switch cfg.Topology {
		case RootPort:
			args = append(args,
				"-device", fmt.Sprintf("pcie-root-port,id=rp%d,chassis=%d,slot=%d,addr=%02x.0", i+1, i+1, i+1, slot),
				"-device", fmt.Sprintf("%s,bus=rp%d", d, i+1))
		case Flat:
			args = append(args, "-device", fmt.Sprintf("%s,addr=%02x.0", d, slot))
		default:
			return nil, fmt.Errorf("unknown topology %q", cfg.Topology)
		}
	}
	if cfg.Mode == ModeShell {
		args = append(args, "-serial", "mon:stdio")
	} else {
		args = append(args, "-serial", "stdio")
	}
	if payloadFD > 0 {
		args = append(args, "-chardev", fmt.Sprintf("socket,id=payload,fd=%d", payloadFD), "-serial", "chardev:payload")
	}
	args = append(args, "-kernel", cfg.Kernel.Image, "-initrd", cfg.Initrd,
		"-append", strings.Join(cmdline, " "))
	return append(args, cfg.ExtraArgs...), nil
}

// SoakBudget is the time a soak of n kill -9 restarts may take in the systemd guest: 10 s
// a restart (about 3 s are measured under TCG: kill to READY plus the checks).
func SoakBudget(n int) time.Duration { return time.Duration(n) * 10 * time.Second }

// KernelCmdline returns the guest kernel command line for cfg.
func KernelCmdline(cfg MachineConfig, payloadOnTTYS1 bool, nonce uint32) ([]string, error) {
	cfg.defaults()
	cl := []string{
		"console=ttyS0", "loglevel=5", // warnings and worse reach the console
		"panic=-1", "oops=panic", // any oops ends the run at once (with -no-reboot)
		"intel_iommu=on",
		"no_timer_check", // the IO-APIC timer check races under TCG + interrupt remapping
		"tsc=reliable",   // on a loaded host TSC calibration fails and the HPET fallback crawls
		"mmb.mode=" + string(cfg.Mode),
		"mmb.boot=" + string(cfg.Boot),
		"mmb.kernel=" + string(cfg.Kernel.Kernel),
		"mmb.topology=" + string(cfg.Topology),
		"mmb.timeout=" + cfg.TestTimeout.String(),
		fmt.Sprintf("mmb.nonce=%08x", nonce),
	}
	if payloadOnTTYS1 {
		cl = append(cl, "mmb.out=ttyS1")
	}
	if cfg.Boot == Systemd {
		// unit status lines on the console (the serial log shows how far the boot got)
		cl = append(cl, "systemd.show_status=1")
	}
	if cfg.Run != "" {
		if strings.ContainsAny(cfg.Run, " \t\n\"'\\") {
			return nil, fmt.Errorf("-run %q: the guest kernel command line cannot carry spaces, quotes or backslashes", cfg.Run)
		}
		cl = append(cl, "mmb.run="+cfg.Run)
	}
	if cfg.Bench != "" {
		if strings.ContainsAny(cfg.Bench, " \t\n\"'\\") {
			return nil, fmt.Errorf("-bench %q: the guest kernel command line cannot carry spaces, quotes or backslashes", cfg.Bench)
		}
		cl = append(cl, "mmb.bench="+cfg.Bench)
	}
	if cfg.BenchTime != "" {
		if strings.ContainsAny(cfg.BenchTime, " \t\n\"'\\") {
			return nil, fmt.Errorf("-benchtime %q: the guest kernel command line cannot carry spaces, quotes or backslashes", cfg.BenchTime)
		}
		cl = append(cl, "mmb.benchtime="+cfg.BenchTime)
	}
	if len(cfg.Tests) > 0 {
		cl = append(cl, "mmb.tests="+strings.Join(cfg.Tests, ","))
	}
	if cfg.Soak > 0 {
		cl = append(cl, fmt.Sprintf("mmb.soak=%d", cfg.Soak))
	}
	return append(cl, cfg.Cmdline...), nil
}

// Markers the init prints (see guest/init.sh).
const markerPrefix = "MMB-RIG: "

var (
	reEnd       = regexp.MustCompile(`^end (\S+) rc=(\d+)`)
	reCheck     = regexp.MustCompile(`^check (\S+) (ok|fail|skip)\s*(.*)$`)
	rePanicLine = regexp.MustCompile(`Kernel panic - not syncing|\bBUG: |\bOops\b|general protection fault|Unable to handle kernel|kernel BUG at`)
)

// machine holds the state of one boot while the reader goroutines fill it in.
type machine struct {
	cfg   MachineConfig
	start time.Time
	out   *Outcome
	shm   string
	nonce uint32

	logMu sync.Mutex
	log   *os.File

	initOnce sync.Once
	initSeen chan struct{}

	cur *GoTestParser // binary being run (payload goroutine only)
}

func (m *machine) since() time.Duration { return time.Since(m.start) }

func (m *machine) logLine(src, line string) {
	if m.log == nil {
		return
	}
	m.logMu.Lock()
	defer m.logMu.Unlock()
	fmt.Fprintf(m.log, "[%8.3f] %s| %s\n", m.since().Seconds(), src, line)
}

// Boot runs the VM described by cfg to the end (poweroff, panic or timeout) and returns
// what happened. The error is non-nil only when the run could not be set up at all; a
// guest or QEMU failure is described by the Outcome.
func Boot(ctx context.Context, cfg MachineConfig) (*Outcome, error) {
	cfg.defaults()
	if cfg.Mode == ModeShell {
		return nil, errors.New("Boot: use Shell for an interactive VM")
	}
	dir, err := os.MkdirTemp("", "mmbvm")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	m := &machine{cfg: cfg, out: &Outcome{Kernel: cfg.Kernel.Kernel, Boot: cfg.Boot, Mode: cfg.Mode, LogPath: cfg.LogPath,
		Env: map[string]string{}}, initSeen: make(chan struct{}), nonce: rand.Uint32() | 1}
	m.shm, err = ivshmemFile(dir)
	if err != nil {
		return nil, err
	}
	defer os.Remove(m.shm)
	host, guest, err := socketPair(filepath.Join(dir, "payload.sock"))
	if err != nil {
		return nil, fmt.Errorf("payload channel: %w", err)
	}
	defer host.Close()
	defer guest.Close() // closed (again) right after QEMU started
	cmdline, err := KernelCmdline(cfg, true, m.nonce)
	if err != nil {
		return nil, err
	}
	const payloadFD = 3 // cmd.ExtraFiles[0]
	args, err := QEMUArgs(cfg, m.shm, payloadFD, cmdline)
	if err != nil {
		return nil, err
	}
	if cfg.LogPath != "" {
		if err := os.MkdirAll(filepath.Dir(cfg.LogPath), 0o755); err != nil {
			return nil, err
		}
		if m.log, err = os.Create(cfg.LogPath); err != nil {
			return nil, err
		}
		defer m.log.Close()
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer pr.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		pw.Close()
		return nil, err
	}
	defer devnull.Close()

	cmd := exec.Command(cfg.QEMU, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, pw, pw
	cmd.ExtraFiles = []*os.File{guest}
	m.start = time.Now()
	m.logLine("host ", fmt.Sprintf("%s %s", cfg.QEMU, quoteArgs(args)))
	err = cmd.Start()
	pw.Close()
	guest.Close() // QEMU holds the only copy now: EOF on host when it exits
	if err != nil {
		host.Close()
		m.out.StartErr = err
		m.logLine("host ", "qemu did not start: "+err.Error())
		return m.out, nil
	}

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); m.readConsole(pr) }()
	go func() { defer wg.Done(); m.readPayload(host) }()

	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	boot := time.NewTimer(cfg.BootTimeout)
	defer boot.Stop()
	total := time.NewTimer(cfg.Timeout)
	defer total.Stop()
	initSeen, cancelled := m.initSeen, ctx.Done()
	var exitErr error
wait:
	for {
		select {
		case exitErr = <-exited:
			break wait
		case <-initSeen:
			boot.Stop()
			initSeen = nil
		case <-boot.C:
			m.out.Timeout = fmt.Sprintf("timeout: no /init marker within %v", cfg.BootTimeout)
			cmd.Process.Kill()
		case <-total.C:
			m.out.Timeout = fmt.Sprintf("timeout: the run took longer than %v", cfg.Timeout)
			cmd.Process.Kill()
		case <-cancelled:
			cancelled = nil
			m.out.Timeout = "cancelled: " + ctx.Err().Error()
			cmd.Process.Kill()
		}
	}
	wg.Wait()
	m.out.Total = m.since()
	if m.out.Timeout == "" {
		m.out.ExitErr = exitErr
	}
	if b, err := os.ReadFile(m.shm); err == nil {
		m.out.Ivshmem = b
	}
	if m.cur != nil { // a binary was still running
		m.out.Binaries = append(m.out.Binaries, m.cur.Result())
		m.cur = nil
	}
	m.logLine("host ", fmt.Sprintf("qemu exit: %v; timeout: %q; wall %.2fs", exitErr, m.out.Timeout, m.out.Total.Seconds()))
	return m.out, nil
}

// socketPair returns the two ends of a connected unix stream socket, made through a
// listener at path (removed again): host stays here, guest (a file for ExtraFiles) goes
// to QEMU. Nothing can be lost between QEMU's start and the host's first read.
func socketPair(path string) (host *net.UnixConn, guest *os.File, err error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	host, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	peer, err := ln.AcceptUnix()
	if err != nil {
		host.Close()
		return nil, nil, err
	}
	defer peer.Close()
	guest, err = peer.File()
	if err != nil {
		host.Close()
		return nil, nil, err
	}
	return host, guest, nil
}

func ivshmemFile(dir string) (string, error) {
	base := dir
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		base = "/dev/shm"
	}
	f, err := os.CreateTemp(base, "mmbvm-ivshmem-*")
	if err != nil {
		return "", fmt.Errorf("ivshmem backing file: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(IvshmemSize); err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("ivshmem backing file: %w", err)
	}
	return f.Name(), nil
}

func (m *machine) readConsole(r io.Reader) {
	br := bufio.NewReaderSize(r, 64<<10)
	inPanic := 0
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			line = strings.TrimRight(line, "\r\n")
			m.logLine("kernel", line)
			m.out.Tail = append(m.out.Tail, line)
			if len(m.out.Tail) > 80 {
				m.out.Tail = m.out.Tail[len(m.out.Tail)-60:]
			}
			switch {
			case inPanic > 0 && inPanic < 60:
				m.out.Panic = append(m.out.Panic, line)
				inPanic++
			case inPanic == 0 && rePanicLine.MatchString(line):
				m.out.Panic = append(m.out.Panic, line)
				inPanic = 1
			}
			if strings.Contains(line, "WARNING: CPU:") || strings.Contains(line, "WARNING: at ") {
				m.out.Warnings = append(m.out.Warnings, line)
			}
		}
		if err != nil {
			return
		}
	}
}

func (m *machine) readPayload(r io.Reader) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			line = strings.TrimRight(line, "\r\n")
			m.logLine("guest ", line)
			m.payloadLine(line)
		}
		if err != nil {
			return
		}
	}
}

func (m *machine) payloadLine(line string) {
	rest, ok := strings.CutPrefix(line, markerPrefix)
	if !ok {
		if m.cur != nil {
			m.cur.Line(line)
		}
		if m.cfg.Transcript != nil {
			fmt.Fprintln(m.cfg.Transcript, line)
		}
		return
	}
	if m.cfg.Progress != nil {
		m.cfg.Progress(rest)
	}
	word, args, _ := strings.Cut(rest, " ")
	switch word {
	case "init":
		m.out.InitAt = m.since()
		for _, kv := range strings.Fields(args) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "kernel":
				m.out.KernelRelease = v
			case "uptime":
				m.out.GuestInit, _ = strconv.ParseFloat(v, 64)
			case "pid1":
				m.out.GuestPID1, _ = strconv.ParseFloat(v, 64)
			}
		}
		m.initOnce.Do(func() { close(m.initSeen) })
	case "check":
		if c := reCheck.FindStringSubmatch(rest); c != nil {
			m.out.Checks = append(m.out.Checks, Check{Name: c[1], Status: c[2], Detail: c[3]})
		}
	case "env":
		if k, v, ok := strings.Cut(args, "="); ok {
			m.out.Env[k] = v
		}
	case "ready":
		m.out.ReadyAt = m.since()
		if v, ok := strings.CutPrefix(strings.TrimSpace(args), "uptime="); ok {
			m.out.GuestReady, _ = strconv.ParseFloat(v, 64)
		}
		m.checkIvshmem()
	case "begin":
		if m.cur != nil {
			m.out.Binaries = append(m.out.Binaries, m.cur.Result())
		}
		m.cur = NewGoTestParser(strings.TrimSpace(args))
	case "end":
		if e := reEnd.FindStringSubmatch(rest); e != nil && m.cur != nil && m.cur.Result().Name == e[1] {
			rc, _ := strconv.Atoi(e[2])
			m.cur.End(rc)
			m.out.Binaries = append(m.out.Binaries, m.cur.Result())
			m.cur = nil
		}
	case "done":
		m.out.DoneAt = m.since()
	}
}

// checkIvshmem verifies, while the guest waits at its ready marker, that the nonce the
// init wrote into ivshmem BAR2 is in the host's backing file.
func (m *machine) checkIvshmem() {
	wrote := false
	for _, c := range m.out.Checks {
		wrote = wrote || c.Name == "ivshmem-write" && c.Status == "ok"
	}
	if !wrote {
		return
	}
	c := Check{Name: "ivshmem-host", Status: "ok"}
	f, err := os.Open(m.shm)
	if err == nil {
		var b [4]byte
		_, err = f.ReadAt(b[:], ivshmemNonceOffset)
		f.Close()
		if got := binary.LittleEndian.Uint32(b[:]); err == nil && got != m.nonce {
			err = fmt.Errorf("read %#08x, want %#08x", got, m.nonce)
		}
	}
	if err != nil {
		c.Status, c.Detail = "fail", fmt.Sprintf("host backing file %s at %#x: %v", m.shm, ivshmemNonceOffset, err)
	} else {
		c.Detail = fmt.Sprintf("host backing file holds the guest's nonce %#08x at %#x", m.nonce, ivshmemNonceOffset)
	}
	m.out.Checks = append(m.out.Checks, c)
	m.logLine("host ", fmt.Sprintf("check %s %s %s", c.Name, c.Status, c.Detail))
}

func quoteArgs(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"$|&;<>()*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// Shell boots the VM interactively: the guest console (with QEMU's monitor multiplexed,
// Ctrl-A c; Ctrl-A x quits) is this process's terminal, and the init starts a shell.
func Shell(ctx context.Context, cfg MachineConfig) error {
	cfg.Mode = ModeShell
	cfg.defaults()
	dir, err := os.MkdirTemp("", "mmbvm")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	shm, err := ivshmemFile(dir)
	if err != nil {
		return err
	}
	defer os.Remove(shm)
	cmdline, err := KernelCmdline(cfg, false, rand.Uint32()|1)
	if err != nil {
		return err
	}
	args, err := QEMUArgs(cfg, shm, 0, cmdline)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, cfg.QEMU, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd.Run()
}
