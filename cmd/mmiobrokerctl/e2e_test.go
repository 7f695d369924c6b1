package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// With envChild set, the test binary is the command that allocate -exec runs: it checks
// fd 3 and the MMIO_LEASE_* variables and exits with the status in envChildExit.
const (
	envChild     = "MMB_CTL_E2E_CHILD"
	envChildExit = "MMB_CTL_E2E_EXIT"
	// envChildRevoke, if set, is the control socket on which the command revokes its own
	// lease before exiting.
	envChildRevoke = "MMB_CTL_E2E_REVOKE"
)

// envAsUID, if set, makes the test binary mmiobrokerctl itself: it drops to this uid (as
// uid, gid and no supplementary groups: not an admin of the test daemon) and runs with its
// arguments. Tests run as root use it for a caller other than the test process.
const envAsUID = "MMB_CTL_E2E_AS_UID"

func TestMain(m *testing.M) {
	if s := os.Getenv(envAsUID); s != "" {
		os.Exit(runAsUID(s, os.Args[1:]))
	}
	if os.Getenv(envChild) == "1" {
		if err := checkLeaseFD(); err != nil {
			fmt.Fprintf(os.Stderr, "child: %v\n", err)
			os.Exit(1)
		}
		if sock := os.Getenv(envChildRevoke); sock != "" {
			// An admin revokes the lease while the command runs.
			if c := run(context.Background(), []string{"-socket", sock, "revoke", os.Getenv("MMIO_LEASE_ID")}, os.Stdout, os.Stderr, noEnv); c != 0 {
				fmt.Fprintf(os.Stderr, "child: revoke exited %d\n", c)
				os.Exit(1)
			}
		}
		code, _ := strconv.Atoi(os.Getenv(envChildExit))
		os.Exit(code)
	}
	goleak.VerifyTestMain(m)
}

// runAsUID is the envAsUID side of the test: mmiobrokerctl as another uid.
func runAsUID(uid string, args []string) int {
	id, err := strconv.Atoi(uid)
	if err == nil {
		err = syscall.Setgroups(nil)
	}
	if err == nil {
		err = syscall.Setgid(id)
	}
	if err == nil {
		err = syscall.Setuid(id)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "child: become uid %s: %v\n", uid, err)
		return 125
	}
	return run(context.Background(), args, os.Stdout, os.Stderr, noEnv)
}

// checkLeaseFD is the -exec command's side of the test.
func checkLeaseFD() error {
	env := map[string]string{}
	for _, k := range []string{"ID", "FD", "BDF", "BAR", "KIND", "SIZE", "INODE", "GENERATION"} {
		v := os.Getenv("MMIO_LEASE_" + k)
		if v == "" {
			return fmt.Errorf("MMIO_LEASE_%s is not set", k)
		}
		env[k] = v
	}
	if env["FD"] != "3" || env["BDF"] != e2eBDF || env["BAR"] != "0" || env["GENERATION"] != "1" || env["KIND"] != "shared" {
		return fmt.Errorf("unexpected environment %v", env)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(3, &st); err != nil {
		return fmt.Errorf("fd 3: %w", err)
	}
	if strconv.FormatUint(st.Ino, 10) != env["INODE"] {
		return fmt.Errorf("fd 3 is inode %d, MMIO_LEASE_INODE is %s", st.Ino, env["INODE"])
	}
	if strconv.FormatInt(st.Size, 10) != env["SIZE"] {
		return fmt.Errorf("fd 3 has size %d, MMIO_LEASE_SIZE is %s", st.Size, env["SIZE"])
	}
	// No other lease's buffer leaked into the command.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range ents {
		if t, _ := os.Readlink("/proc/self/fd/" + e.Name()); e.Name() != "3" && strings.Contains(t, "mmb-") {
			return fmt.Errorf("fd %s (%s) leaked into the command", e.Name(), t)
		}
	}
	return nil
}

const (
	e2eBDF  = "0000:00:03.0"
	e2eBDF2 = "0000:00:04.0"
)

// testDaemon is the real daemon wiring on fake devices, listening in a temp directory.
type testDaemon struct {
	*daemontest.Daemon
	dev *brokertest.Device
}

func startDaemon(t *testing.T) *testDaemon {
	t.Helper()
	return startDaemonConfig(t, fmt.Sprintf(`
[limits]
claim_timeout = "10s"

[[device]]
address = %q
allow_uids = [%d]

[[device]]
address = %q
bars = [0]
`, e2eBDF, os.Getuid(), e2eBDF2))
}

// startDaemonConfig starts a daemon with config (daemontest.Start) on fake devices at
// e2eBDF and e2eBDF2.
func startDaemonConfig(t *testing.T, config string) *testDaemon {
	t.Helper()
	dev := brokertest.NewDevice(e2eBDF)
	d := daemontest.Start(t, config, dev, brokertest.NewDevice(e2eBDF2))
	fi, err := os.Stat(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("control socket mode = %v, want a socket with 0660", fi.Mode())
	}
	return &testDaemon{Daemon: d, dev: dev}
}

// ctl runs mmiobrokerctl against the daemon.
func (d *testDaemon) ctl(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), append([]string{"-socket", d.Control}, args...), &out, &errb, noEnv)
	return out.String(), errb.String(), code
}

func noEnv(string) string { return "" }

// mustCtl runs mmiobrokerctl and fails the test unless it exits 0.
func (d *testDaemon) mustCtl(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := d.ctl(t, args...)
	if code != 0 {
		t.Fatalf("mmiobrokerctl %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// lines streams the lines written to a pipe.
type lines struct {
	w  *io.PipeWriter
	ch chan string
}

func newLines() *lines {
	r, w := io.Pipe()
	l := &lines{w: w, ch: make(chan string, 100)}
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l.ch <- sc.Text()
		}
		close(l.ch)
	}()
	return l
}

// next returns the next line, failing the test if none comes within a generous bound.
func (l *lines) next(t *testing.T, what string) string {
	t.Helper()
	select {
	case s, ok := <-l.ch:
		if !ok {
			t.Fatalf("%s: output ended", what)
		}
		return s
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: no output line within 30s", what)
	}
	return ""
}

// until returns the first line containing sub.
func (l *lines) until(t *testing.T, what, sub string) string {
	t.Helper()
	for {
		if s := l.next(t, what); strings.Contains(s, sub) {
			return s
		}
	}
}

// waitAll reads lines until, for each group of substrings, a line containing all of them
// was seen, in any order.
func (l *lines) waitAll(t *testing.T, what string, groups ...[]string) {
	t.Helper()
	seen := make([]bool, len(groups))
	left := len(groups)
	for left > 0 {
		s := l.next(t, what)
		for i, g := range groups {
			if seen[i] {
				continue
			}
			all := true
			for _, sub := range g {
				all = all && strings.Contains(s, sub)
			}
			if all {
				seen[i] = true
				left--
				break
			}
		}
	}
}

type jsonLease struct {
	ID         string `json:"id"`
	BDF        string `json:"bdf"`
	State      string `json:"state"`
	Generation string `json:"generation"`
	Inode      string `json:"inode"`
	EndReason  string `json:"end_reason"`
	VMName     string `json:"vm_name"`
}

func TestEndToEnd(t *testing.T) {
	testutil.FDLeakCheck(t)
	d := startDaemon(t)

	t.Run("devices", func(t *testing.T) {
		out := d.mustCtl(t, "devices")
		if !strings.HasPrefix(out, "BDF ") || !strings.Contains(out, e2eBDF) || !strings.Contains(out, e2eBDF2) {
			t.Errorf("devices table lacks the header or a device:\n%s", out)
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			if !strings.HasSuffix(l, "usable") {
				t.Errorf("device line not usable: %q", l)
			}
		}
		var doc struct {
			Devices []struct {
				BDF    string `json:"bdf"`
				Usable bool   `json:"usable"`
				Mode   string `json:"access_mode"`
			} `json:"devices"`
		}
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "devices")), &doc); err != nil {
			t.Fatal(err)
		}
		if len(doc.Devices) != 2 || doc.Devices[0].BDF != e2eBDF || !doc.Devices[0].Usable || doc.Devices[0].Mode != "ACCESS_MODE_GROUP" {
			t.Errorf("devices JSON = %+v", doc)
		}
	})

	t.Run("device", func(t *testing.T) {
		out := d.mustCtl(t, "device", "00:03.0") // the short form works
		for _, want := range []string{"Device:", e2eBDF, "Access mode:", "group", "Who may lease:", fmt.Sprintf("uids [%d]", os.Getuid()), "mem64,prefetch"} {
			if !strings.Contains(out, want) {
				t.Errorf("device output lacks %q:\n%s", want, out)
			}
		}
		_, errs, code := d.ctl(t, "device", "0000:00:1f.0")
		if code != exitNotFound || !strings.HasPrefix(errs, "mmiobrokerctl: NotFound: ") {
			t.Errorf("device of an unconfigured BDF: exit %d, stderr %q; want %d and NotFound", code, errs, exitNotFound)
		}
	})

	t.Run("allocate-exec", func(t *testing.T) {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv(envChild, "1")
		t.Setenv(envChildExit, "42")
		out, errs, code := d.ctl(t, "allocate", "-range", "0:64K", "-vm", "vm-exec", "-exec", e2eBDF, "0", "--", exe)
		if code != 42 {
			t.Fatalf("allocate -exec: exit %d, want the command's 42\nstdout: %s\nstderr: %s", code, out, errs)
		}
		// The lease was released (not revoked) after the command exited.
		var doc struct{ Leases []jsonLease }
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "leases", "-all")), &doc); err != nil {
			t.Fatal(err)
		}
		var found bool
		for _, l := range doc.Leases {
			if l.VMName == "vm-exec" {
				found = true
				if l.State != "LEASE_STATE_RELEASED" || l.EndReason != "END_REASON_RELEASED" {
					t.Errorf("exec lease after the command: %+v, want released", l)
				}
			}
		}
		if !found {
			t.Errorf("no lease of vm-exec in %+v", doc.Leases)
		}
		if d.dev.Revokes != 0 {
			t.Errorf("device revoked %d times by allocate -exec", d.dev.Revokes)
		}

		// A command that cannot be started: exit 127, lease released.
		_, errs, code = d.ctl(t, "allocate", "-exec", e2eBDF, "0", "--", "/nonexistent/vmm")
		if code != exitCannotExec || !strings.Contains(errs, "/nonexistent/vmm") {
			t.Errorf("allocate -exec of a missing command: exit %d, stderr %q", code, errs)
		}
		if out := d.mustCtl(t, "leases"); strings.Count(out, "\n") != 1 {
			t.Errorf("live leases left behind:\n%s", out)
		}

		// The lease is revoked while the command runs: the command's status still wins,
		// and mmiobrokerctl says the lease had ended instead of failing the release.
		t.Setenv(envChildRevoke, d.Control)
		t.Setenv(envChildExit, "0")
		out, errs, code = d.ctl(t, "allocate", "-exec", e2eBDF, "0", "--", exe)
		if code != 0 || !strings.Contains(errs, "ended while") {
			t.Errorf("allocate -exec with the lease revoked meanwhile: exit %d\nstdout: %s\nstderr: %s", code, out, errs)
		}
	})

	t.Run("hold-reissue-revoke-watch", func(t *testing.T) {
		// Make sure the event log is not empty, then watch it all from seq 2 on: replay
		// and live events come without gaps, so nothing below can be missed.
		d.mustCtl(t, "allocate", "-exec", e2eBDF, "0", "--", "/bin/true")
		watchOut := newLines()
		wctx, stopWatch := context.WithCancel(context.Background())
		watchDone := make(chan int, 1)
		go func() {
			watchDone <- run(wctx, []string{"-socket", d.Control, "-json", "watch", "-cursor", "1"}, watchOut.w, io.Discard, noEnv)
			watchOut.w.Close()
		}()

		holdOut, holdErr := newLines(), newLines()
		hctx, stopHold := context.WithCancel(context.Background())
		holdDone := make(chan int, 1)
		go func() {
			holdDone <- run(hctx, []string{"-socket", d.Control, "-json", "allocate", "-vm", "vm-hold", e2eBDF, "0"}, holdOut.w, holdErr.w, noEnv)
			holdOut.w.Close()
			holdErr.w.Close()
		}()
		// The JSON document is indented: collect lines up to the closing brace.
		var doc strings.Builder
		for {
			l := holdOut.next(t, "allocate output")
			doc.WriteString(l)
			if l == "}" {
				break
			}
		}
		var alloc struct {
			Lease jsonLease `json:"lease"`
			FD    struct {
				FD         int    `json:"fd"`
				Inode      uint64 `json:"inode"`
				Size       uint64 `json:"size"`
				Generation uint64 `json:"generation"`
			} `json:"fd"`
		}
		if err := json.Unmarshal([]byte(doc.String()), &alloc); err != nil {
			t.Fatalf("allocate JSON %q: %v", doc.String(), err)
		}
		if alloc.FD.Size != 1<<20 || alloc.FD.Generation != 1 || alloc.FD.FD < 3 || alloc.Lease.State != "LEASE_STATE_ALLOCATED" {
			t.Errorf("allocation = %+v, want the whole 1 MiB BAR 0, generation 1", alloc)
		}
		held := alloc.Lease.ID
		// The held fd is open in this process.
		if target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", alloc.FD.FD)); err != nil || !strings.Contains(target, "mmb-"+held) {
			t.Errorf("fd %d -> %q, %v; want the lease's buffer", alloc.FD.FD, target, err)
		}
		watchOut.waitAll(t, "watch", []string{`"type":"EVENT_TYPE_CLAIMED"`, held})

		// A second lease on the same device, then its revocation: the held lease is
		// reissued and the holding mmiobrokerctl claims the new generation.
		cl, err := client.Dial(d.Control)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		other, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 4})
		if err != nil {
			t.Fatal(err)
		}
		defer other.File.Close()
		out := d.mustCtl(t, "revoke", other.ID)
		if !strings.HasPrefix(out, "revoked lease "+other.ID) {
			t.Errorf("revoke output: %q", out)
		}
		note := holdErr.until(t, "hold notices", "reissued")
		if !strings.Contains(note, "lease "+held+" reissued: generation 2") {
			t.Errorf("reissue notice %q", note)
		}
		// The watcher sees the revocation, the reissue and the holder's claim of the new
		// generation.
		watchOut.waitAll(t, "watch",
			[]string{`"type":"EVENT_TYPE_REVOKED"`, other.ID},
			[]string{`"type":"EVENT_TYPE_REISSUED"`, held, `"generation":"2"`},
			[]string{`"type":"EVENT_TYPE_CLAIMED"`, held, `"generation":"2"`})
		leases := d.mustCtl(t, "leases", "-device", e2eBDF)
		if !strings.Contains(leases, held) || strings.Contains(leases, other.ID) {
			t.Errorf("live leases:\n%s", leases)
		}

		// Stopping the hold releases the lease.
		stopHold()
		if code := <-holdDone; code != 0 {
			t.Errorf("allocate (hold) exit %d after SIGINT, want 0", code)
		}
		holdErr.until(t, "hold notices", "released lease "+held)
		watchOut.waitAll(t, "watch", []string{`"type":"EVENT_TYPE_RELEASED"`, held})

		// Releasing it again fails with FailedPrecondition.
		_, errs, code := d.ctl(t, "release", held)
		if code != exitFailedPrecondition || !strings.HasPrefix(errs, "mmiobrokerctl: FailedPrecondition: ") {
			t.Errorf("second release: exit %d, stderr %q", code, errs)
		}
		_, errs, code = d.ctl(t, "revoke", "0123456789abcdef01234567")
		if code != exitNotFound {
			t.Errorf("revoke of an unknown lease: exit %d, stderr %q", code, errs)
		}

		stopWatch()
		if code := <-watchDone; code != 0 {
			t.Errorf("watch exit %d after SIGINT, want 0", code)
		}
	})

	t.Run("release", func(t *testing.T) {
		cl, err := client.Dial(d.Control)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		l, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0, Ranges: nil, VMName: "vm-release"})
		if err != nil {
			t.Fatal(err)
		}
		defer l.File.Close()
		var doc struct{ Lease jsonLease }
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "release", l.ID)), &doc); err != nil {
			t.Fatal(err)
		}
		if doc.Lease.ID != l.ID || doc.Lease.State != "LEASE_STATE_RELEASED" {
			t.Errorf("release JSON = %+v", doc.Lease)
		}
	})

	t.Run("watch-cursor", func(t *testing.T) {
		d.mustCtl(t, "allocate", "-exec", e2eBDF, "0", "--", "/bin/true") // events 1-3 at least
		watch := func(args ...string) string {
			out := newLines()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan int, 1)
			go func() {
				done <- run(ctx, append([]string{"-socket", d.Control}, args...), out.w, io.Discard, noEnv)
				out.w.Close()
			}()
			first := out.next(t, "watch")
			cancel()
			if code := <-done; code != 0 {
				t.Errorf("watch %v: exit %d", args, code)
			}
			for range out.ch { // drain
			}
			return first
		}
		first := watch("watch", "-cursor", "1")
		if !strings.HasPrefix(first, "seq=2 time=") || !strings.Contains(first, " type=") || !strings.Contains(first, " lease=") {
			t.Errorf("first replayed event: %q", first)
		}
		var e struct {
			Seq  string `json:"seq"`
			Type string `json:"type"`
		}
		if err := json.Unmarshal([]byte(watch("-json", "watch", "-cursor", "1")), &e); err != nil {
			t.Fatal(err)
		}
		if e.Seq != "2" || !strings.Contains(first, " type="+strings.ToLower(strings.TrimPrefix(e.Type, "EVENT_TYPE_"))+" ") {
			t.Errorf("JSON event %+v does not match %q", e, first)
		}
		_, errs, code := d.ctl(t, "watch", "-cursor", "999999")
		if code != exitInvalidArgument {
			t.Errorf("watch ahead of the log: exit %d, stderr %q", code, errs)
		}
	})

	// The daemon stops cleanly and removes its sockets.
	if err := d.Stop(); err != nil {
		t.Fatalf("daemon stop: %v", err)
	}
	for _, p := range []string{d.Control, d.Claim} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("socket %s left behind", p)
		}
	}
	_, errs, code := d.ctl(t, "devices")
	if code != exitUnavailable || !strings.HasPrefix(errs, "mmiobrokerctl: cannot reach mmiobrokerd at "+d.Control+": there is no socket there") {
		t.Errorf("devices with no daemon: exit %d, stderr %q", code, errs)
	}
}

// heldLease is an "allocate" (hold mode) running in the background.
type heldLease struct {
	id       string
	doc      map[string]any // the allocation's JSON lease
	out, err *lines
	stop     context.CancelFunc
	done     chan int
}

// hold runs "mmiobrokerctl -json allocate ARGS..." in the background until the test stops
// it, and returns once the lease is allocated and claimed.
func (d *testDaemon) hold(t *testing.T, args ...string) *heldLease {
	t.Helper()
	h := &heldLease{out: newLines(), err: newLines(), done: make(chan int, 1)}
	ctx, stop := context.WithCancel(context.Background())
	h.stop = stop
	go func() {
		h.done <- run(ctx, append([]string{"-socket", d.Control, "-json", "allocate"}, args...), h.out.w, h.err.w, noEnv)
		h.out.w.Close()
		h.err.w.Close()
	}()
	t.Cleanup(func() {
		stop()
		<-h.done
	})
	var doc strings.Builder
	for {
		l := h.out.next(t, "allocate output")
		doc.WriteString(l)
		if l == "}" {
			break
		}
	}
	var v struct {
		Lease map[string]any `json:"lease"`
	}
	if err := json.Unmarshal([]byte(doc.String()), &v); err != nil {
		t.Fatalf("allocate JSON %q: %v", doc.String(), err)
	}
	h.doc = v.Lease
	h.id, _ = v.Lease["id"].(string)
	return h
}

// exit waits for the hold to end by itself and returns its exit code.
func (h *heldLease) exit(t *testing.T) int {
	t.Helper()
	select {
	case code := <-h.done:
		h.done <- code // for the cleanup
		return code
	case <-time.After(30 * time.Second):
		t.Fatal("allocate (hold) did not exit within 30s")
	}
	return 0
}

// leaseJSON returns lease id as "leases -all -json" shows it.
func (d *testDaemon) leaseJSON(t *testing.T, id string) map[string]any {
	t.Helper()
	var doc struct {
		Leases []map[string]any `json:"leases"`
	}
	if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "leases", "-all")), &doc); err != nil {
		t.Fatal(err)
	}
	for _, l := range doc.Leases {
		if l["id"] == id {
			return l
		}
	}
	t.Fatalf("no lease %s in %v", id, doc.Leases)
	return nil
}

func TestEndToEndLifecycle(t *testing.T) {
	testutil.FDLeakCheck(t)
	d := startDaemon(t)

	t.Run("ttl-renew-expire", func(t *testing.T) {
		h := d.hold(t, "-ttl", "1h", "-range", "0:4K", e2eBDF, "0")
		if h.doc["ttl"] != "3600s" || h.doc["expire_time"] == nil {
			t.Errorf("allocation with -ttl 1h: ttl %v, expire_time %v", h.doc["ttl"], h.doc["expire_time"])
		}
		table := d.mustCtl(t, "leases")
		if !strings.Contains(table, "EXPIRES") || !strings.Contains(table, h.id) {
			t.Errorf("leases table:\n%s", table)
		}
		out := d.mustCtl(t, "renew", "-ttl", "2h", h.id)
		if !strings.HasPrefix(out, "renewed lease "+h.id+": ttl 2h0m0s, expires 20") {
			t.Errorf("renew output %q", out)
		}
		h.err.until(t, "hold notices", "lease "+h.id+" renewed: ttl 2h0m0s, expires 20")
		var doc struct{ Lease map[string]any }
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "renew", h.id)), &doc); err != nil || doc.Lease["ttl"] != "7200s" {
			t.Errorf("renew -json (the lease's own ttl): %v, %v", doc.Lease, err)
		}
		// A renewal that expires at once: the lease is revoked and the hold exits 10.
		d.mustCtl(t, "renew", "-ttl", "1ms", h.id)
		if code := h.exit(t); code != exitLeaseEnded {
			t.Errorf("hold exit %d after expiry, want %d", code, exitLeaseEnded)
		}
		h.err.until(t, "hold error", "mmiobrokerctl: lease "+h.id+" ended: expired (expired, by broker (ttl))")
		if l := d.leaseJSON(t, h.id); l["state"] != "LEASE_STATE_REVOKED" || l["end_reason"] != "END_REASON_EXPIRED" {
			t.Errorf("expired lease %v", l)
		}
		_, errs, code := d.ctl(t, "renew", h.id)
		if code != exitFailedPrecondition {
			t.Errorf("renew of an expired lease: exit %d, stderr %q", code, errs)
		}
		_, errs, code = d.ctl(t, "renew", "-ttl", "9000h", "0123456789abcdef01234567")
		if code != exitInvalidArgument || !strings.Contains(errs, "longer than") {
			t.Errorf("renew -ttl 9000h: exit %d, stderr %q", code, errs)
		}
	})

	t.Run("revoke-grace", func(t *testing.T) {
		var cycles int
		d.dev.Locked(func(dev *brokertest.Device) { cycles = dev.Revokes })
		watchOut := newLines()
		wctx, stopWatch := context.WithCancel(context.Background())
		watchDone := make(chan int, 1)
		go func() {
			// From the first retained event: whenever the stream starts, it replays the
			// hold's allocation, so waiting for it below cannot race the subscription.
			watchDone <- run(wctx, []string{"-socket", d.Control, "watch", "-cursor", "1"}, watchOut.w, io.Discard, noEnv)
			watchOut.w.Close()
		}()
		defer func() {
			stopWatch()
			<-watchDone
		}()
		h := d.hold(t, "-range", "0:4K", e2eBDF, "0")
		watchOut.waitAll(t, "watch", []string{"type=claimed", h.id}) // the watch is in place and caught up

		out := d.mustCtl(t, "revoke", "-grace", "1h", h.id)
		if !strings.HasPrefix(out, "revoke of lease "+h.id+" requested") || !strings.Contains(out, "may release it until 20") {
			t.Errorf("revoke -grace output %q", out)
		}
		// The holding mmiobrokerctl cooperates: it releases the lease and exits 10.
		if code := h.exit(t); code != exitLeaseEnded {
			t.Errorf("hold exit %d after a revoke request, want %d", code, exitLeaseEnded)
		}
		h.err.until(t, "hold error", "lease "+h.id+": an administrator asked for it back (revoke deadline 20")
		watchOut.waitAll(t, "watch",
			[]string{"type=revoke_requested", h.id, " revoke_deadline=20"},
			[]string{"type=released", h.id, "end_reason=released"})
		if l := d.leaseJSON(t, h.id); l["state"] != "LEASE_STATE_RELEASED" || l["end_reason"] != "END_REASON_RELEASED" {
			t.Errorf("lease after the cooperative release %v", l)
		}
		d.dev.Locked(func(dev *brokertest.Device) {
			if dev.Revokes != cycles+1 {
				t.Errorf("device cycles %d -> %d; the cooperative release completes the revoke with one cycle", cycles, dev.Revokes)
			}
		})
		_, errs, code := d.ctl(t, "revoke", "-grace", "2h", h.id)
		if code != exitInvalidArgument || !strings.Contains(errs, "grace_period 2h0m0s is longer than the 1h0m0s allowed") {
			t.Errorf("revoke -grace 2h: exit %d, stderr %q", code, errs)
		}

		// A holder that does not cooperate (a lease held through the library) is revoked
		// at the deadline.
		cl, err := client.Dial(d.Control)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		l, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0, Ranges: nil})
		if err != nil {
			t.Fatal(err)
		}
		defer l.File.Close()
		var doc struct{ Lease map[string]any }
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "revoke", "-grace", "10ms", l.ID)), &doc); err != nil ||
			doc.Lease["state"] != "LEASE_STATE_ACTIVE" || doc.Lease["revoke_deadline"] == nil {
			t.Errorf("revoke -grace -json: %v, %v", doc.Lease, err)
		}
		watchOut.waitAll(t, "watch", []string{"type=revoked", l.ID, "end_reason=revoked", `ended_by="uid`})
	})

	t.Run("suspend-resume", func(t *testing.T) {
		h := d.hold(t, "-range", "0:4K", e2eBDF, "0")
		out := d.mustCtl(t, "suspend", "00:03.0")
		if out != "suspended device "+e2eBDF+": the dma-bufs of its 1 live lease(s) are inaccessible; new leases are refused until resume\n" {
			t.Errorf("suspend output %q", out)
		}
		h.err.until(t, "hold notices", "lease "+h.id+": device "+e2eBDF+" suspended")
		if table := d.mustCtl(t, "devices"); !strings.Contains(table, "ERRORS") || !regexp.MustCompile(e2eBDF+`.*\s+suspended\n`).MatchString(table) {
			t.Errorf("devices table while suspended:\n%s", table)
		}
		_, errs, code := d.ctl(t, "allocate", "-exec", e2eBDF, "0", "--", "/bin/true")
		if code != exitFailedPrecondition || !strings.Contains(errs, "suspended") {
			t.Errorf("allocate on a suspended device: exit %d, stderr %q", code, errs)
		}
		_, errs, code = d.ctl(t, "suspend", e2eBDF)
		if code != exitFailedPrecondition {
			t.Errorf("second suspend: exit %d, stderr %q", code, errs)
		}
		var doc struct{ Device map[string]any }
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "resume", e2eBDF)), &doc); err != nil || doc.Device["suspended"] != false {
			t.Errorf("resume -json: %v, %v", doc.Device, err)
		}
		h.err.until(t, "hold notices", "lease "+h.id+": device "+e2eBDF+" resumed")
		if out := d.mustCtl(t, "device", e2eBDF); !strings.Contains(out, "Suspended:          no\n") || !strings.Contains(out, "Errors (AER):       0\n") {
			t.Errorf("device after resume:\n%s", out)
		}
		_, errs, code = d.ctl(t, "suspend", "0000:00:1f.0")
		if code != exitNotFound {
			t.Errorf("suspend of an unconfigured device: exit %d, stderr %q", code, errs)
		}
		h.stop()
		if code := h.exit(t); code != 0 {
			t.Errorf("hold exit %d after SIGINT, want 0", code)
		}
	})
}
