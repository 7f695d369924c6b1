//go:build vmsystemd

package systemd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	service      = "mmiobrokerd.service"
	controlUnit  = "mmiobrokerd.socket"
	claimUnit    = "mmiobrokerd-claim.socket"
	controlSock  = "/run/mmiobroker/control.sock"
	claimSock    = "/run/mmiobroker/fd.sock"
	unitDir      = "/usr/lib/systemd/system"
	pollInterval = 50 * time.Millisecond
)

func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv("MMIOBROKER_VM_" + name)
	if v == "" {
		t.Fatalf("MMIOBROKER_VM_%s is not set: run in the rig (MMIOBROKER_VM_MODES=systemd make test-vm)", name)
	}
	return v
}

// rigDevices are the BDFs mmb-vfio-bind.service put into the daemon's configuration.
func rigDevices(t *testing.T) []string {
	var bdfs []string
	for _, n := range []string{"EDU1", "EDU2", "IVSHMEM", "TESTDEV", "PCIE"} {
		bdfs = append(bdfs, env(t, n))
	}
	return bdfs
}

// run runs a command with a time limit and returns its combined output.
func run(limit time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s %s: no answer within %v", name, strings.Join(args, " "), limit)
	}
	return out.String(), err
}

// must runs a command that has to succeed.
func must(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := run(time.Minute, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// ctl runs mmiobrokerctl against the socket-activated daemon (the default socket paths).
func ctl(args ...string) (string, error) {
	return run(30*time.Second, "mmiobrokerctl", append([]string{"-timeout", "20s"}, args...)...)
}

// unitState is `systemctl show` of the properties the tests poll.
type unitState struct {
	Active, Sub string
	MainPID     int
	NRestarts   int
}

func (s unitState) String() string {
	return fmt.Sprintf("ActiveState=%s SubState=%s MainPID=%d NRestarts=%d", s.Active, s.Sub, s.MainPID, s.NRestarts)
}

func show(t testing.TB, unit string) unitState {
	t.Helper()
	out := must(t, "systemctl", "show", "-p", "ActiveState,SubState,MainPID,NRestarts", unit)
	var s unitState
	for _, l := range strings.Split(out, "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(l), "=")
		switch k {
		case "ActiveState":
			s.Active = v
		case "SubState":
			s.Sub = v
		case "MainPID":
			s.MainPID, _ = strconv.Atoi(v)
		case "NRestarts":
			s.NRestarts, _ = strconv.Atoi(v)
		}
	}
	return s
}

// waitUnit polls the service until cond holds, failing after limit with the last state.
func waitUnit(t *testing.T, what string, limit time.Duration, cond func(unitState) bool) unitState {
	t.Helper()
	start := time.Now()
	var s unitState
	for {
		s = show(t, service)
		if cond(s) {
			t.Logf("%s after %v: %v", what, time.Since(start).Round(time.Millisecond), s)
			return s
		}
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %v; last state %v\n%s", what, limit, s, journal(service, 40))
		}
		time.Sleep(pollInterval)
	}
}

func active(s unitState) bool { return s.Active == "active" && s.MainPID > 0 }

// journal returns the last n journal lines of a unit, for failure messages.
func journal(unit string, n int) string {
	out, _ := run(30*time.Second, "journalctl", "-b", "--no-pager", "-o", "short-monotonic", "-n", strconv.Itoa(n), "-u", unit)
	return "journal of " + unit + ":\n" + out
}

// notActivatable is set when the daemon cannot take its sockets from systemd: later tests
// that need a running daemon skip with this reason instead of failing the same way again.
var notActivatable string

// requireDaemon skips t if an earlier test found the daemon not socket-activatable.
func requireDaemon(t *testing.T) {
	t.Helper()
	if notActivatable != "" {
		t.Skip(notActivatable)
	}
}

// legacyListenError recognises the daemon that predates socket activation: it tries to
// create its sockets itself, finds systemd listening on them and exits.
func legacyListenError(journalText string) bool {
	return strings.Contains(journalText, "another server is listening there") ||
		strings.Contains(journalText, "another process listens on it")
}

// devicesListed runs `mmiobrokerctl devices` and checks every rig device is in the list.
func devicesListed(t *testing.T) {
	t.Helper()
	out, err := ctl("devices")
	if err != nil {
		t.Fatalf("mmiobrokerctl devices: %v\n%s\n%s", err, out, journal(service, 40))
	}
	for _, bdf := range rigDevices(t) {
		if !strings.Contains(out, bdf) {
			t.Errorf("mmiobrokerctl devices does not list %s:\n%s", bdf, out)
		}
	}
}

var errNoExposure = errors.New("no exposure line")

// parseExposure finds "Overall exposure level for X: 1.9 OK" in systemd-analyze security.
func parseExposure(out string) (float64, error) {
	for _, l := range strings.Split(out, "\n") {
		_, rest, ok := strings.Cut(l, "Overall exposure level for ")
		if !ok {
			continue
		}
		_, rest, _ = strings.Cut(rest, ": ")
		f := strings.Fields(rest)
		if len(f) == 0 {
			break
		}
		return strconv.ParseFloat(f[0], 64)
	}
	return 0, errNoExposure
}

// daemonRunning makes sure the daemon runs — a client call socket-activates it, whatever
// tests ran before — and returns its state.
func daemonRunning(t *testing.T) unitState {
	t.Helper()
	if out, err := run(time.Minute, "mmiobrokerctl", "devices"); err != nil {
		t.Fatalf("mmiobrokerctl devices (socket activation): %v\n%s", err, out)
	}
	return waitUnit(t, "daemon running", 30*time.Second, active)
}
