package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Main runs the command line args ("run", "daemon" or "client" and its flags) and returns
// the exit status: 0, 1 if the mode failed, 2 for a bad command line.
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	usage := func() {
		fmt.Fprintln(stderr, "Usage: mmiobroker-bench run|daemon|client|holder|watcher [flags] (-h for a mode's flags)")
	}
	if len(args) == 0 {
		usage()
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "run":
		err = mainRun(ctx, args[1:], stdout, stderr)
	case "daemon":
		err = mainDaemon(ctx, args[1:], stderr)
	case "client":
		err = mainClient(ctx, args[1:], stdin, stdout, stderr)
	case "holder":
		err = mainHolder(ctx, args[1:], stdin, stdout, stderr)
	case "watcher":
		err = mainWatcher(ctx, args[1:], stdin, stdout, stderr)
	case "-h", "-help", "--help":
		usage()
		return 0
	default:
		usage()
		return 2
	}
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "mmiobroker-bench %s: %v\n", args[0], err)
		return 2
	case err != nil:
		fmt.Fprintf(stderr, "mmiobroker-bench %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// usageError is a bad command line.
type usageError struct{ error }

// parse parses args into fs, which must take no arguments.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

func mainRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o := RunOptions{Progress: stderr}
	var out string
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.IntVar(&o.Ops, "ops", 100000, "lease round trips (and as many floor round trips) per scenario, over all its client processes")
	fs.IntVar(&o.Clients, "clients", 32, "client processes of the parallel scenario")
	fs.IntVar(&o.Revokes, "revokes", 100000, "revocations (and as many bare unary calls) of the revoke scenario")
	fs.IntVar(&o.AllocOps, "alloc-ops", 2000, "round trips of each kind alone, to count the daemon's allocations")
	fs.IntVar(&o.Warmup, "warmup", 20, "unrecorded operations of each kind per client process first")
	fs.StringVar(&out, "out", "", "write the results table (Markdown) to `file` instead of standard output")
	fs.StringVar(&o.ProfileDir, "cpuprofile", "", "write the daemon process's CPU profile of each scenario to `dir`/daemon-SCENARIO.pprof, and their top to the table")
	fs.StringVar(&o.BaseDir, "dir", "", "make the run's directory (sockets, journal) in `dir` (default: /dev/shm if a tmpfs, else $TMPDIR)")
	fs.BoolVar(&o.Keep, "keep", false, "keep the run's directory")
	fs.StringVar(&o.TenantsBy, "tenants-by", "", "the daemon's [tenants] by (default: the daemon's default)")
	fs.IntVar(&o.FDStore, "fd-store", 4096, "the fake systemd's FileDescriptorStoreMax= (deploy/mmiobrokerd.service: 4096); 0: no fd store, hence no lease journal")
	fs.StringVar(&o.RevokeWithin, "revoke-within", revokeAuto, "the daemon's [limits] revoke_within: 1h (releases batched), 0s (every release cycles its device), or auto (1h unless the daemon refuses it for want of fds, then 0s)")
	fs.StringVar(&o.LogLevel, "log-level", "", "the daemon's [daemon] log_level (default: the daemon's default, info)")
	var scenarios string
	fs.StringVar(&scenarios, "scenarios", "", "comma-separated `names` of the scenarios to run: single, parallel, revoke, allocs, scale (default: all)")
	fs.IntVar(&o.Scale.Leases, "scale-leases", 100000, "live leases of the scale scenario (0: skip it)")
	fs.IntVar(&o.Scale.Devices, "scale-devices", 100, "fake devices of the scale scenario")
	fs.IntVar(&o.Scale.UIDs, "scale-uids", 10, "uids of the scale scenario's holder processes (when run as root)")
	fs.IntVar(&o.Scale.PerProcess, "scale-per-process", 4000, "the most leases (and fds) one holder process of the scale scenario holds")
	fs.IntVar(&o.Scale.Probes, "scale-probes", 500, "GetLease and AllocateLease calls timed at each level of the scale scenario")
	fs.IntVar(&o.Scale.Watchers, "scale-watchers", 1000, "WatchEvents subscribers of the scale scenario (0: no event stream phase)")
	fs.IntVar(&o.Scale.Rate, "scale-rate", 1000, "events per second of the scale scenario's event stream")
	fs.DurationVar(&o.Scale.Stream, "scale-stream", 10*time.Second, "how long the scale scenario's event stream runs at each rate")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if scenarios != "" {
		o.Scenarios = strings.Split(scenarios, ",")
	}
	var cmd []string
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name != "keep" && f.Value.String() != "" {
			cmd = append(cmd, "-"+f.Name, f.Value.String())
		}
	})
	o.Command = "go run ./test/bench/cmd/mmiobroker-bench run " + strings.Join(cmd, " ")
	rep, err := Run(ctx, o)
	if err != nil {
		return err
	}
	if out == "" {
		return rep.Markdown(stdout)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if err := errors.Join(rep.Markdown(f), f.Close()); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "results: %s\n", out)
	return nil
}

func mainDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	var o DaemonOptions
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	fs.StringVar(&o.Config, "config", "", "mmiobrokerd configuration `file`; its devices are fake")
	fs.StringVar(&o.FloorGRPC, "floor-grpc", "", "the floor's gRPC socket `path`")
	fs.StringVar(&o.FloorClaim, "floor-claim", "", "the floor's claim socket `path`")
	fs.StringVar(&o.CPUProfile, "cpuprofile", "", "write a CPU profile to `file` at exit")
	fs.StringVar(&o.MemProfile, "memprofile", "", "write a heap profile to `file` when told to stop")
	fs.BoolVar(&o.KeptDevices, "kept-devices", false, "fake devices that survive a restart of this process through the fd store")
	fs.Uint64Var(&o.FDLimit, "fd-limit", 0, "the RLIMIT_NOFILE the daemon's fd budget check assumes (0: the process's own)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if o.Config == "" || o.FloorGRPC == "" || o.FloorClaim == "" {
		return usageError{errors.New("-config, -floor-grpc and -floor-claim are required")}
	}
	return RunDaemon(ctx, o, stderr)
}

func mainClient(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var o ClientOptions
	var mode string
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	fs.StringVar(&o.Dir, "dir", "", "the scenario's `directory` (the daemon's and the floor's sockets)")
	fs.StringVar(&o.BDF, "bdf", "", "fake device to lease from")
	fs.StringVar(&mode, "mode", string(ModeMixed), "mixed, broker, floor or revoke")
	fs.IntVar(&o.Ops, "ops", 0, "operations of each kind")
	fs.IntVar(&o.Warmup, "warmup", 0, "unrecorded operations of each kind first")
	fs.StringVar(&o.Out, "out", "", "result `file` (JSON)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if o.Dir == "" || o.BDF == "" || o.Out == "" {
		return usageError{errors.New("-dir, -bdf and -out are required")}
	}
	o.Mode = Mode(mode)
	return RunClient(ctx, o, stdin, stdout)
}

func mainHolder(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var o HolderOptions
	fs := flag.NewFlagSet("holder", flag.ContinueOnError)
	fs.StringVar(&o.Dir, "dir", "", "the scenario's `directory` (the daemon's sockets)")
	fs.IntVar(&o.Index, "index", 0, "this process's number, from 0")
	fs.IntVar(&o.Procs, "procs", 1, "holder processes in all")
	fs.IntVar(&o.Devices, "devices", 1, "fake devices")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if o.Dir == "" {
		return usageError{errors.New("-dir is required")}
	}
	return RunHolder(ctx, o, stdin, stdout)
}

func mainWatcher(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	var o WatcherOptions
	fs := flag.NewFlagSet("watcher", flag.ContinueOnError)
	fs.StringVar(&o.Dir, "dir", "", "the scenario's `directory` (the daemon's sockets)")
	fs.IntVar(&o.Streams, "streams", 1, "event streams")
	fs.IntVar(&o.PerConn, "per-conn", 50, "event streams per connection")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if o.Dir == "" {
		return usageError{errors.New("-dir is required")}
	}
	return RunWatcher(ctx, o, stdin, stdout)
}
