// Package fakedaemon runs mmiobrokerd's own wiring (internal/daemon) inside the calling
// process on fake devices (internal/broker/brokertest: memfd buffers, no VFIO), for the
// runnable examples of package client and client/iommufd. Examples have no *testing.T, so
// they cannot use internal/daemon/daemontest; a TestMain starts a [Daemon] and points the
// examples at its control socket, where a real VMM would dial client.DefaultSocket.
//
// The calling process is the daemon's administrator (its primary group is admin_group)
// and may lease every fake device (its uid is in allow_uids). Ends of claimed leases cycle
// the device at once (revoke_within = "0s"), and the periodic /proc scan is off, so an
// idle daemon opens no fds behind the tests' fd-leak checks.
package fakedaemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// Daemon is a daemon running in this process.
type Daemon struct {
	// Control is the control socket, the daemon's client.DefaultSocket.
	Control string
	// Metrics is the daemon's metrics socket (HTTP GET /metrics).
	Metrics string

	dir    string
	cancel context.CancelFunc
	done   chan error
	idle   int // event subscribers of the idle daemon
}

// Start starts a daemon on one fake device per BDF (brokertest.NewDevice: BAR 0 1 MiB,
// BAR 4 16 MiB prefetchable) and returns once it is ready.
func Start(bdfs ...string) (*Daemon, error) {
	dir, err := os.MkdirTemp("", "mbx") // short: unix socket paths stay under 108 bytes
	if err != nil {
		return nil, err
	}
	d := &Daemon{
		Control: filepath.Join(dir, "control.sock"),
		Metrics: filepath.Join(dir, "metrics.sock"),
		dir:     dir,
		done:    make(chan error, 1),
	}
	var text strings.Builder
	fmt.Fprintf(&text, "[daemon]\ncontrol_socket = %q\nclaim_socket = %q\nadmin_group = %d\njournal = %q\nholder_check = \"0s\"\n",
		d.Control, filepath.Join(dir, "fd.sock"), os.Getgid(), filepath.Join(dir, "journal.db"))
	fmt.Fprintf(&text, "[limits]\nrevoke_within = \"0s\"\ntenant_cycle_interval = \"0s\"\n")
	var devs []*brokertest.Device
	for _, bdf := range bdfs {
		fmt.Fprintf(&text, "[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid())
		devs = append(devs, brokertest.NewDevice(bdf))
	}
	fail := func(err error) (*Daemon, error) {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("fake daemon: %w", err)
	}
	cfg, err := config.Decode("fakedaemon.toml", []byte(text.String()))
	if err != nil {
		return fail(err)
	}
	res, err := cfg.Resolve(config.OSLookup())
	if err != nil {
		return fail(err)
	}
	sd, err := systemd.New(systemd.Config{})
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	ready := make(chan struct{})
	go func() {
		d.done <- daemon.Run(ctx, daemon.Options{
			Config: cfg, Resolved: res, Systemd: sd,
			FDLimit: 1 << 20, // the test process's own limit is not what examples are about
			Opener:  func(vfio.Keeper) broker.Opener { return brokertest.Opener(devs...) },
			Notify: func(s string) error {
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
		return fail(fmt.Errorf("daemon.Run: %w", err))
	}
	if d.idle, err = d.Subscribers(); err != nil {
		d.Stop()
		return nil, err
	}
	return d, nil
}

// Stop stops the daemon as SIGTERM would, removes its directory and returns what
// daemon.Run returned.
func (d *Daemon) Stop() error {
	d.cancel()
	err := <-d.done
	os.RemoveAll(d.dir)
	return err
}

// RevokeAnotherLease acts as an administrator: it leases the last 4 KiB of BAR 4 of bdf
// and revokes that lease. Linux revokes a VFIO device's dma-bufs all at once, so the
// daemon reissues every other live lease of the device (REISSUED events).
func (d *Daemon) RevokeAnotherLease(bdf string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(d.Control)
	if err != nil {
		return err
	}
	defer c.Close()
	l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 4,
		Ranges: []*brokerv1.Range{{Offset: 16<<20 - 4096, Length: 4096}}, VMName: "another-vm"})
	if err != nil {
		return fmt.Errorf("fake daemon: the administrator's lease: %w", err)
	}
	defer l.File.Close()
	if _, err := c.Revoke(ctx, l.ID); err != nil {
		return fmt.Errorf("fake daemon: the administrator's revoke: %w", err)
	}
	return nil
}

// WhenWatched runs f in a new goroutine once an event stream more than the idle daemon's
// is open (its metric event_subscribers), so that f's events reach a [client.Client.Watch]
// started after WhenWatched returns. It first waits until the streams of earlier callers
// are gone. An error of f, or of the wait, is printed on stderr (an example then fails on
// its missing output).
func (d *Daemon) WhenWatched(f func() error) {
	report := func(err error) {
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake daemon:", err)
		}
	}
	if err := d.waitSubscribers(func(n int) bool { return n == d.idle }); err != nil {
		report(err)
		return
	}
	go func() {
		if err := d.waitSubscribers(func(n int) bool { return n > d.idle }); err != nil {
			report(err)
			return
		}
		report(f())
	}()
}

// waitSubscribers polls the subscriber count until ok accepts it, for up to 30 s.
func (d *Daemon) waitSubscribers(ok func(int) bool) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, err := d.Subscribers()
		if err != nil {
			return err
		}
		if ok(n) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("event subscribers still %d after 30s", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Subscribers returns the daemon's open event subscriptions, from its metrics socket
// (mmiobroker_event_subscribers).
func (d *Daemon) Subscribers() (int, error) {
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", d.Metrics)
		},
	}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://metrics/metrics")
	if err != nil {
		return 0, fmt.Errorf("fake daemon: scrape: %w", err)
	}
	defer resp.Body.Close()
	const name = "mmiobroker_event_subscribers "
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("fake daemon: no " + strings.TrimSpace(name) + " in the metrics")
}
