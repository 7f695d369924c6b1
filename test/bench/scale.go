package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/server"
)

// ScenarioScale is the scale scenario's name.
const ScenarioScale = "scale"

// ScaleOptions are the scale scenario's settings (RunOptions.Scale).
type ScaleOptions struct {
	// Leases is how many live leases the holder processes fill the daemon with; 0 skips
	// the scenario.
	Leases int
	// Devices is the number of fake devices the leases spread over.
	Devices int
	// UIDs is the number of uids the holder processes run as (root only; otherwise they
	// run as the orchestrator's uid).
	UIDs int
	// PerProcess is the most leases (and so fds) one holder process holds: RLIMIT_NOFILE
	// bounds a process's fds.
	PerProcess int
	// Probes is how many GetLease and how many AllocateLease round trips are timed at each
	// level of leases.
	Probes int
	// Watchers is how many WatchEvents streams read the event stream (0: none), at Rate
	// events per second for Stream.
	Watchers int
	Rate     int
	Stream   time.Duration
}

// Fixed parts of the scale scenario.
const (
	// scaleUIDBase is the first uid of the holder processes (uids without a passwd entry,
	// which setuid does not need).
	scaleUIDBase = 200000
	// watchersPerProc and streamsPerConn spread the event streams over watcher processes
	// and their connections (the daemon serves at most 64 concurrent RPCs per connection).
	watchersPerProc = 250
	streamsPerConn  = 50
	// renewers is how many RenewLease calls the event producer keeps in flight at most.
	renewers = 32
	// renewTTL is the time to live the producer renews leases with (longer than a run).
	renewTTL = time.Hour
	// logWait is how long the orchestrator waits for a line of the daemon's log that
	// the daemon wrote before it said READY=1.
	logWait = 10 * time.Second
	// topWalks is how many walks over every lease the top level times.
	topWalks = 3
	// rateSteps is how many event rates the watch phase tries, halving the rate after a
	// step in which subscribers lost events.
	rateSteps = 4
	// scaleFDLimit is the RLIMIT_NOFILE the scale daemon's start-up check of its fd budget
	// is told (daemon.Options.FDLimit, the bench daemon's -fd-limit), because the check
	// would refuse 100,000 leases under this machine's real limit: it counts three fds for
	// every lease up to max_leases (the broker's dma-buf copy, the holder's pidfd and its
	// waiter's dup), which is the worst case of a device cycle reissuing every lease at
	// once (every reissued lease is unclaimed, its dma-buf held by the daemon until its
	// holder claims it again). A claimed lease holds no fd in the daemon: the daemon closes
	// its copy (and the fd store's) once the claim is delivered, and a holder process costs
	// two fds however many leases it holds. The scenario never cycles a device with leases
	// on it, measures the daemon's real open fds (process_open_fds) at every level, and
	// reports the real limit next to this one. The process's real RLIMIT_NOFILE is
	// unchanged: a daemon that ran out of fds would fail the run.
	scaleFDLimit = 1 << 20
)

func (o ScaleOptions) validate(warmup int) error {
	if o.Leases == 0 {
		return nil
	}
	var errs []error
	for _, v := range []struct {
		name string
		n    int
	}{{"scale-leases", o.Leases}, {"scale-devices", o.Devices}, {"scale-uids", o.UIDs}, {"scale-per-process", o.PerProcess}, {"scale-probes", o.Probes}} {
		if v.n < 1 {
			errs = append(errs, fmt.Errorf("-%s %d: want at least 1", v.name, v.n))
		}
	}
	if o.Watchers < 0 || o.Rate < 0 || o.Stream < 0 {
		errs = append(errs, fmt.Errorf("-scale-watchers %d, -scale-rate %d, -scale-stream %v: must not be negative", o.Watchers, o.Rate, o.Stream))
	}
	if o.Watchers > 0 && (o.Rate < 1 || o.Stream <= 0) {
		errs = append(errs, fmt.Errorf("-scale-watchers %d needs -scale-rate and -scale-stream above 0", o.Watchers))
	}
	if o.Devices > 249 {
		errs = append(errs, fmt.Errorf("-scale-devices %d: at most 249 (and a spare device)", o.Devices))
	}
	if probes := len(scaleLevels(o.Leases)) * (warmup + o.Probes); probes > scalePagesPerD {
		errs = append(errs, fmt.Errorf("-scale-probes %d (and -warmup %d) at %d levels need %d pages of the spare device; it has %d",
			o.Probes, warmup, len(scaleLevels(o.Leases)), probes, scalePagesPerD))
	}
	if errs == nil {
		if pages := scalePages(o, warmup); pages > scalePagesPerD {
			errs = append(errs, fmt.Errorf("-scale-leases %d and %d probe leases need %d pages of each of %d devices; a device has %d",
				o.Leases, len(scaleLevels(o.Leases))*(warmup+o.Probes), pages, o.Devices, scalePagesPerD))
		}
	}
	return errors.Join(errs...)
}

// scalePages is how many pages of each device the scenario's leases use: the fill's, then
// the probes'.
func scalePages(o ScaleOptions, warmup int) int {
	probes := len(scaleLevels(o.Leases)) * (warmup + o.Probes)
	return (o.Leases+o.Devices-1)/o.Devices + (probes+o.Devices-1)/o.Devices
}

// scaleLevels returns the lease counts at which the scenario measures: 1%, 10%, 50% and
// all of n (those that are at least 1, once each).
func scaleLevels(n int) []int {
	var out []int
	for _, l := range []int{n / 100, n / 10, n / 2, n} {
		if l >= 1 && (len(out) == 0 || out[len(out)-1] < l) {
			out = append(out, l)
		}
	}
	return out
}

// scaleProcs returns how many holder processes hold n leases: enough that none holds more
// than perProc, and at least one per uid (each with at least one lease).
func scaleProcs(n, perProc, uids int) int {
	return max((n+perProc-1)/perProc, min(uids, n), 1)
}

// share returns how many of the lease numbers below n (dealt round robin over procs
// processes) process i holds.
func share(n, procs, i int) int {
	s := n / procs
	if i < n%procs {
		s++
	}
	return s
}

// ScaleResult is what the scale scenario measured.
type ScaleResult struct {
	// Devices is the number of fake devices the leases spread over; the daemon has one
	// more, the spare, which holds none.
	//
	// Leases, Procs (holder processes), Probes (timed calls of each kind per
	// level) and Warmup (unrecorded calls of each kind before them) are the scenario's
	// sizes; UIDs the holder processes' uids (one uid, the orchestrator's, if it is not
	// root: UIDsNote says why).
	Leases, Devices, Procs, Probes, Warmup int
	UIDs                                   []int
	UIDsNote                               string
	// MaxLeases and RevokeWithin are the daemon's [limits] max_leases (and
	// max_leases_per_holder) and revoke_within; Config its configuration file.
	MaxLeases    int
	RevokeWithin string
	Config       string
	// FDLimit is the RLIMIT_NOFILE the daemon's fd budget check was told (scaleFDLimit);
	// RealFDLimit the process's real hard limit, which its soft limit is raised to.
	FDLimit, RealFDLimit uint64
	// Base samples the daemon before any lease.
	Base Sample
	// Levels are the measurements at each lease count, in increasing order.
	Levels []ScaleLevel
	// Lists are ListLeases walks at the top level: every lease, then with filters.
	Lists []ListWalk
	// JournalBytes is the lease journal's file size at the top level (0: no journal).
	JournalBytes int64
	// Watch is the event stream phase (nil: none).
	Watch *WatchResult
	// Restart is the restart of the daemon with every lease (nil: not run, RestartNote
	// says why).
	Restart     *RestartResult
	RestartNote string
	// CPUs is the machine's number of CPUs; LoadBefore and LoadAfter its load averages
	// (/proc/loadavg: 1, 5 and 15 minutes) when the scenario started and ended.
	CPUs                  int
	LoadBefore, LoadAfter string
	// Profile and MemProfile are the first daemon process's CPU and heap profiles, and
	// RestartProfile the restarted one's CPU profile ("": none); the Tops are their tops.
	Profile, ProfileTop               string
	MemProfile, MemProfileTop         string
	RestartProfile, RestartProfileTop string
}

// ScaleLevel is the measurements with Leases live leases.
type ScaleLevel struct {
	Leases int
	// FillWall is how long the holder processes took, together, to fill up from the
	// previous level (FillAdded leases); Fill is the latency of those lease round trips.
	FillWall  time.Duration
	FillAdded int
	Fill      Summary
	// Sample is the daemon after the fill.
	Sample Sample
	// List is the latency of each ListLeases call (page_size 1000) of a walk over every
	// lease; Pages how many calls it took.
	List  Summary
	Pages int
	// Get is the latency of GetLease of random live leases; Alloc that of AllocateLease
	// and claim until the fd is in hand (the lease then released, not timed) on the
	// devices that hold the leases, Spare the same on a device that holds none.
	Get, Alloc, Spare Summary
}

// ListWalk is one ListLeases walk with page_size 1000 until no next_page_token.
type ListWalk struct {
	// Name says what was listed (the filter).
	Name string
	// Calls and Leases are how many calls the walk took and how many leases they listed.
	Calls, Leases int
	// Lat is the latency of each call; Wall the whole walk's time.
	Lat  Summary
	Wall time.Duration
}

// WatchResult is the event stream phase.
type WatchResult struct {
	// Subscribers streams in Procs watcher processes over Conns connections.
	Subscribers, Procs, Conns int
	// Steps are the rates tried, in order.
	Steps []WatchStep
}

// WatchStep is one event rate of the watch phase.
type WatchStep struct {
	// Rate is the target rate of events per second; Renews how many RenewLease calls (one
	// event each) the producer made in Elapsed, Achieved their rate; Skipped how many it
	// did not make because all its calls in flight were still waiting for the daemon.
	Rate     int
	Renews   int
	Skipped  int
	Elapsed  time.Duration
	Achieved float64
	// Events is how many events the daemon emitted meanwhile (its sequence numbers).
	Events uint64
	// Report adds up the watcher processes' reports; Latency summarizes Report.Latency.
	Report  WatchReport
	Latency Summary
	// Sample is the daemon with every stream open, when the producer stopped; DaemonCPU
	// the CPU time the daemon process used while the producer ran, and WatcherCPU that
	// of the watcher processes from their streams' opening to their last event.
	Sample                Sample
	DaemonCPU, WatcherCPU time.Duration
}

// Drops reports whether subscribers lost events at this step.
func (s WatchStep) Drops() bool {
	return s.Report.Cut > 0 || s.Report.Missing > 0 || s.Report.Incomplete > 0
}

// RestartResult is a stop of the daemon that keeps its leases and the start of a new
// daemon process on its journal and fd store.
type RestartResult struct {
	// Leases are the live leases before the stop; JournalBytes the journal's size then.
	Leases       int
	JournalBytes int64
	// Stop is the time from SIGTERM to the old process's exit; Ready from the new
	// process's start to its READY=1.
	Stop, Ready time.Duration
	// Loaded, Restored and Serving are the times from the new process's start to its log
	// lines "leases are kept across restarts" (journal opened and loaded), "leases
	// restored" (the broker took every lease back, holders re-pinned) and "serving" (just
	// before READY=1); -1 if the line was not found. The log has millisecond timestamps.
	Loaded, Restored, Serving time.Duration
	// RestoredLine is the daemon's "leases restored" log line.
	RestoredLine string
	// SeqBefore and SeqAfter are the last event's sequence number before the stop and
	// once the new process is ready (equal: the restart changed no lease).
	SeqBefore, SeqAfter uint64
	// LiveAfter is how many live leases the new process lists; HoldersMatched how many
	// holder processes it lists exactly their leases for.
	LiveAfter, HoldersMatched int
	// After samples the new process once it is ready.
	After Sample
}

// scaleRun is the state of a running scale scenario.
type scaleRun struct {
	o        RunOptions
	so       ScaleOptions
	dir      string
	daemon   []string // the daemon mode's command line
	env      []string
	d        *daemonProc
	api      *client.Client
	holders  []*cmdProc
	res      *ScaleResult
	rng      *rand.Rand
	probes   int      // probe leases allocated so far on the devices with leases
	spares   int      // probe leases allocated so far on the spare device
	liveIDs  []string // live leases of the last walk
	progress io.Writer
}

// runScale runs the scale scenario in the run's directory runDir.
func runScale(ctx context.Context, o RunOptions, runDir string) (*ScaleResult, error) {
	so := o.Scale
	s := &scaleRun{o: o, so: so, dir: filepath.Join(runDir, ScenarioScale), env: childEnv(o.Env...),
		rng: rand.New(rand.NewPCG(1, 2)), progress: o.Progress}
	res := &ScaleResult{Leases: so.Leases, Devices: so.Devices, Probes: so.Probes, Warmup: o.Warmup, RevokeWithin: revokeBatched, FDLimit: scaleFDLimit}
	s.res = res
	res.CPUs, res.LoadBefore = runtime.NumCPU(), loadAvg()
	defer func() { res.LoadAfter = loadAvg() }()
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return nil, err
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil {
		res.RealFDLimit = rl.Max
	}
	holderExe, err := s.chooseUIDs(runDir)
	if err != nil {
		return nil, err
	}
	res.Procs = scaleProcs(so.Leases, so.PerProcess, len(res.UIDs))
	// R 1h: a probe's release leaves its lease ended-but-live instead of cycling its
	// device, which would reissue the device's other (held) leases.
	// One more device than the leases spread over: the spare, which holds none.
	cfg := DaemonConfig{Dir: s.dir, Devices: so.Devices + 1, TenantsBy: o.TenantsBy, LogLevel: o.LogLevel, RevokeWithin: revokeBatched,
		MaxLeases: so.Leases + 2*len(scaleLevels(so.Leases))*(o.Warmup+so.Probes) + 64, Bars: []int{scaleBAR}, AllowUIDs: res.UIDs, SocketMode: "0666"}
	res.MaxLeases, res.Config = cfg.MaxLeases, cfg.TOML()
	cfgPath := filepath.Join(s.dir, configFile)
	if err := os.WriteFile(cfgPath, []byte(res.Config), 0o644); err != nil {
		return nil, err
	}
	s.daemon = append(append([]string{}, o.Exe...), "daemon", "-config", cfgPath,
		"-floor-grpc", filepath.Join(s.dir, floorGRPC), "-floor-claim", filepath.Join(s.dir, floorClaim),
		"-kept-devices", "-fd-limit", strconv.FormatUint(scaleFDLimit, 10))
	first := s.daemon
	if o.ProfileDir != "" {
		res.Profile = filepath.Join(o.ProfileDir, "daemon-scale.pprof")
		res.MemProfile = filepath.Join(o.ProfileDir, "daemon-scale-heap.pprof")
		first = append(slices.Clone(s.daemon), "-cpuprofile", res.Profile, "-memprofile", res.MemProfile)
	}
	s.d, err = startDaemon(ctx, first, s.env, o.FDStore, startTimeout)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(s.progress, "scale: daemon pid %d ready (%s, %d holder processes as %s, max_leases %d)\n",
		s.d.pid(), plural(so.Devices, "fake device"), res.Procs, plural(len(res.UIDs), "uid"), res.MaxLeases)
	err = s.run(ctx, holderExe)
	for _, h := range s.holders {
		h.stdin.Close()
	}
	if s.d != nil {
		// Stopped first, keeping the leases: the holders' exits then end nothing.
		if serr := s.d.stop(stopGrace); serr != nil && err == nil {
			err = serr
		} else if serr != nil {
			err = fmt.Errorf("%w\n%w", err, serr)
		}
		if err != nil {
			if l := s.d.log.Matching(10, "WARN", "ERROR"); l != "" {
				err = fmt.Errorf("%w\ndaemon (pid %d) warnings and errors:\n%s", err, s.d.pid(), indent(l))
			}
			if werr := os.WriteFile(filepath.Join(s.dir, "daemon.log"), []byte(s.d.log.Last(1<<20)), 0o600); werr != nil {
				err = errors.Join(err, werr)
			}
		}
	}
	for _, h := range s.holders {
		if cerr := h.wait(killGrace); cerr != nil && err == nil {
			err = cerr
		}
	}
	if s.api != nil {
		s.api.Close()
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

// chooseUIDs picks the holder processes' uids and returns the command line prefix they
// run: as root, o.UIDs uids from scaleUIDBase, with a copy of the executable they can
// run; otherwise (or if the run's directory is not reachable by other users) the
// orchestrator's own uid.
func (s *scaleRun) chooseUIDs(runDir string) ([]string, error) {
	res := s.res
	own := []int{os.Getuid()}
	switch {
	case os.Geteuid() != 0:
		res.UIDs, res.UIDsNote = own, "not run as root, so the holder processes run as the orchestrator's uid"
		return s.o.Exe, nil
	case !searchable(runDir):
		res.UIDs, res.UIDsNote = own, fmt.Sprintf("a directory above %s is not searchable by other users, so the holder processes run as the orchestrator's uid", runDir)
		return s.o.Exe, nil
	}
	for i := range s.so.UIDs {
		res.UIDs = append(res.UIDs, scaleUIDBase+i)
	}
	// Other uids must reach the sockets and run the executable, whose directory (a go
	// build cache, a test's) may be private.
	if err := os.Chmod(runDir, 0o711); err != nil {
		return nil, err
	}
	exe := filepath.Join(s.dir, "mmiobroker-bench")
	if err := copyFile(s.o.Exe[0], exe, 0o755); err != nil {
		return nil, fmt.Errorf("copy the executable for the holder processes: %w", err)
	}
	return append([]string{exe}, s.o.Exe[1:]...), nil
}

// loadAvg returns the machine's load averages over 1, 5 and 15 minutes, or "-".
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(data)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "-"
}

// searchable reports whether every directory above dir lets other users through.
func searchable(dir string) bool {
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil || st.Mode().Perm()&0o001 == 0 {
			return false
		}
		if d == filepath.Dir(d) {
			return true
		}
	}
}

// copyFile copies src to a new file dst with mode perm.
func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	return errors.Join(err, out.Close())
}

// run runs the scenario's steps against the running daemon.
func (s *scaleRun) run(ctx context.Context, holderExe []string) error {
	res := s.res
	var err error
	if s.api, err = client.Dial(filepath.Join(s.dir, controlSocket)); err != nil {
		return err
	}
	if res.Base, err = s.sample(ctx); err != nil {
		return err
	}
	for i := range res.Procs {
		uid := res.UIDs[i%len(res.UIDs)]
		x := childExtras{Dir: s.dir}
		if uid != os.Getuid() {
			x.Cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}
		}
		argv := append(slices.Clone(holderExe), "holder", "-dir", s.dir, "-index", strconv.Itoa(i),
			"-procs", strconv.Itoa(res.Procs), "-devices", strconv.Itoa(s.so.Devices))
		h, err := startCmdProc(fmt.Sprintf("holder %d (uid %d)", i, uid), argv, s.env, x)
		if err != nil {
			return err
		}
		s.holders = append(s.holders, h)
	}
	for _, h := range s.holders {
		if err := h.ready(ctx, s.d); err != nil {
			return err
		}
	}
	held := 0
	levels := scaleLevels(s.so.Leases)
	for _, n := range levels {
		lv, err := s.fill(ctx, held, n)
		if err != nil {
			return fmt.Errorf("fill to %d leases: %w", n, err)
		}
		held = n
		if err := s.measure(ctx, &lv, n == levels[len(levels)-1]); err != nil {
			return fmt.Errorf("at %d leases: %w", n, err)
		}
		res.Levels = append(res.Levels, lv)
		fmt.Fprintf(s.progress, "scale: %d leases: filled in %v; RSS %s, %0.f open fds; ListLeases page p99 %v, GetLease p50 %v, AllocateLease p50 %v\n",
			n, lv.FillWall.Round(time.Millisecond), fmtBytes(lv.Sample.RSS), lv.Sample.Metrics[metricOpenFDs], lv.List.P99, lv.Get.P50, lv.Alloc.P50)
	}
	if s.so.Watchers > 0 {
		if err := s.watch(ctx); err != nil {
			return fmt.Errorf("watch: %w", err)
		}
	}
	if s.o.FDStore == 0 {
		res.RestartNote = "no fd store (-fd-store 0), so no lease journal: a restart would end every lease"
		return nil
	}
	if err := s.restart(ctx); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	return nil
}

// sample samples the daemon process.
func (s *scaleRun) sample(ctx context.Context) (Sample, error) {
	return sampleDaemon(ctx, s.d.pid(), filepath.Join(s.dir, metricsSocket))
}

// fill has the holders fill up from held to n leases, together.
func (s *scaleRun) fill(ctx context.Context, held, n int) (ScaleLevel, error) {
	lv := ScaleLevel{Leases: n, FillAdded: n - held}
	start := time.Now()
	for i, h := range s.holders {
		if err := h.send(fmt.Sprintf("%s %d", cmdFill, share(n, len(s.holders), i))); err != nil {
			return lv, err
		}
	}
	var fill Histogram
	for i, h := range s.holders {
		var fr FillResult
		if err := h.reply(ctx, phaseTimeout, s.d, &fr); err != nil {
			return lv, err
		}
		if want := share(n, len(s.holders), i); fr.Held != want {
			return lv, h.failure(fmt.Sprintf("holds %d leases, want %d", fr.Held, want))
		}
		fill.Merge(&fr.Fill)
	}
	lv.FillWall, lv.Fill = time.Since(start), fill.Summary()
	return lv, nil
}

// measure takes the measurements of a level: the daemon's sample, a ListLeases walk,
// GetLease and AllocateLease probes, and at the top level the filtered walks and the
// journal's size.
func (s *scaleRun) measure(ctx context.Context, lv *ScaleLevel, top bool) error {
	var err error
	if lv.Sample, err = s.sample(ctx); err != nil {
		return err
	}
	var ids []string
	all, allLat, err := s.walk(ctx, "every lease", &brokerv1.ListLeasesRequest{}, func(l *brokerv1.Lease) {
		if st := l.GetState(); st == brokerv1.LeaseState_LEASE_STATE_ACTIVE || st == brokerv1.LeaseState_LEASE_STATE_ALLOCATED {
			ids = append(ids, l.GetId())
		}
	})
	if err != nil {
		return err
	}
	if len(ids) != lv.Leases {
		return fmt.Errorf("ListLeases lists %d live leases, want %d", len(ids), lv.Leases)
	}
	s.liveIDs = ids
	lv.List, lv.Pages = all.Lat, all.Calls
	get := make([]time.Duration, 0, s.so.Probes)
	for i := range s.o.Warmup + s.so.Probes {
		id := ids[s.rng.IntN(len(ids))]
		t := time.Now()
		if _, err := s.api.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: id}); err != nil {
			return fmt.Errorf("GetLease %s: %w", id, err)
		}
		if i >= s.o.Warmup {
			get = append(get, time.Since(t))
		}
	}
	lv.Get = Summarize(get)
	alloc := make([]time.Duration, 0, s.so.Probes)
	// The probes' lease numbers come after the fill's, rounded up to whole pages of every
	// device.
	pad := (s.so.Leases + s.so.Devices - 1) / s.so.Devices * s.so.Devices
	for i := range s.o.Warmup + s.so.Probes {
		bdf, r := scaleRange(pad+s.probes, s.so.Devices)
		s.probes++
		t := time.Now()
		l, err := s.api.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: scaleBAR, Ranges: []*brokerv1.Range{r}})
		if err != nil {
			return fmt.Errorf("AllocateLease on %s at %#x: %w", bdf, r.Offset, err)
		}
		if i >= s.o.Warmup {
			alloc = append(alloc, time.Since(t))
		}
		l.File.Close()
		if _, err := s.api.Release(ctx, l.ID); err != nil {
			return fmt.Errorf("release lease %s: %w", l.ID, err)
		}
	}
	lv.Alloc = Summarize(alloc)
	// The spare device (the last) holds no leases: its probes take its pages in order.
	spare := make([]time.Duration, 0, s.so.Probes)
	for i := range s.o.Warmup + s.so.Probes {
		bdf, r := DeviceBDF(s.so.Devices), &brokerv1.Range{Offset: uint64(s.spares) * scalePage, Length: scalePage}
		s.spares++
		t := time.Now()
		l, err := s.api.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: scaleBAR, Ranges: []*brokerv1.Range{r}})
		if err != nil {
			return fmt.Errorf("AllocateLease on %s at %#x: %w", bdf, r.Offset, err)
		}
		if i >= s.o.Warmup {
			spare = append(spare, time.Since(t))
		}
		l.File.Close()
		if _, err := s.api.Release(ctx, l.ID); err != nil {
			return fmt.Errorf("release lease %s: %w", l.ID, err)
		}
	}
	lv.Spare = Summarize(spare)
	if !top {
		return nil
	}
	// Two more walks, so that the p99 is not the second slowest of about 100 calls.
	walks := allLat
	for range topWalks - 1 {
		w, lat, err := s.walk(ctx, "every lease", &brokerv1.ListLeasesRequest{}, nil)
		if err != nil {
			return err
		}
		all.Calls += w.Calls
		all.Wall += w.Wall
		walks = append(walks, lat...)
	}
	all.Name, all.Lat, all.Wall = fmt.Sprintf("every lease (%d walks)", topWalks), Summarize(walks), all.Wall/topWalks
	s.res.Lists = append(s.res.Lists, all)
	uid := uint32(s.res.UIDs[0])
	for _, f := range []struct {
		name string
		req  *brokerv1.ListLeasesRequest
	}{
		{"live_only", &brokerv1.ListLeasesRequest{LiveOnly: true}},
		{fmt.Sprintf("holder_uid %d (%s)", uid, plural(len(s.res.UIDs), "uid")), &brokerv1.ListLeasesRequest{HolderUid: &uid}},
		{fmt.Sprintf("bdf %s (%s)", DeviceBDF(0), plural(s.so.Devices, "device")), &brokerv1.ListLeasesRequest{Bdf: DeviceBDF(0)}},
	} {
		w, _, err := s.walk(ctx, f.name, f.req, nil)
		if err != nil {
			return err
		}
		s.res.Lists = append(s.res.Lists, w)
	}
	if st, err := os.Stat(filepath.Join(s.dir, journalFile)); err == nil {
		s.res.JournalBytes = st.Size()
	}
	return nil
}

// walk lists every lease that req selects, a page of 1000 at a time, and calls each (if
// not nil) with every lease. It returns the walk and the latency of each call.
func (s *scaleRun) walk(ctx context.Context, name string, req *brokerv1.ListLeasesRequest, each func(*brokerv1.Lease)) (ListWalk, []time.Duration, error) {
	w := ListWalk{Name: name}
	var lat []time.Duration
	start := time.Now()
	req.PageSize = 1000
	for {
		t := time.Now()
		resp, err := s.api.API().ListLeases(ctx, req)
		if err != nil {
			return w, nil, fmt.Errorf("ListLeases (%s) page %d: %w", name, w.Calls+1, err)
		}
		lat = append(lat, time.Since(t))
		w.Calls++
		w.Leases += len(resp.GetLeases())
		if each != nil {
			for _, l := range resp.GetLeases() {
				each(l)
			}
		}
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	w.Wall, w.Lat = time.Since(start), Summarize(lat)
	return w, lat, nil
}

// lastSeq returns the daemon's last event's sequence number (the header of a new event
// stream).
func (s *scaleRun) lastSeq(ctx context.Context) (uint64, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.api.API().WatchEvents(sctx, &brokerv1.WatchEventsRequest{})
	if err != nil {
		return 0, err
	}
	md, err := st.Header()
	if err != nil {
		return 0, err
	}
	vals := md.Get(server.LastSeqHeader)
	if len(vals) != 1 {
		return 0, fmt.Errorf("header %s: %q", server.LastSeqHeader, vals)
	}
	return strconv.ParseUint(vals[0], 10, 64)
}

// watch runs the event stream phase: the watcher processes open their streams, the
// producer renews leases at the rate for the stream's time, and the watchers report what
// their streams received; at a step where subscribers lost events, again at half the rate.
func (s *scaleRun) watch(ctx context.Context) error {
	so := s.so
	wr := &WatchResult{Subscribers: so.Watchers, Procs: (so.Watchers + watchersPerProc - 1) / watchersPerProc}
	s.res.Watch = wr
	var procs []*cmdProc
	defer func() {
		for _, p := range procs {
			p.stdin.Close()
			p.kill()
		}
	}()
	for i := range wr.Procs {
		n := share(so.Watchers, wr.Procs, i)
		wr.Conns += (n + streamsPerConn - 1) / streamsPerConn
		argv := append(slices.Clone(s.o.Exe), "watcher", "-dir", s.dir, "-streams", strconv.Itoa(n), "-per-conn", strconv.Itoa(streamsPerConn))
		p, err := startCmdProc(fmt.Sprintf("watcher %d", i), argv, s.env, childExtras{})
		if err != nil {
			return err
		}
		procs = append(procs, p)
	}
	for _, p := range procs {
		if err := p.ready(ctx, s.d); err != nil {
			return err
		}
	}
	for rate, step := so.Rate, 0; step < rateSteps && rate >= 1; rate, step = rate/2, step+1 {
		st, err := s.watchStep(ctx, procs, rate)
		if err != nil {
			return fmt.Errorf("%d events/s: %w", rate, err)
		}
		wr.Steps = append(wr.Steps, st)
		fmt.Fprintf(s.progress, "scale: %d subscribers at %d events/s: %.0f events/s made, %d cut, %d events missing, latency p99 %v\n",
			so.Watchers, rate, st.Achieved, st.Report.Cut, st.Report.Missing, st.Latency.P99)
		if !st.Drops() {
			break
		}
	}
	for _, p := range procs {
		p.stdin.Close()
	}
	for _, p := range procs {
		if err := p.wait(killGrace); err != nil {
			return err
		}
	}
	procs = nil
	if last := wr.Steps[len(wr.Steps)-1]; last.Drops() {
		return fmt.Errorf("subscribers lost events even at %d events/s (%d of %d cut, %d events missing, %d incomplete)",
			last.Rate, last.Report.Cut, last.Report.Streams, last.Report.Missing, last.Report.Incomplete)
	}
	return nil
}

// watchStep runs one rate of the watch phase.
func (s *scaleRun) watchStep(ctx context.Context, procs []*cmdProc, rate int) (WatchStep, error) {
	st := WatchStep{Rate: rate}
	for _, p := range procs {
		if err := p.send(cmdWatch); err != nil {
			return st, err
		}
	}
	for _, p := range procs {
		if err := p.reply(ctx, watchStopTimeout, s.d, nil); err != nil {
			return st, err
		}
	}
	from, err := s.lastSeq(ctx)
	if err != nil {
		return st, err
	}
	before, err := s.sample(ctx)
	if err != nil {
		return st, err
	}
	if st.Renews, st.Skipped, st.Elapsed, err = s.produce(ctx, rate, s.so.Stream); err != nil {
		return st, err
	}
	st.Achieved = float64(st.Renews) / st.Elapsed.Seconds()
	to, err := s.lastSeq(ctx)
	if err != nil {
		return st, err
	}
	st.Events = to - from
	if st.Sample, err = s.sample(ctx); err != nil {
		return st, err
	}
	st.DaemonCPU = time.Duration((st.Sample.Metrics[metricCPU] - before.Metrics[metricCPU]) * float64(time.Second))
	for _, p := range procs {
		if err := p.send(fmt.Sprintf("%s %d", cmdStop, to)); err != nil {
			return st, err
		}
	}
	for _, p := range procs {
		var wr WatchReport
		if err := p.reply(ctx, watchStopTimeout+time.Minute, s.d, &wr); err != nil {
			return st, err
		}
		if len(wr.Errors) > 0 {
			return st, p.failure(fmt.Sprintf("event streams failed: %s", strings.Join(wr.Errors, "; ")))
		}
		st.Report.Streams += wr.Streams
		st.Report.Completed += wr.Completed
		st.Report.Cut += wr.Cut
		st.Report.Incomplete += wr.Incomplete
		st.Report.Received += wr.Received
		st.Report.Missing += wr.Missing
		st.Report.Latency.Merge(&wr.Latency)
		st.WatcherCPU += wr.CPU
	}
	st.Latency = st.Report.Latency.Summary()
	return st, nil
}

// produce renews random live leases (an administrator's RenewLease, one RENEWED event
// each) at rate calls per second for d, with up to renewers calls in flight, and returns
// how many it made, how many it skipped because every renewer was still busy (the daemon
// did not keep up; they are not made up later), and the time until the last call
// returned.
func (s *scaleRun) produce(ctx context.Context, rate int, d time.Duration) (made, skipped int, elapsed time.Duration, err error) {
	ids := s.liveIDs
	tokens := make(chan string, renewers)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	ttl := durationpb.New(renewTTL)
	for range renewers {
		wg.Go(func() {
			for id := range tokens {
				_, err := s.api.API().RenewLease(ctx, &brokerv1.RenewLeaseRequest{LeaseId: id, Ttl: ttl})
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("RenewLease %s: %w", id, err))
				} else {
					made++
				}
				mu.Unlock()
			}
		})
	}
	start := time.Now()
	tick := time.NewTicker(5 * time.Millisecond)
	issued, total := 0, int(float64(rate)*d.Seconds())
	for issued < total && ctx.Err() == nil {
		<-tick.C
		due := min(int(float64(rate)*time.Since(start).Seconds()), total)
		for ; issued < due; issued++ {
			select {
			case tokens <- ids[s.rng.IntN(len(ids))]:
			default:
				skipped++
			}
		}
	}
	tick.Stop()
	close(tokens)
	wg.Wait()
	elapsed = time.Since(start)
	// Calls still queued when the time was up were made after it: count them as made
	// late, within elapsed (at most renewers of them).
	return made, skipped, elapsed, errors.Join(append(errs, ctx.Err())...)
}

// restart stops the daemon keeping its leases and starts a new daemon process on its
// journal and fd store, with every holder process still running, and checks that every
// lease came back as it was.
func (s *scaleRun) restart(ctx context.Context) error {
	rr := &RestartResult{}
	var err error
	if rr.SeqBefore, err = s.lastSeq(ctx); err != nil {
		return err
	}
	live, _, err := s.walk(ctx, "live_only", &brokerv1.ListLeasesRequest{LiveOnly: true}, nil)
	if err != nil {
		return err
	}
	rr.Leases = live.Leases
	stopAt := time.Now()
	if err := s.d.stopKeep(stopGrace); err != nil {
		s.d.sd.Close()
		s.d = nil
		return err
	}
	rr.Stop = time.Since(stopAt)
	if st, err := os.Stat(filepath.Join(s.dir, journalFile)); err == nil {
		rr.JournalBytes = st.Size()
	}
	argv := s.daemon
	if s.o.ProfileDir != "" {
		s.res.RestartProfile = filepath.Join(s.o.ProfileDir, "daemon-scale-restart.pprof")
		argv = append(slices.Clone(argv), "-cpuprofile", s.res.RestartProfile)
	}
	d, start, err := restartDaemon(ctx, s.d, argv, s.env, startTimeout)
	s.d = d
	if err != nil {
		return err
	}
	rr.Ready = time.Since(start)
	fmt.Fprintf(s.progress, "scale: daemon restarted (pid %d) with %d leases: stop %v, start to READY=1 %v\n",
		d.pid(), rr.Leases, rr.Stop.Round(time.Millisecond), rr.Ready.Round(time.Millisecond))
	rr.Loaded, _ = logSince(ctx, d.log, start, `msg="leases are kept across restarts"`)
	rr.Restored, rr.RestoredLine = logSince(ctx, d.log, start, `msg="leases restored"`)
	rr.Serving, _ = logSince(ctx, d.log, start, "msg=serving")
	if rr.SeqAfter, err = s.lastSeq(ctx); err != nil {
		return err
	}
	byPID := map[int32]int{}
	after, _, err := s.walk(ctx, "live_only", &brokerv1.ListLeasesRequest{LiveOnly: true}, func(l *brokerv1.Lease) {
		byPID[l.GetHolder().GetPid()]++
	})
	if err != nil {
		return err
	}
	rr.LiveAfter = after.Leases
	for i, h := range s.holders {
		if byPID[int32(h.pid())] == share(s.so.Leases, len(s.holders), i) {
			rr.HoldersMatched++
		}
	}
	if rr.After, err = s.sample(ctx); err != nil {
		return err
	}
	s.res.Restart = rr
	var errs []error
	if rr.LiveAfter != rr.Leases {
		errs = append(errs, fmt.Errorf("%d live leases after the restart, %d before", rr.LiveAfter, rr.Leases))
	}
	if rr.HoldersMatched != len(s.holders) {
		errs = append(errs, fmt.Errorf("the leases of %d of %d holder processes came back as they were", rr.HoldersMatched, len(s.holders)))
	}
	if rr.SeqAfter != rr.SeqBefore {
		errs = append(errs, fmt.Errorf("the restart emitted events %d to %d: it changed leases", rr.SeqBefore+1, rr.SeqAfter))
	}
	return errors.Join(errs...)
}

// logSince finds the last line of the daemon's log that contains sub (waiting a little
// for it: see tail.WaitMatching) and returns the time from start to its timestamp and the
// line; -1 and "" if there is none or it has no timestamp.
func logSince(ctx context.Context, t *tail, start time.Time, sub string) (time.Duration, string) {
	line := t.WaitMatching(ctx, sub, logWait)
	at, ok := logTime(line)
	if !ok {
		return -1, line
	}
	return at.Sub(start), line
}

// logTime returns the timestamp of a log line of the daemon (text: time=…; JSON:
// "time":"…").
func logTime(line string) (time.Time, bool) {
	var val string
	if strings.HasPrefix(line, "{") {
		var v struct{ Time string }
		if json.Unmarshal([]byte(line), &v) != nil {
			return time.Time{}, false
		}
		val = v.Time
	} else {
		_, rest, ok := strings.Cut(line, "time=")
		if !ok {
			return time.Time{}, false
		}
		val, _, _ = strings.Cut(rest, " ")
	}
	t, err := time.Parse(time.RFC3339Nano, val)
	return t, err == nil
}

// cmdProc is a holder or watcher process: commands on its standard input, one line of
// JSON in answer on its standard output.
type cmdProc struct {
	*child
	stdin io.WriteCloser
	lines chan string
}

// startCmdProc starts a holder or watcher process.
func startCmdProc(name string, argv, env []string, x childExtras) (*cmdProc, error) {
	rd, wr, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	lines := make(chan string, 4)
	c, err := startChildWith(name, argv, env, rd, &lineWriter{lines: lines}, x)
	rd.Close()
	if err != nil {
		wr.Close()
		return nil, err
	}
	return &cmdProc{child: c, stdin: wr, lines: lines}, nil
}

// ready waits for the process's ready line.
func (p *cmdProc) ready(ctx context.Context, d *daemonProc) error {
	line, err := p.next(ctx, startTimeout, d)
	if err == nil && line != lineReady {
		err = p.failure(fmt.Sprintf("said %q, want %q", line, lineReady))
	}
	return err
}

// send sends the process a command.
func (p *cmdProc) send(cmd string) error {
	if _, err := io.WriteString(p.stdin, cmd+"\n"); err != nil {
		return p.failure(fmt.Sprintf("command %q: %v", cmd, err))
	}
	return nil
}

// reply waits up to timeout for the process's answer and decodes it into v (nil: any).
func (p *cmdProc) reply(ctx context.Context, timeout time.Duration, d *daemonProc, v any) error {
	line, err := p.next(ctx, timeout, d)
	if err != nil {
		return err
	}
	if v != nil {
		if err := json.Unmarshal([]byte(line), v); err != nil {
			return p.failure(fmt.Sprintf("answer %.200q: %v", line, err))
		}
	}
	return nil
}

// next waits up to timeout for the process's next line of output.
func (p *cmdProc) next(ctx context.Context, timeout time.Duration, d *daemonProc) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line := <-p.lines:
		return line, nil
	case <-p.exited:
		select {
		case line := <-p.lines:
			return line, nil
		default:
		}
		err := p.failure("exited")
		if d != nil && exited(d.child) {
			err = fmt.Errorf("%w\n%w", err, d.failure("the daemon is gone"))
		}
		return "", err
	case <-t.C:
		return "", p.failure(fmt.Sprintf("no answer within %v", timeout))
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// wait waits up to grace for the process, whose standard input the caller closed, to
// exit, and fails unless it exited with status 0 (it is killed if it still runs).
func (p *cmdProc) wait(grace time.Duration) error {
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		p.kill()
		return p.failure(fmt.Sprintf("still running %v after its input closed; killed", grace))
	}
	if p.err != nil {
		return p.failure("did not exit cleanly")
	}
	return nil
}
