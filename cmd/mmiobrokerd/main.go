// Command mmiobrokerd is the mmiobroker daemon: it owns VFIO devices and leases ranges of
// their BARs to VMM processes as dma-buf fds, over a gRPC control socket and a claim
// socket. docs/config.md describes its configuration file and flags.
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

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// options are the command line.
type options struct {
	configPath  string
	configGiven bool // -config was given: the file must exist
	devices     []string
	check       bool
	stopTimeout time.Duration
	// overrides of the configuration file, applied if given
	set map[string]string
}

// overridable maps flags to the [daemon] keys they override.
var overridable = []struct{ flag, key, usage string }{
	{"control-socket", "control_socket", "control socket `path`"},
	{"claim-socket", "claim_socket", "claim socket `path`"},
	{"access-mode", "access_mode", "device access `mode`: auto, group or cdev"},
	{"log-level", "log_level", "log `level`: debug, info, warn or error"},
	{"log-format", "log_format", "log `format`: text or json"},
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	o := options{set: map[string]string{}}
	fs := flag.NewFlagSet("mmiobrokerd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.configPath, "config", config.DefaultPath, "configuration `file` (may be absent unless given)")
	fs.Func("device", "lease the device at `BDF` with the default policy (admins only, shared, every memory BAR); repeatable", func(s string) error {
		o.devices = append(o.devices, s)
		return nil
	})
	fs.BoolVar(&o.check, "check", false, "check the configuration and exit")
	fs.DurationVar(&o.stopTimeout, "stop-timeout", daemon.DefaultStopTimeout, "how long a stop waits for requests in flight")
	for _, ov := range overridable {
		fs.Func(ov.flag, "override [daemon] "+ov.key+": "+ov.usage, func(s string) error {
			o.set[ov.key] = s
			return nil
		})
	}
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: mmiobrokerd [flags]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	fs.Visit(func(f *flag.Flag) { o.configGiven = o.configGiven || f.Name == "config" })
	return o, nil
}

// loadConfig reads the configuration file, applies the command line and resolves it.
func loadConfig(o options, look config.Lookup) (*config.Config, *config.Resolved, error) {
	load := config.LoadIfExists
	if o.configGiven {
		load = config.Load
	}
	cfg, err := load(o.configPath)
	if err != nil {
		return nil, nil, err
	}
	for key, v := range o.set {
		if err := cfg.Override(key, v); err != nil {
			return nil, nil, err
		}
	}
	for _, bdf := range o.devices {
		cfg.AddDevice(bdf)
	}
	res, err := cfg.Resolve(look)
	if err != nil {
		return nil, nil, err
	}
	return cfg, res, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "mmiobrokerd: %v\n", err)
		return 2
	}
	cfg, res, err := loadConfig(o, config.OSLookup())
	if err != nil {
		printError(stderr, err)
		return 1
	}
	if o.check {
		fmt.Fprintf(stdout, "configuration ok: %d devices\n", len(cfg.Devices))
		return 0
	}
	log := cfg.Daemon.Logger(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = daemon.Run(ctx, daemon.Options{
		Config:       cfg,
		Resolved:     res,
		Opener:       func(k vfio.Keeper) broker.Opener { return daemon.HostOpener(res, log, k) },
		Log:          log,
		StopTimeout:  o.stopTimeout,
		WatchDevices: true,
		MemoryLimit:  true,
	})
	if err != nil {
		printError(stderr, err)
		return 1
	}
	return 0
}

// printError prints err with one "mmiobrokerd: " line per problem.
func printError(w io.Writer, err error) {
	for line := range strings.SplitSeq(err.Error(), "\n") {
		fmt.Fprintf(w, "mmiobrokerd: %s\n", line)
	}
}
