package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Scenario names.
const (
	ScenarioSingle   = "single"
	ScenarioParallel = "parallel"
	ScenarioRevoke   = "revoke"
	ScenarioAllocs   = "allocs"
)

// RunOptions are the orchestrator's settings.
type RunOptions struct {
	// Ops is how many broker operations, and as many floor operations, each round-trip
	// scenario runs (the single client's, and the parallel clients' together).
	Ops int
	// Clients is how many client processes the parallel scenario runs at once.
	Clients int
	// Revokes is how many revoke operations (and as many bare unary calls) the revoke
	// scenario runs.
	Revokes int
	// AllocOps is how many operations the allocation scenario runs of each kind alone,
	// to divide the daemon's allocations between broker and floor.
	AllocOps int
	// Warmup is how many operations of each kind every client runs before the
	// measurement.
	Warmup int
	// ProfileDir, if set, receives a CPU profile of the daemon process of each scenario
	// (daemon-<scenario>.pprof), and the report the top of each.
	ProfileDir string
	// BaseDir is where the run's directory is made; "" means a tmpfs (/dev/shm) if there
	// is one, like mmiobrokerd's /run, else the temporary directory.
	BaseDir string
	// Keep keeps the run's directory (configurations, results of every client).
	Keep bool
	// TenantsBy and LogLevel set [tenants] by and [daemon] log_level ("": defaults).
	TenantsBy, LogLevel string
	// FDStore is the fake service manager's FileDescriptorStoreMax= (announced in
	// $FDSTORE): with it the daemon keeps its leases across restarts, so it runs its lease
	// journal, as under deploy/mmiobrokerd.service (4096); 0 runs it without.
	FDStore int
	// RevokeWithin is [limits] revoke_within, R: "1h" (released leases are batched,
	// buried by the device cycle that every 1025th release of a device forces), "0s"
	// (every release cycles its device at once), or "auto": 1h, unless the daemon
	// refuses that configuration for want of file descriptors (its budget counts every
	// lease up to max_leases, ended ones included), then 0s.
	RevokeWithin string
	// Exe is the command line prefix that runs this tool's modes ("daemon …", "client …");
	// nil means this executable. Env is added to the children's environment.
	Exe []string
	Env []string
	// Scenarios names the scenarios to run (ScenarioSingle, …, ScenarioScale); empty
	// means all of them.
	Scenarios []string
	// Scale is the scale scenario's settings; Scale.Leases 0 skips it.
	Scale ScaleOptions
	// Progress receives a line per step; nil discards.
	Progress io.Writer
	// Command is the command line to report.
	Command string
}

// scenario is one daemon process and the phases of clients run against it.
type scenario struct {
	name    string
	devices int
	phases  []phase
}

// phase is a set of client processes run together.
type phase struct {
	name    string
	mode    Mode
	clients int
	ops     int // of each kind, over all clients
}

// runs reports whether o runs the scenario name.
func (o RunOptions) runs(name string) bool {
	if name == ScenarioScale && o.Scale.Leases == 0 {
		return false
	}
	return len(o.Scenarios) == 0 || slices.Contains(o.Scenarios, name)
}

// scenarios returns the round-trip scenarios o runs (the scale scenario runs on its own:
// runScale).
func (o RunOptions) scenarios() []scenario {
	return slices.DeleteFunc(o.allScenarios(), func(sc scenario) bool { return !o.runs(sc.name) })
}

// clientsPerDevice is how many client processes of the parallel scenario share a fake
// device, as VMs share a device's BAR.
const clientsPerDevice = 8

// parallelDevices returns the fake devices of the parallel scenario for clients processes.
func parallelDevices(clients int) int { return max(1, (clients+clientsPerDevice-1)/clientsPerDevice) }

// allScenarios returns every round-trip scenario.
func (o RunOptions) allScenarios() []scenario {
	return []scenario{
		{name: ScenarioSingle, devices: 1, phases: []phase{{name: "1 client process", mode: ModeMixed, clients: 1, ops: o.Ops}}},
		{name: ScenarioParallel, devices: parallelDevices(o.Clients), phases: []phase{
			{name: fmt.Sprintf("%d client processes", o.Clients), mode: ModeMixed, clients: o.Clients, ops: o.Ops}}},
		{name: ScenarioRevoke, devices: 1, phases: []phase{{name: "revoke", mode: ModeRevoke, clients: 1, ops: o.Revokes}}},
		{name: ScenarioAllocs, devices: 1, phases: []phase{
			{name: "broker only", mode: ModeBroker, clients: 1, ops: o.AllocOps},
			{name: "floor only", mode: ModeFloor, clients: 1, ops: o.AllocOps}}},
	}
}

func (o RunOptions) validate() error {
	var errs []error
	for _, v := range []struct {
		name string
		n    int
	}{{"ops", o.Ops}, {"clients", o.Clients}, {"revokes", o.Revokes}, {"alloc-ops", o.AllocOps}} {
		if v.n < 1 {
			errs = append(errs, fmt.Errorf("-%s %d: want at least 1", v.name, v.n))
		}
	}
	if o.FDStore < 0 {
		errs = append(errs, fmt.Errorf("-fd-store %d: must not be negative", o.FDStore))
	}
	if o.Warmup < 0 {
		errs = append(errs, fmt.Errorf("-warmup %d: must not be negative", o.Warmup))
	}
	if o.Clients > o.Ops {
		errs = append(errs, fmt.Errorf("-clients %d is more than -ops %d", o.Clients, o.Ops))
	}
	switch o.RevokeWithin {
	case revokeBatched, revokeAtOnce, revokeAuto:
	default:
		errs = append(errs, fmt.Errorf("-revoke-within %q: want %s, %s or %s", o.RevokeWithin, revokeBatched, revokeAtOnce, revokeAuto))
	}
	if o.Clients > 250 {
		errs = append(errs, fmt.Errorf("-clients %d: at most 250 (one fake device each)", o.Clients))
	}
	known := []string{ScenarioSingle, ScenarioParallel, ScenarioRevoke, ScenarioAllocs, ScenarioScale}
	for _, name := range o.Scenarios {
		if !slices.Contains(known, name) {
			errs = append(errs, fmt.Errorf("-scenarios: unknown scenario %q (want %s)", name, strings.Join(known, ", ")))
		}
	}
	if slices.Contains(o.Scenarios, ScenarioScale) && o.Scale.Leases == 0 {
		errs = append(errs, errors.New("-scenarios scale with -scale-leases 0: nothing to run"))
	}
	if o.Scale.Leases < 0 {
		errs = append(errs, fmt.Errorf("-scale-leases %d: must not be negative", o.Scale.Leases))
	}
	errs = append(errs, o.Scale.validate(o.Warmup))
	return errors.Join(errs...)
}

// Values of RunOptions.RevokeWithin.
const (
	revokeBatched = "1h"
	revokeAtOnce  = "0s"
	revokeAuto    = "auto"
)

// Timeouts of the steps of a run: guards against a hang, not measurements.
const (
	startTimeout = time.Minute      // daemon until READY=1, client until ready
	stopGrace    = time.Minute      // daemon after SIGTERM
	phaseTimeout = 6 * time.Hour    // clients from go to done
	killGrace    = 10 * time.Second // client after its stdin closed
)

// Run runs every scenario and returns the report. It fails if any process fails, any
// operation fails or any count is off; it never fails on speed.
func Run(ctx context.Context, o RunOptions) (*Report, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if o.Exe == nil {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		o.Exe = []string{exe}
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	base := o.BaseDir
	if base == "" {
		base = defaultBaseDir()
	}
	dir, err := os.MkdirTemp(base, "mbb")
	if err != nil {
		return nil, err
	}
	if o.Keep {
		fmt.Fprintf(o.Progress, "run directory %s (kept)\n", dir)
	}
	rep, err := runAll(ctx, o, dir)
	switch {
	case err != nil && !o.Keep:
		err = fmt.Errorf("%w\nrun directory kept: %s", err, dir)
	case !o.Keep:
		os.RemoveAll(dir)
	}
	return rep, err
}

// runAll runs every scenario in the run's directory dir.
func runAll(ctx context.Context, o RunOptions, dir string) (*Report, error) {
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return nil, err
		}
	}
	rep := &Report{Machine: machineFacts(dir), Command: o.Command, Options: o, Limits: LimitNotes()}
	for _, sc := range o.scenarios() {
		sr, err := runScenario(ctx, o, dir, sc)
		if err != nil {
			return nil, fmt.Errorf("scenario %s: %w", sc.name, err)
		}
		rep.Scenarios = append(rep.Scenarios, sr)
	}
	if o.runs(ScenarioScale) {
		sr, err := runScale(ctx, o, dir)
		if err != nil {
			return nil, fmt.Errorf("scenario %s: %w", ScenarioScale, err)
		}
		rep.Scale = sr
	}
	for i := range rep.Scenarios {
		sr := &rep.Scenarios[i]
		if sr.Profile != "" {
			sr.ProfileTop = profileTop(ctx, sr.Profile)
		}
	}
	if sr := rep.Scale; sr != nil && sr.Profile != "" {
		sr.ProfileTop = profileTop(ctx, sr.Profile)
		sr.MemProfileTop = heapTop(ctx, sr.MemProfile)
		if sr.RestartProfile != "" {
			sr.RestartProfileTop = profileTop(ctx, sr.RestartProfile)
		}
	}
	return rep, nil
}

// runScenario runs one daemon process and the scenario's phases against it.
func runScenario(ctx context.Context, o RunOptions, runDir string, sc scenario) (ScenarioResult, error) {
	dir := filepath.Join(runDir, sc.name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return ScenarioResult{}, err
	}
	perClient, clients := 0, 0
	for _, ph := range sc.phases {
		perClient = max(perClient, (ph.ops+ph.clients-1)/ph.clients+o.Warmup)
		clients = max(clients, ph.clients)
	}
	sr := ScenarioResult{Name: sc.name, Devices: sc.devices}
	rw := o.RevokeWithin
	if rw == revokeAuto {
		rw = revokeBatched
	}
	var d *daemonProc
	for {
		cfg := DaemonConfig{Dir: dir, Devices: sc.devices, MaxLeases: MaxLeasesFor(sc.devices, clients, perClient, rw == revokeBatched),
			TenantsBy: o.TenantsBy, LogLevel: o.LogLevel, RevokeWithin: rw}
		sr.RevokeWithin, sr.MaxLeases, sr.Config = rw, cfg.MaxLeases, cfg.TOML()
		cfgPath := filepath.Join(dir, configFile)
		if err := os.WriteFile(cfgPath, []byte(sr.Config), 0o600); err != nil {
			return sr, err
		}
		argv := append(append([]string{}, o.Exe...), "daemon", "-config", cfgPath,
			"-floor-grpc", filepath.Join(dir, floorGRPC), "-floor-claim", filepath.Join(dir, floorClaim))
		if o.ProfileDir != "" {
			sr.Profile = filepath.Join(o.ProfileDir, "daemon-"+sc.name+".pprof")
			argv = append(argv, "-cpuprofile", sr.Profile)
		}
		var err error
		d, err = startDaemon(ctx, argv, childEnv(o.Env...), o.FDStore, startTimeout)
		if err == nil {
			break
		}
		// The daemon's own fd check, which counts ended leases: batching needs room for
		// 1024 of them per device.
		if o.RevokeWithin == revokeAuto && rw == revokeBatched && strings.Contains(err.Error(), "RLIMIT_NOFILE") {
			for line := range strings.SplitSeq(err.Error(), "\n") {
				if strings.Contains(line, "RLIMIT_NOFILE") {
					sr.Fallback = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "mmiobroker-bench daemon:"))
				}
			}
			fmt.Fprintf(o.Progress, "%s: revoke_within %s refused (%s); running with %s\n", sc.name, rw, sr.Fallback, revokeAtOnce)
			rw = revokeAtOnce
			continue
		}
		return sr, err
	}
	fmt.Fprintf(o.Progress, "%s: daemon pid %d ready (%s, revoke_within %s, max_leases %d)\n", sc.name, d.pid(), plural(sc.devices, "fake device"), rw, sr.MaxLeases)
	for _, ph := range sc.phases {
		pr, err := runPhase(ctx, o, dir, ph, sc.devices, d)
		if err != nil {
			// Stopped as usual, so that whatever the daemon has to say about the
			// failure is in its log: the last of it goes with the error and to a file.
			err = fmt.Errorf("%s: %w", ph.name, err)
			if serr := d.stop(stopGrace); serr != nil {
				err = fmt.Errorf("%w\n%w", err, serr)
			}
			if l := d.log.Matching(10, "WARN", "ERROR"); l != "" {
				err = fmt.Errorf("%w\ndaemon (pid %d) warnings and errors:\n%s", err, d.pid(), indent(l))
			}
			if werr := os.WriteFile(filepath.Join(dir, "daemon.log"), []byte(d.log.Last(1<<20)), 0o600); werr != nil {
				err = errors.Join(err, werr)
			}
			return sr, err
		}
		fmt.Fprintf(o.Progress, "%s: %s: %d operations of each kind in %v\n", sc.name, ph.name, ph.ops, pr.Wall.Round(time.Millisecond))
		sr.Phases = append(sr.Phases, pr)
	}
	if err := d.stop(stopGrace); err != nil {
		return sr, err
	}
	return sr, nil
}

// clientProc is a running client process.
type clientProc struct {
	*child
	stdin io.WriteCloser
	lines chan string
	out   string
	ops   int
}

// expect waits for the client's next line, which must be want.
func (c *clientProc) expect(ctx context.Context, want string, timeout time.Duration, d *daemonProc) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line := <-c.lines:
		if line != want {
			return c.failure(fmt.Sprintf("said %q, want %q", line, want))
		}
		return nil
	case <-c.exited:
		select {
		case line := <-c.lines:
			if line == want {
				return nil
			}
		default:
		}
		err := c.failure(fmt.Sprintf("exited before %q", want))
		select {
		case <-d.exited:
			err = fmt.Errorf("%w\n%w", err, d.failure("the daemon is gone"))
		default:
		}
		return err
	case <-t.C:
		return c.failure(fmt.Sprintf("no %q within %v", want, timeout))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// runPhase runs ph's client processes together against d and measures them.
func runPhase(ctx context.Context, o RunOptions, dir string, ph phase, devices int, d *daemonProc) (PhaseResult, error) {
	pr := PhaseResult{Name: ph.name, Mode: ph.mode, Clients: ph.clients, Ops: ph.ops}
	procs := make([]*clientProc, 0, ph.clients)
	defer func() {
		for _, p := range procs {
			p.stdin.Close()
			p.kill()
		}
	}()
	for i := range ph.clients {
		n := ph.ops / ph.clients
		if i < ph.ops%ph.clients {
			n++
		}
		out := filepath.Join(dir, fmt.Sprintf("%s-client-%d.json", ph.mode, i))
		argv := append(append([]string{}, o.Exe...), "client", "-dir", dir, "-bdf", DeviceBDF(i%max(devices, 1)),
			"-mode", string(ph.mode), "-ops", strconv.Itoa(n), "-warmup", strconv.Itoa(o.Warmup), "-out", out)
		rd, wr, err := os.Pipe()
		if err != nil {
			return PhaseResult{}, err
		}
		lines := make(chan string, 4)
		c, err := startChild(fmt.Sprintf("client %d", i), argv, childEnv(o.Env...), rd, &lineWriter{lines: lines})
		rd.Close()
		if err != nil {
			wr.Close()
			return PhaseResult{}, err
		}
		procs = append(procs, &clientProc{child: c, stdin: wr, lines: lines, out: out, ops: n})
	}
	for _, p := range procs {
		if err := p.expect(ctx, lineReady, startTimeout, d); err != nil {
			return PhaseResult{}, err
		}
	}
	var err error
	if pr.Before, err = sampleDaemon(ctx, d.pid(), filepath.Join(dir, metricsSocket)); err != nil {
		return PhaseResult{}, err
	}
	start := time.Now()
	for _, p := range procs {
		if _, err := io.WriteString(p.stdin, lineGo+"\n"); err != nil {
			return PhaseResult{}, p.failure(err.Error())
		}
	}
	for _, p := range procs {
		if err := p.expect(ctx, lineDone, phaseTimeout, d); err != nil {
			return PhaseResult{}, err
		}
	}
	pr.Wall = time.Since(start)
	if pr.After, err = sampleDaemon(ctx, d.pid(), filepath.Join(dir, metricsSocket)); err != nil {
		return PhaseResult{}, err
	}
	results := make([]*ClientResult, len(procs))
	for i, p := range procs {
		p.stdin.Close()
		t := time.NewTimer(killGrace)
		select {
		case <-p.exited:
		case <-t.C:
		}
		t.Stop()
		if p.err != nil || !exited(p.child) {
			return PhaseResult{}, p.failure("did not exit cleanly")
		}
		var r ClientResult
		if err := readJSON(p.out, &r); err != nil {
			return PhaseResult{}, p.failure(err.Error())
		}
		if err := checkCounts(&r, ph.mode, p.ops); err != nil {
			return PhaseResult{}, p.failure(err.Error())
		}
		results[i] = &r
	}
	pr.summarize(results)
	return pr, nil
}

// exited reports whether c has exited.
func exited(c *child) bool {
	select {
	case <-c.exited:
		return true
	default:
		return false
	}
}

// checkCounts makes sure a client ran n operations of each kind of mode, and none else.
func checkCounts(r *ClientResult, mode Mode, n int) error {
	want := map[string]int{}
	switch mode {
	case ModeMixed:
		want["broker"], want["floor"] = n, n
	case ModeBroker:
		want["broker"] = n
	case ModeFloor:
		want["floor"] = n
	case ModeRevoke:
		want["revoke"], want["unary"] = n, n
	}
	got := map[string]int{"broker": len(r.Broker), "floor": len(r.Floor), "revoke": len(r.Revoke), "unary": len(r.Unary)}
	var errs []error
	for _, k := range []string{"broker", "floor", "revoke", "unary"} {
		if got[k] != want[k] {
			errs = append(errs, fmt.Errorf("%d %s operations recorded, want %d", got[k], k, want[k]))
		}
	}
	if r.Mode != mode {
		errs = append(errs, fmt.Errorf("mode %q, want %q", r.Mode, mode))
	}
	return errors.Join(errs...)
}

// profileTop returns two listings of `go tool pprof` of the daemon's CPU profile at path:
// the top functions by their own time with the floor left out (-tagignore role=floor: the
// runtime's unlabelled work, such as the garbage collector, stays in), and the top by
// cumulative time of the daemon's goroutines alone (-tagfocus role=daemon), which names
// the handlers and paths. It returns why not, if pprof fails.
func profileTop(ctx context.Context, path string) string {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "no go command to read the profile: " + err.Error()
	}
	var parts []string
	for _, args := range [][]string{
		{"-top", "-nodecount=25", "-tagignore=" + labelRole + "=" + roleFloor},
		{"-top", "-cum", "-nodecount=40", "-tagfocus=" + labelRole + "=" + roleDaemon},
	} {
		out, err := exec.CommandContext(ctx, goTool, append(append([]string{"tool", "pprof"}, args...), path)...).CombinedOutput()
		if err != nil {
			return fmt.Sprintf("go tool pprof %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		// Drop pprof's header lines about the file and the build; keep from "Duration".
		s := string(out)
		if i := strings.Index(s, "Duration:"); i >= 0 {
			s = s[i:]
		}
		parts = append(parts, "$ go tool pprof "+strings.Join(args, " ")+" "+filepath.Base(path)+"\n"+strings.TrimRight(s, "\n"))
	}
	return strings.Join(parts, "\n\n")
}

// heapTop returns the top of `go tool pprof` of a heap profile by the bytes in use, or
// why not.
func heapTop(ctx context.Context, path string) string {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "no go command to read the profile: " + err.Error()
	}
	args := []string{"-top", "-nodecount=30", "-sample_index=inuse_space"}
	out, err := exec.CommandContext(ctx, goTool, append(append([]string{"tool", "pprof"}, args...), path)...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("go tool pprof %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	s := string(out)
	if i := strings.Index(s, "Showing"); i >= 0 {
		s = s[i:]
	}
	return "$ go tool pprof " + strings.Join(args, " ") + " " + filepath.Base(path) + "\n" + strings.TrimRight(s, "\n")
}
