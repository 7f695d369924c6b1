package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func resolve(t *testing.T, text string) (*config.Config, *config.Resolved) {
	t.Helper()
	cfg, err := config.Decode("t.toml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	res, err := cfg.Resolve(config.OSLookup())
	if err != nil {
		t.Fatal(err)
	}
	return cfg, res
}

func runOnce(t *testing.T, text string) error {
	t.Helper()
	cfg, res := resolve(t, text)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // a start-up error returns at once; a successful start stops at once
	return daemon.Run(ctx, daemon.Options{Config: cfg, Resolved: res, Opener: func(vfio.Keeper) broker.Opener { return brokertest.Opener() },
		Notify: func(string) error { return nil }})
}

// runReady runs the daemon with cfg on fake devices (logging to log, if not nil) until it
// reports READY=1, failing t if it stops first. stop ends it and returns Run's error.
func runReady(t *testing.T, cfg *config.Config, res *config.Resolved, log *slog.Logger) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- daemon.Run(ctx, daemon.Options{Config: cfg, Resolved: res, Opener: func(vfio.Keeper) broker.Opener { return brokertest.Opener() },
			Log: log,
			Notify: func(s string) error {
				if s == "READY=1" {
					close(ready)
				}
				return nil
			}})
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatal(err)
	}
	return func() error {
		cancel()
		return <-done
	}
}

func TestSocketsModeAndGroup(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	control, claim := filepath.Join(dir, "sub", "c.sock"), filepath.Join(dir, "sub", "f.sock")
	cfg, res := resolve(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\ncontrol_socket_mode = \"0600\"\nclaim_socket_mode = 0o666\nsocket_group = %d\n",
		control, claim, os.Getgid()))
	stop := runReady(t, cfg, res, nil)
	for path, mode := range map[string]os.FileMode{control: 0o600, claim: 0o666} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != mode || fi.Sys().(*syscall.Stat_t).Gid != uint32(os.Getgid()) {
			t.Errorf("%s: mode %v gid %d, want a socket with %v, gid %d", path, fi.Mode(), fi.Sys().(*syscall.Stat_t).Gid, mode, os.Getgid())
		}
	}
	// A second daemon on the same control socket refuses to start and leaves it alone.
	err := runOnce(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n", control, filepath.Join(dir, "f2.sock")))
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "control socket") {
		t.Errorf("second daemon: %v, want an already-exists error about the control socket", err)
	}
	if _, err := os.Stat(control); err != nil {
		t.Errorf("the first daemon's socket is gone: %v", err)
	}
	if err := stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestSocketPathConflicts(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := func(name string) string { return filepath.Join(dir, name) }
	tests := []struct {
		control, claim string
		want           string
	}{
		{file, sock("f.sock"), "control socket"},
		{sock("c.sock"), file, "claim socket"},
	}
	for _, tt := range tests {
		err := runOnce(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n", tt.control, tt.claim))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("control %s, claim %s: %v, want an error about the %s", tt.control, tt.claim, err, tt.want)
		}
		if b, err := os.ReadFile(file); err != nil || string(b) != "x" {
			t.Errorf("the regular file was touched: %q, %v", b, err)
		}
		if _, err := os.Lstat(sock("c.sock")); err == nil {
			t.Error("control socket left behind after a failed start")
		}
	}
	// A stale socket (nobody listening) is replaced.
	stale := sock("stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if err := runOnce(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n", stale, sock("f.sock"))); err != nil {
		t.Errorf("start over a stale socket: %v", err)
	}
}

func TestRunNeedsOptions(t *testing.T) {
	if err := daemon.Run(context.Background(), daemon.Options{}); err == nil {
		t.Error("Run without options succeeded")
	}
}

func TestHostOpener(t *testing.T) {
	dir := t.TempDir()
	_, res := resolve(t, fmt.Sprintf("[daemon]\nsysfs_root = %q\ndev_root = %q\n[[device]]\naddress = \"0000:00:03.0\"\n", dir, dir))
	open := daemon.HostOpener(res, nil, nil)
	d, err := open("0000:00:03.0")
	if err == nil || d != nil || !strings.Contains(err.Error(), "0000:00:03.0") {
		t.Errorf("open on an empty sysfs = %v, %v; want a nil device and an error naming it", d, err)
	}
	d, err = open("0000:00:04.0")
	if !errors.Is(err, errdefs.ErrNotFound) || d != nil {
		t.Errorf("open of an unconfigured device = %v, %v; want ErrNotFound", d, err)
	}
}
