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

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/devwatch"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/server"
	"github.com/mmiobroker/mmiobroker/internal/uevent"
)

// DefaultStopTimeout is how long a stop waits for in-flight RPCs and claims.
const DefaultStopTimeout = 10 * time.Second

// Options is what [Run] runs.
type Options struct {
	// Config is the daemon's configuration; Resolved is Config resolved (config.Resolve).
	Config   *config.Config
	Resolved *config.Resolved
	// Opener opens the configured devices.
	Opener broker.Opener
	// Log receives the daemon's log; nil discards.
	Log *slog.Logger
	// Notify sends a state to the service manager ("READY=1", "STOPPING=1", "STATUS=…").
	// Nil means sd_notify, which does nothing outside systemd.
	Notify func(state string) error
	// StopTimeout bounds the graceful part of a stop; zero means DefaultStopTimeout.
	StopTimeout time.Duration
	// WatchDevices listens to kernel uevents so that devices unbound, removed or rebound
	// outside the daemon are noticed (internal/devwatch). On in mmiobrokerd; tests on fake
	// devices leave it off.
	WatchDevices bool
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
	notify := opt.Notify
	if notify == nil {
		notify = func(state string) error {
			_, err := sddaemon.SdNotify(false, state)
			return err
		}
	}
	stopTimeout := opt.StopTimeout
	if stopTimeout <= 0 {
		stopTimeout = DefaultStopTimeout
	}
	d, res := opt.Config.Daemon, opt.Resolved

	b, err := broker.New(res.Broker, opt.Opener, log)
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	defer b.Close()

	// The control socket first: its listen fails if another daemon is serving.
	ctl, err := listen(d.ControlSocket, d.ControlSocketMode, res.SocketGID, server.Listen)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	claimL, err := listen(d.ClaimSocket, d.ClaimSocketMode, res.SocketGID,
		func(path string, perm os.FileMode) (net.Listener, error) { return fdpass.Listen(path, perm) })
	if err != nil {
		ctl.Close()
		return fmt.Errorf("claim socket: %w", err)
	}

	var admins []uint32
	if res.AdminGID >= 0 {
		admins = []uint32{uint32(res.AdminGID)}
	}
	srv := server.New(b, server.Options{
		ClaimSocket: d.ClaimSocket,
		AdminGroups: admins,
		Log:         log,
	})
	claims := fdpass.NewServer(claimer{b}, fdpass.Options{Log: log})

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

	if opt.WatchDevices {
		if l, err := uevent.Listen(uevent.Options{}); err != nil {
			log.Warn("device events unavailable: unbinds and removals are noticed only through VFIO's release requests", "err", err)
		} else {
			defer l.Close()
			w := &devwatch.Watcher{Source: l, Broker: b, Sysfs: pci.Sysfs{Root: d.SysfsRoot}, Log: log}
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
		"devices", len(devs), "usable_devices", usable)
	notifyLog(log, notify, "READY=1")
	notifyLog(log, notify, fmt.Sprintf("STATUS=serving %d of %d devices", usable, len(devs)))

	// Started after READY=1, so that STOPPING=1 always follows it.
	g.Go(func() error {
		<-gctx.Done()
		log.Info("stopping", "reason", context.Cause(gctx))
		notifyLog(log, notify, "STOPPING=1")
		sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if err := srv.Stop(sctx); err != nil {
			log.Warn("in-flight RPCs cut off at stop", "timeout", stopTimeout)
		}
		stopClaims()
		return nil
	})

	err = g.Wait()
	if cerr := b.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("broker close: %w", cerr))
	}
	log.Info("stopped")
	return err
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
