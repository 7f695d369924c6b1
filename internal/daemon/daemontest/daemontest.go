// Package daemontest runs the real daemon wiring ([daemon.Run]) on fake devices
// (internal/broker/brokertest) in the test process, listening on unix sockets in a
// temporary directory, for end-to-end tests of clients.
package daemontest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/systemd/systemdtest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// Daemon is a running test daemon.
type Daemon struct {
	// Control and Claim are the socket paths.
	Control, Claim string
	// Config is the configuration it runs with.
	Config *config.Config
	// Dir holds the sockets and the journal.
	Dir string
	// Broker is the daemon's broker, for tests that play the kernel's side of device
	// changes (Broker.DeviceAvailable, Broker.TSMChanged), as internal/devwatch does.
	Broker *broker.Broker

	stop     func()
	done     chan error
	mu       sync.Mutex
	states   []string
	stopOnce sync.Once
	stopErr  error
}

// Start runs a daemon until the test ends. devices is TOML appended to a [daemon] table
// that sets the sockets and makes the test process's primary group the admin group (so
// the test process is an administrator); it typically holds [limits] and [[device]]
// tables for the fake devices devs. The daemon logs to t.
func Start(t testing.TB, devices string, devs ...*brokertest.Device) *Daemon {
	t.Helper()
	return StartWith(t, Options{}, devices, devs...)
}

// Options are the optional parts of [StartWith].
type Options struct {
	// Dir holds the sockets and the journal; "" means a new temporary directory. A
	// restarted daemon reuses the first one's.
	Dir string
	// Systemd is a fake service manager: with its fd store on, the daemon keeps its
	// leases across a stop and restart (the journal lives in Dir).
	Systemd *systemdtest.Manager
	// Opener replaces the opener of the fake devices (to see the keeper it is given).
	Opener func(vfio.Keeper) broker.Opener
}

// StartWith is [Start] with [Options]: a daemon under a fake systemd, restartable.
func StartWith(t testing.TB, opt Options, devices string, devs ...*brokertest.Device) *Daemon {
	t.Helper()
	dir := opt.Dir
	if dir == "" {
		dir = testutil.ShortTempDir(t)
	}
	d := &Daemon{
		Control: filepath.Join(dir, "control.sock"),
		Claim:   filepath.Join(dir, "fd.sock"),
		Dir:     dir,
		done:    make(chan error, 1),
	}
	text := fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\nadmin_group = %d\nlog_level = \"debug\"\njournal = %q\n\n%s",
		d.Control, d.Claim, os.Getgid(), filepath.Join(dir, "journal.db"), devices)
	cfg, err := config.Decode("daemontest.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	res, err := cfg.Resolve(config.OSLookup())
	if err != nil {
		t.Fatal(err)
	}
	d.Config = cfg
	ctx, cancel := context.WithCancel(context.Background())
	d.stop = cancel
	ready := make(chan struct{})
	var sd *systemd.Manager
	if opt.Systemd != nil {
		if sd, err = opt.Systemd.Client(); err != nil {
			t.Fatal(err)
		}
	} else if sd, err = systemd.New(systemd.Config{}); err != nil {
		t.Fatal(err)
	}
	opener := fakeOpener(devs...)
	if opt.Opener != nil {
		opener = opt.Opener
	}
	go func() {
		d.done <- daemon.Run(ctx, daemon.Options{
			Systemd: sd,
			FDLimit: 1 << 20, // the test process's own limit is not what these tests are about
			Config:  cfg, Resolved: res, Opener: opener,
			Serving: func(b *broker.Broker) { d.Broker = b },
			Log:     slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Notify: func(s string) error {
				d.mu.Lock()
				d.states = append(d.states, s)
				d.mu.Unlock()
				if s == "READY=1" {
					close(ready)
				}
				return nil
			},
		})
	}()
	select {
	case <-ready:
	case err := <-d.done:
		cancel()
		t.Fatalf("daemon.Run: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("daemon stop: %v", err)
		}
	})
	return d
}

// Stop stops the daemon as SIGTERM would and returns what Run returned, or an error if
// the service manager was not told STOPPING=1 last. It is idempotent.
func (d *Daemon) Stop() error {
	d.stopOnce.Do(func() {
		d.stop()
		d.stopErr = <-d.done
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.stopErr == nil && (len(d.states) == 0 || d.states[len(d.states)-1] != "STOPPING=1") {
			d.stopErr = fmt.Errorf("notifications %q do not end with STOPPING=1", d.states)
		}
	})
	return d.stopErr
}

// logWriter sends the daemon's log to the test log.
type logWriter struct{ t testing.TB }

func (w logWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// fakeOpener serves the fake devices whatever the keeper: the fakes keep their own
// "fd store" (brokertest.Device.Detach).
func fakeOpener(devs ...*brokertest.Device) func(vfio.Keeper) broker.Opener {
	return func(vfio.Keeper) broker.Opener { return brokertest.Opener(devs...) }
}
