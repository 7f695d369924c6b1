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

	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// Daemon is a running test daemon.
type Daemon struct {
	// Control and Claim are the socket paths.
	Control, Claim string
	// Config is the configuration it runs with.
	Config *config.Config

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
	dir := testutil.ShortTempDir(t)
	d := &Daemon{
		Control: filepath.Join(dir, "control.sock"),
		Claim:   filepath.Join(dir, "fd.sock"),
		done:    make(chan error, 1),
	}
	text := fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\nadmin_group = %d\nlog_level = \"debug\"\n\n%s",
		d.Control, d.Claim, os.Getgid(), devices)
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
	go func() {
		d.done <- daemon.Run(ctx, daemon.Options{
			Config: cfg, Resolved: res, Opener: brokertest.Opener(devs...),
			Log: slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
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
