package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/devwatch"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/holders"
	"github.com/mmiobroker/mmiobroker/internal/metrics"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/server"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
	"github.com/mmiobroker/mmiobroker/internal/uevent"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// tsmResync is how often devices are compared with sysfs besides uevents: a device's TSM
// state can change without one, and private leases end when it leaves the bound state.
const tsmResync = 10 * time.Second

// DefaultStopTimeout is how long a stop waits for in-flight RPCs and claims.
const DefaultStopTimeout = 10 * time.Second

// Options is what [Run] runs.
type Options struct {
	// Config is the daemon's configuration; Resolved is Config resolved (config.Resolve).
	Config   *config.Config
	Resolved *config.Resolved
	// Opener returns the opener of the configured devices. keeper is nil unless the
	// systemd fd store is in use; openers of real devices pass it on (hostdev.Options),
	// so that device fds and dma-bufs survive a restart.
	Opener func(keeper vfio.Keeper) broker.Opener
	// Log receives the daemon's log; nil discards.
	Log *slog.Logger
	// Systemd is the service manager connection; nil means systemd.FromEnv. Outside
	// systemd (no NOTIFY_SOCKET) or without the fd store (no $FDSTORE) every lease ends
	// at stop, as their dma-bufs die with the daemon's fds.
	Systemd *systemd.Manager
	// FDLimit is RLIMIT_NOFILE for the start-up check of the fd budget; 0 reads the
	// process's own. The daemon refuses to start if its limits could exhaust it.
	FDLimit uint64
	// MemoryLimit sets the process's soft memory limit from the configuration (memory.go),
	// as mmiobrokerd does; it is process-wide, so tests that run daemons in their own
	// process leave it off.
	MemoryLimit bool
	// Notify, if set, receives the states sent to the service manager ("READY=1",
	// "STOPPING=1", "STATUS=…", "WATCHDOG=1") instead of Systemd (tests).
	Notify func(state string) error
	// StopTimeout bounds the graceful part of a stop; zero means DefaultStopTimeout.
	StopTimeout time.Duration
	// WatchDevices listens to kernel uevents so that devices unbound, removed or rebound
	// outside the daemon are noticed (internal/devwatch). On in mmiobrokerd; tests on fake
	// devices leave it off.
	WatchDevices bool
	// Serving, if set, is called with the broker just before READY=1: tests on fake
	// devices use it to play the kernel's side of internal/devwatch (a device back,
	// a TSM state change).
	Serving func(*broker.Broker)
}

// Run serves until ctx ends, then stops gracefully and returns nil; or returns the error
// that kept it from starting or made it stop.
func Run(ctx context.Context, opt Options) error {
	if opt.Config == nil || opt.Resolved == nil || opt.Opener == nil {
		return errors.New("daemon: Config, Resolved and Opener are required")
	}
	log := opt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stopTimeout := opt.StopTimeout
	if stopTimeout <= 0 {
		stopTimeout = DefaultStopTimeout
	}
	d, res := opt.Config.Daemon, opt.Resolved
	fdLimit, err := checkFDs(res, opt.FDLimit)
	if err != nil {
		return err
	}
	if err := checkTenants(res.Tenants); err != nil {
		return err
	}
	hr := newHostReport(opt.Config, res, fdLimit)
	sd := opt.Systemd
	if sd == nil {
		if sd, err = systemd.FromEnv(); err != nil {
			return fmt.Errorf("service manager environment: %w", err)
		}
	}
	need, _ := fdBudget(res)
	log.Debug("fd budget", "need_at_most", need, "rlimit_nofile", fdLimit)
	if opt.MemoryLimit {
		limit := setMemoryLimit(res)
		log.Debug("memory limit", "soft_limit_bytes", limit)
	}
	notify := sd.Notify
	if opt.Notify != nil {
		notify = opt.Notify
	}
	restored := sd.Restored()
	defer restored.Close()

	st, err := openState(sd, d, res, log)
	if err != nil {
		return err
	}
	defer st.close()
	// The metrics observe the broker from its first event on (also those of a restore).
	m := metrics.New(log)
	st.observer = m
	var b *broker.Broker
	err = extendWhile(notify, func() (err error) {
		bc := res.Broker
		bc.PeerUnits = res.Tenants.Mode == tenant.ByCgroup // the claimer below resolves units
		b, err = broker.NewWithOptions(bc, hr.track(opt.Opener(st.keeper())), log, st.brokerOptions())
		return err
	})
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	stopped := false
	defer func() {
		if !stopped {
			b.Close()
		}
	}()

	// The control socket first: its listen fails if another daemon is serving.
	ctl, err := activated(restored, "control", func() (net.Listener, error) {
		return listen(d.ControlSocket, d.ControlSocketMode, res.SocketGID, server.Listen)
	})
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	claimL, err := activated(restored, "claim", func() (net.Listener, error) {
		return listen(d.ClaimSocket, d.ClaimSocketMode, res.SocketGID,
			func(path string, perm os.FileMode) (net.Listener, error) { return fdpass.Listen(path, perm) })
	})
	if err != nil {
		ctl.Close()
		return fmt.Errorf("claim socket: %w", err)
	}
	ms, err := listenMetrics(res.Metrics, m, log)
	if err != nil {
		ctl.Close()
		claimL.Close()
		return err
	}
	defer ms.close()
	st.started()

	var admins []uint32
	if res.AdminGID >= 0 {
		admins = []uint32{uint32(res.AdminGID)}
	}
	hc := &holders.Checker{Log: log}
	srv := server.New(b, server.Options{
		// Outside the server's own interceptor: the metrics see the codes clients get.
		UnaryInterceptors:  []grpc.UnaryServerInterceptor{m.UnaryInterceptor()},
		StreamInterceptors: []grpc.StreamServerInterceptor{m.StreamInterceptor()},

		ClaimSocket: d.ClaimSocket,
		AdminGroups: admins,
		Log:         log,
		Tenant:      grpcTenant(res.Tenants),
		MaxConns:    res.MaxConnections,
		Host:        hr.source(b),
		Holders:     hc,
	})
	claims := fdpass.NewServer(claimer{b: b, m: m, tenants: res.Tenants}, fdpass.Options{Log: log, TenantOf: claimTenant(res.Tenants)})
	if err := m.Watch(metrics.Sources{Broker: b, GRPCConns: srv.Conns, Claims: claims.Stats, FDBudget: need,
		Holders: holderSource(hc, d.HolderCheck)}); err != nil {
		log.Error("metrics incomplete", "err", err)
	}

	g, gctx := errgroup.WithContext(ctx)
	claimCtx, stopClaims := context.WithCancel(context.WithoutCancel(ctx))
	defer stopClaims()
	g.Go(func() error {
		if err := srv.Serve(ctl); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("control socket %s: %w", d.ControlSocket, err)
		}
		return nil
	})
	g.Go(func() error {
		if err := claims.Serve(claimCtx, claimL); err != nil {
			return fmt.Errorf("claim socket %s: %w", d.ClaimSocket, err)
		}
		return nil
	})
	ms.serve(g)
	if every := time.Duration(d.HolderCheck); every > 0 {
		g.Go(func() error { hc.Run(gctx, every, b); return nil })
	}

	if opt.WatchDevices {
		if l, err := uevent.Listen(uevent.Options{}); err != nil {
			log.Warn("device events unavailable: unbinds and removals are noticed only through VFIO's release requests", "err", err)
		} else {
			defer l.Close()
			w := &devwatch.Watcher{Source: l, Broker: b, Sysfs: pci.Sysfs{Root: d.SysfsRoot}, Log: log,
				ResyncInterval: tsmResync}
			g.Go(func() error {
				if err := w.Run(gctx); err != nil {
					log.Error("device events stopped", "err", err)
				}
				return nil
			})
		}
	}

	devs := b.Devices()
	usable := 0
	for _, ds := range devs {
		if ds.Err == nil {
			usable++
		} else {
			log.Warn("device not usable", "bdf", ds.Policy.BDF, "error", ds.Err)
		}
	}
	if len(devs) == 0 {
		log.Warn("no devices configured: add [[device]] tables to the configuration or -device flags")
	}
	log.Info("serving", "control_socket", d.ControlSocket, "claim_socket", d.ClaimSocket,
		"devices", len(devs), "usable_devices", usable, "live_leases", liveLeases(b.Stats()),
		"keeps_leases_across_restarts", st.keeps())
	if opt.Serving != nil {
		opt.Serving(b)
	}
	notifyLog(log, notify, "READY=1")
	notifyLog(log, notify, fmt.Sprintf("STATUS=serving %d of %d devices", usable, len(devs)))
	if wd := sd.WatchdogInterval(); wd > 0 {
		g.Go(func() error { watchdog(gctx, b, notify, wd, log); return nil })
	}

	// Started after READY=1, so that STOPPING=1 always follows it.
	var stopErr error
	g.Go(func() error {
		<-gctx.Done()
		keep := st.keeps() && d.OnStop == "keep"
		log.Info("stopping", "reason", context.Cause(gctx), "keep_leases", keep)
		notifyLog(log, notify, "STOPPING=1")
		// The broker first: that ends the event streams, whose last events (the leases
		// ended by a drain) reach their watchers before the server stops.
		stopped = true
		if keep {
			st.freeze()
			stopErr = b.Detach()
		} else {
			stopErr = extendWhile(notify, func() error { return b.Close() })
		}
		sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if err := srv.Stop(sctx); err != nil {
			log.Warn("in-flight RPCs cut off at stop", "timeout", stopTimeout)
		}
		stopClaims()
		ms.stop()
		return nil
	})

	err = g.Wait()
	if !stopped {
		stopped = true
		stopErr = b.Close()
	}
	if stopErr != nil {
		err = errors.Join(err, fmt.Errorf("broker stop: %w", stopErr))
	}
	log.Info("stopped")
	return err
}

// liveLeases counts the live leases in st (allocated or active), without copying them.
func liveLeases(st broker.Stats) int {
	n := 0
	for g, c := range st.Leases {
		if !g.State.Ended() {
			n += c
		}
	}
	return n
}

func notifyLog(log *slog.Logger, notify func(string) error, state string) {
	if err := notify(state); err != nil {
		log.Warn("service manager notification failed", "state", state, "error", err)
	}
}

// listen creates the socket's directory if needed, listens with fn, and gives the socket
// to group gid (-1: keep the daemon's group).
func listen(path string, mode config.FileMode, gid int, fn func(string, os.FileMode) (net.Listener, error)) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	l, err := fn(path, mode.Perm())
	if err != nil {
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("give %s to group %d: %w", path, gid, err)
		}
	}
	return l, nil
}

// holderSource is the metrics' view of the periodic holder check; nil when it is off.
func holderSource(hc *holders.Checker, every config.Duration) func() (holders.Report, bool) {
	if every <= 0 {
		return nil
	}
	return hc.Last
}
