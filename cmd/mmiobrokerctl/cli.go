package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// Environment variables that set the defaults of the global socket flags.
const (
	envSocket      = "MMIOBROKER_SOCKET"
	envClaimSocket = "MMIOBROKER_CLAIM_SOCKET"
)

// defaultTimeout bounds the RPCs of one command (not watch, not holding a lease).
const defaultTimeout = 10 * time.Second

const usageText = `Usage: mmiobrokerctl [global flags] COMMAND [flags] [arguments]

Commands:
  devices                          list the configured devices
  device BDF                       show one device in detail
  host                             what the host offers: kernel feature probes, KVM's VM
                                   types, TSMs, the daemon's limits
  leases [-all] [-device BDF] [-uid UID] [-tenant TENANT]
                                   list leases (live ones unless -all)
  allocate [-range OFF:LEN]... [-kind shared|private] [-vm NAME] [-ttl DUR] [-hold] BDF BAR
                                   allocate a lease, claim its fd and hold it until
                                   SIGINT/SIGTERM, then release it
  allocate [flags] -exec BDF BAR -- COMMAND [ARG]...
                                   allocate, claim, run COMMAND with the fd as fd 3,
                                   release when it exits; exit with its status
  revoke [-grace DUR] LEASE_ID     revoke a lease (admins; revokes every dma-buf of the
                                   device); with -grace, ask its holder to release it first;
                                   on an ended lease whose fd is still live, kill the fd
  renew [-ttl DUR] LEASE_ID        extend a lease's time to live (default: by its own ttl)
  release LEASE_ID                 release a lease (its fd dies at the device's next cycle)
  suspend BDF                      pause a device for maintenance (admins)
  resume BDF                       end a suspend (admins)
  cycle BDF                        kill every dma-buf of a device now: the fds of its ended
                                   leases die, its live leases are reissued (admins)
  drain                            end every lease and revoke its fd, refuse new leases
                                   until the daemon restarts (admins; before a stop that
                                   must leave nothing behind)
  watch [-cursor SEQ] [-devices]   print lease (and device) events as they happen
  holders [LEASE_ID]               every process that holds a lease's dma-buf (from
                                   /proc/*/fdinfo); flags ended leases whose fd a process
                                   still holds, and (admins) dma-bufs no lease accounts for

Global flags:
`

// cli is one invocation of mmiobrokerctl.
type cli struct {
	stdout, stderr io.Writer
	getenv         func(string) string

	socket      string
	claimSocket string
	json        bool
	timeout     time.Duration
}

// run runs mmiobrokerctl with args (without the program name) and returns its exit code.
// ctx ends on SIGINT or SIGTERM.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	c := &cli{stdout: stdout, stderr: stderr, getenv: getenv}
	err := c.unreachable(c.run(ctx, args))
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		printError(stderr, err)
	}
	return exitCode(err)
}

func (c *cli) globalFlags() *flag.FlagSet {
	fs := flag.NewFlagSet("mmiobrokerctl", flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	socket := client.DefaultSocket
	if s := c.getenv(envSocket); s != "" {
		socket = s
	}
	fs.StringVar(&c.socket, "socket", socket, "control socket `path` (env "+envSocket+")")
	fs.StringVar(&c.claimSocket, "claim-socket", c.getenv(envClaimSocket),
		"claim socket `path` (env "+envClaimSocket+"; default: the path the daemon reports)")
	fs.BoolVar(&c.json, "json", false, "print JSON instead of tables")
	fs.DurationVar(&c.timeout, "timeout", defaultTimeout, "time limit of the command's requests (not of watching or holding)")
	fs.Usage = func() {
		fmt.Fprint(c.stderr, usageText)
		fs.PrintDefaults()
	}
	return fs
}

func (c *cli) run(ctx context.Context, args []string) error {
	fs := c.globalFlags()
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &usageError{msg: err.Error()}
	}
	if c.timeout <= 0 {
		return usagef("-timeout must be positive")
	}
	args = fs.Args()
	if len(args) == 0 {
		fs.Usage()
		return usagef("no command given")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "devices":
		return c.devices(ctx, args)
	case "device":
		return c.device(ctx, args)
	case "host":
		return c.host(ctx, args)
	case "leases":
		return c.leases(ctx, args)
	case "allocate":
		return c.allocate(ctx, args)
	case "revoke":
		return c.revoke(ctx, args)
	case "renew":
		return c.renew(ctx, args)
	case "release":
		return c.releaseLease(ctx, args)
	case "suspend":
		return c.suspendResume(ctx, "suspend", args)
	case "resume":
		return c.suspendResume(ctx, "resume", args)
	case "cycle":
		return c.cycle(ctx, args)
	case "drain":
		return c.drain(ctx, args)
	case "watch":
		return c.watch(ctx, args)
	case "holders":
		return c.holders(ctx, args)
	case "help":
		fs.Usage()
		return flag.ErrHelp
	}
	return usagef("unknown command %q", cmd)
}

// dial connects to the daemon.
func (c *cli) dial() (*client.Client, error) {
	var opts []client.Option
	if c.claimSocket != "" {
		opts = append(opts, client.WithClaimSocket(c.claimSocket))
	}
	return client.Dial(c.socket, opts...)
}

// connect dials the control socket and bounds ctx by -timeout, for one command's RPCs;
// done closes the connection and releases the context.
func (c *cli) connect(ctx context.Context) (*client.Client, context.Context, func(), error) {
	cl, err := c.dial()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := c.rpcContext(ctx)
	return cl, ctx, func() { cancel(); cl.Close() }, nil
}

// subcommand returns a flag set for command name.
func (c *cli) subcommand(name, args string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	fs.Usage = func() {
		fmt.Fprintf(c.stderr, "Usage: mmiobrokerctl %s %s\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses args with fs, allowing flags before, between and after the positional
// arguments; "--" ends the flags and everything after it is returned as rest. It checks
// that exactly npos positional arguments were given, or at most -npos if npos is negative.
func parse(fs *flag.FlagSet, args []string, npos int) (pos, rest []string, err error) {
	var before []string
	if i := indexOf(args, "--"); i >= 0 {
		before, rest = args[:i], args[i+1:]
		if rest == nil {
			rest = []string{}
		}
	} else {
		before = args
	}
	for {
		if err := fs.Parse(before); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, nil, err
			}
			return nil, nil, &usageError{msg: err.Error()}
		}
		before = fs.Args()
		if len(before) == 0 {
			break
		}
		pos = append(pos, before[0])
		before = before[1:]
	}
	switch {
	case npos < 0 && len(pos) > -npos:
		fs.Usage()
		return nil, nil, usagef("%s: want at most %d argument(s), got %d", fs.Name(), -npos, len(pos))
	case npos >= 0 && len(pos) != npos:
		fs.Usage()
		return nil, nil, usagef("%s: want %d argument(s), got %d", fs.Name(), npos, len(pos))
	}
	return pos, rest, nil
}

func indexOf(args []string, s string) int {
	for i, a := range args {
		if a == s {
			return i
		}
	}
	return -1
}

// parseBDF parses a PCI address in the long or the short form and returns the canonical
// long form.
func parseBDF(s string) (string, error) {
	a, err := pci.ParseAddress(s)
	if err != nil {
		return "", usagef("device address %q: want DDDD:BB:DD.F (lower-case hex), e.g. 0000:3b:00.0", s)
	}
	return a.String(), nil
}

// parseBAR parses a BAR index 0-5.
func parseBAR(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 5 {
		return 0, usagef("BAR %q: want a BAR index 0-5", s)
	}
	return n, nil
}

// parseSize parses a byte count: decimal, 0x hex, 0o octal or 0b binary, with an optional
// suffix K, M, G or T (powers of 1024).
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil || s == "" {
		return 0, fmt.Errorf("%q is not a number", s)
	}
	if v > (1<<64-1)/mult {
		return 0, fmt.Errorf("%s overflows 64 bits", s)
	}
	return v * mult, nil
}

// rangeFlag collects -range OFF:LEN flags.
type rangeFlag []byteRange

type byteRange struct{ off, len uint64 }

func (r *rangeFlag) String() string {
	var parts []string
	for _, x := range *r {
		parts = append(parts, fmt.Sprintf("%#x:%#x", x.off, x.len))
	}
	return strings.Join(parts, ",")
}

func (r *rangeFlag) Set(s string) error {
	o, l, ok := strings.Cut(s, ":")
	if !ok {
		return fmt.Errorf("want OFFSET:LENGTH, e.g. 0:0x10000 or 1M:64K")
	}
	off, err := parseSize(o)
	if err != nil {
		return fmt.Errorf("offset: %w", err)
	}
	length, err := parseSize(l)
	if err != nil {
		return fmt.Errorf("length: %w", err)
	}
	*r = append(*r, byteRange{off, length})
	return nil
}

// nonNegative checks a duration flag's value.
func nonNegative(name string, d time.Duration) error {
	if d < 0 {
		return usagef("%s %v: want a non-negative duration such as 30s or 1h", name, d)
	}
	return nil
}

// rpcContext bounds one command's requests by -timeout.
func (c *cli) rpcContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.timeout)
}
