package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// noLookup resolves no names.
type noLookup struct{}

func (noLookup) LookupUser(name string) (uint32, error)  { return 0, fmt.Errorf("no user %s", name) }
func (noLookup) LookupGroup(name string) (uint32, error) { return 0, fmt.Errorf("no group %s", name) }

func writeFile(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "mmiobrokerd.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestFlagsOverrideTheFile(t *testing.T) {
	path := writeFile(t, `[daemon]
control_socket = "/run/a/control.sock"
claim_socket = "/run/a/fd.sock"
log_level = "warn"

[[device]]
address = "0000:00:03.0"
bars = [2]
`)
	o, err := parseFlags([]string{"-config", path, "-claim-socket", "/run/b/fd.sock", "-log-format", "json",
		"-access-mode", "cdev", "-device", "00:03.0", "-device", "0000:00:04.0"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, res, err := loadConfig(o, noLookup{})
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Daemon
	if d.ControlSocket != "/run/a/control.sock" || d.ClaimSocket != "/run/b/fd.sock" || d.LogLevel != "warn" ||
		d.LogFormat != "json" || d.AccessMode != "cdev" {
		t.Errorf("daemon config = %+v", d)
	}
	// -device of a configured device keeps the file's policy; a new one is added.
	if n := len(res.Broker.Devices); n != 2 {
		t.Fatalf("%d devices, want 2", n)
	}
	if got := res.Broker.Devices[0]; got.BDF != "0000:00:03.0" || len(got.BARs) != 1 || got.BARs[0] != 2 {
		t.Errorf("file device = %+v", got)
	}
	if got := res.Broker.Devices[1]; got.BDF != "0000:00:04.0" || len(got.UIDs)+len(got.GIDs) != 0 {
		t.Errorf("flag device = %+v", got)
	}
	if open, ok := res.DeviceOpen("0000:00:04.0"); !ok || open.AccessMode != "cdev" {
		t.Errorf("DeviceOpen = %+v, %v", open, ok)
	}
}

func TestConfigFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.toml")
	// The default path may be absent: defaults plus flags.
	o, err := parseFlags([]string{"-device", "0000:00:03.0"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	o.configPath = missing // as if the default path did not exist
	if _, res, err := loadConfig(o, noLookup{}); err != nil || len(res.Broker.Devices) != 1 {
		t.Errorf("absent default config: %v", err)
	}
	// A -config file must exist.
	o, err = parseFlags([]string{"-config", missing}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := loadConfig(o, noLookup{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("absent -config file: %v, want fs.ErrNotExist", err)
	}
}

func TestStartupErrors(t *testing.T) {
	path := writeFile(t, "[daemon]\nlog_level = \"loud\"\n\n[[device]]\naddress = \"0000:00:03.0\"\nbars = [8]\n")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-config", path, "-access-mode", "vfio"}, &stdout, &stderr)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	want := []string{
		`mmiobrokerd: daemon.access_mode: "vfio" is not one of auto, group, cdev (set on the command line)`,
		fmt.Sprintf(`mmiobrokerd: %s:2: daemon.log_level: "loud" is not one of debug, info, warn, error`, path),
		fmt.Sprintf(`mmiobrokerd: %s:6: device 0000:00:03.0: bars: 8 is not a BAR index (0-5)`, path),
	}
	got := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("stderr:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	stderr.Reset()
	if code := run([]string{"-no-such-flag"}, &stdout, &stderr); code != 2 {
		t.Errorf("unknown flag: exit %d, want 2", code)
	}
	if code := run([]string{"extra"}, &stdout, &stderr); code != 2 {
		t.Errorf("stray argument: exit %d, want 2", code)
	}
}

func TestCheck(t *testing.T) {
	path := writeFile(t, "[[device]]\naddress = \"0000:00:03.0\"\n")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-config", path, "-device", "0000:00:04.0", "-check"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if got := stdout.String(); got != "configuration ok: 2 devices\n" {
		t.Errorf("stdout = %q", got)
	}
}

// The real main path: sd_notify through $NOTIFY_SOCKET, the hostdev opener (on an empty
// sysfs, so the device is listed as unusable), the control socket, and a stop by SIGTERM.
func TestRunUntilSIGTERM(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", notifyPath)
	sysfs := filepath.Join(dir, "sys")
	if err := os.Mkdir(sysfs, 0o755); err != nil {
		t.Fatal(err)
	}
	control := filepath.Join(dir, "c.sock")
	path := writeFile(t, fmt.Sprintf("[daemon]\nsysfs_root = %q\ndev_root = %q\n", sysfs, dir))

	var stdout, stderr bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"-config", path, "-control-socket", control, "-claim-socket", filepath.Join(dir, "f.sock"),
			"-device", "0000:00:03.0", "-log-format", "json"}, &stdout, &stderr)
	}()
	recv := func() string {
		buf := make([]byte, 512)
		notify.SetReadDeadline(time.Now().Add(60 * time.Second))
		n, err := notify.Read(buf)
		if err != nil {
			t.Fatalf("waiting for sd_notify: %v (daemon stderr: %s)", err, stderr.String())
		}
		return string(buf[:n])
	}
	if s := recv(); s != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", s)
	}
	if s := recv(); !strings.HasPrefix(s, "STATUS=serving 0 of 1 devices") {
		t.Errorf("status notification %q", s)
	}

	cl, err := client.Dial(control)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := cl.API().ListDevices(ctx, &brokerv1.ListDevicesRequest{})
	cl.Close()
	if err != nil {
		t.Fatal(err)
	}
	if devs := resp.GetDevices(); len(devs) != 1 || devs[0].GetUsable() || !strings.Contains(devs[0].GetError(), "0000:00:03.0") {
		t.Errorf("devices = %v, want one unusable 0000:00:03.0 with an error naming it", devs)
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if s := recv(); s != "STOPPING=1" {
		t.Errorf("notification %q, want STOPPING=1", s)
	}
	if code := <-done; code != 0 {
		t.Errorf("exit %d after SIGTERM, want 0; stderr:\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), `"msg":"device not usable","bdf":"0000:00:03.0"`) {
		t.Errorf("log lacks the unusable device:\n%s", stderr.String())
	}
	if _, err := os.Lstat(control); err == nil {
		t.Error("control socket left behind")
	}
}
