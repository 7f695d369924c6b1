package systemd_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/systemd/systemdtest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// memfd returns a new memfd holding content, closed at cleanup.
func memfd(t testing.TB, content string) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("mmb-systemd-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	t.Cleanup(func() { f.Close() })
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
	return f
}

func contents(t testing.TB, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func client(t testing.TB, fake *systemdtest.Manager) *systemd.Manager {
	t.Helper()
	c, err := fake.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Restored().Close() })
	return c
}

func TestNotify(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{})
	c := client(t, fake)
	if !c.Managed() {
		t.Fatal("Managed() = false with a notify socket")
	}
	states := []string{"READY=1", "STATUS=serving 2 of 3 devices", "WATCHDOG=1", "EXTEND_TIMEOUT_USEC=5000000",
		"RELOADING=1\nMONOTONIC_USEC=123456", "STOPPING=1"}
	for _, s := range states {
		if err := c.Notify(s); err != nil {
			t.Fatalf("Notify(%q): %v", s, err)
		}
	}
	if err := c.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(states, fake.States()); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
	if got := fake.Barriers(); got != 1 {
		t.Errorf("barriers = %d, want 1", got)
	}
	if w := fake.Warnings(); len(w) != 0 {
		t.Errorf("warnings: %q", w)
	}
	if err := fake.WaitState(ctx, "MONOTONIC_USEC=123456"); err != nil {
		t.Error(err)
	}
}

func TestNotifyRejects(t *testing.T) {
	fake := systemdtest.Start(t, systemdtest.Options{})
	c := client(t, fake)
	for _, s := range []string{"", "STATUS=a\x00b", "STATUS=" + strings.Repeat("x", systemd.MaxMessageSize)} {
		if err := c.Notify(s); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Notify(%.20q…) = %v, want ErrInvalidArgument", s, err)
		}
	}
	if err := c.Notify("STATUS=" + strings.Repeat("x", systemd.MaxMessageSize-len("STATUS="))); err != nil {
		t.Errorf("Notify of exactly MaxMessageSize bytes: %v", err)
	}
}

func TestStoreRemove(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 8})
	c := client(t, fake)
	if got := c.FDStoreMax(); got != 8 {
		t.Errorf("FDStoreMax() = %d, want 8", got)
	}
	a, b := memfd(t, "a"), memfd(t, "b")
	if err := c.StoreFD("lease-a", a); err != nil {
		t.Fatal(err)
	}
	if err := c.StoreFD("lease-b", b); err != nil {
		t.Fatal(err)
	}
	if err := c.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"lease-b", "lease-a"}, fake.Stored()); diff != "" {
		t.Errorf("stored (-want +got):\n%s", diff)
	}
	// The caller still owns its files.
	if got := contents(t, a); got != "a" {
		t.Errorf("our copy of a reads %q", got)
	}
	if err := c.RemoveFD(ctx, "lease-a"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"lease-b"}, fake.Stored()); diff != "" {
		t.Errorf("stored after RemoveFD (-want +got):\n%s", diff)
	}
	if err := c.RemoveFD(ctx, "not-stored"); err != nil {
		t.Errorf("RemoveFD of an absent name: %v", err)
	}
	if got := fake.States(); len(got) != 0 {
		t.Errorf("fd store messages recorded as states: %q", got)
	}
	if w := fake.Warnings(); len(w) != 0 {
		t.Errorf("warnings: %q", w)
	}
}

// After RemoveFD returns, the manager's copy is closed: store the write end of a pipe,
// close ours, and the read end sees EOF exactly when RemoveFD has returned.
func TestRemoveFDClosesManagersCopy(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4})
	c := client(t, fake)

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	w := os.NewFile(uintptr(p[1]), "pipe-w")
	if err := c.StoreFD("pipe", w); err != nil {
		w.Close()
		t.Fatal(err)
	}
	if err := c.Barrier(ctx); err != nil {
		w.Close()
		t.Fatal(err)
	}
	w.Close()
	readEnd := func() (int, error) {
		var buf [1]byte
		return unix.Read(p[0], buf[:])
	}
	if n, err := readEnd(); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("read end after closing our copy: n=%d err=%v, want EAGAIN (the manager still holds the write end)", n, err)
	}
	if err := c.RemoveFD(ctx, "pipe"); err != nil {
		t.Fatal(err)
	}
	if n, err := readEnd(); n != 0 || err != nil {
		t.Fatalf("read end after RemoveFD: n=%d err=%v, want EOF", n, err)
	}
}

func TestInvalidNames(t *testing.T) {
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4})
	c := client(t, fake)
	unmanaged, err := systemd.New(systemd.Config{})
	if err != nil {
		t.Fatal(err)
	}
	f := memfd(t, "x")
	ctx := testContext(t)
	bad := []string{"", "a:b", "a\nb", "tab\there", "del\x7f", "caf\xc3\xa9", strings.Repeat("n", 256), "nul\x00"}
	for _, name := range bad {
		if err := systemd.ValidateFDName(name); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ValidateFDName(%.20q) = %v, want ErrInvalidArgument", name, err)
		}
		for _, m := range []*systemd.Manager{c, unmanaged} {
			if err := m.StoreFD(name, f); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("StoreFD(%.20q) = %v, want ErrInvalidArgument", name, err)
			}
			if err := m.RemoveFD(ctx, name); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("RemoveFD(%.20q) = %v, want ErrInvalidArgument", name, err)
			}
		}
	}
	for _, name := range []string{"lease-01JC0", " ", "~!@#$%^&*()", strings.Repeat("n", 255)} {
		if err := systemd.ValidateFDName(name); err != nil {
			t.Errorf("ValidateFDName(%.20q) = %v", name, err)
		}
	}
	var serr *systemd.Error
	if err := c.StoreFD("a:b", f); !errors.As(err, &serr) || serr.Op != "store-fd" || serr.Name != "a:b" {
		t.Errorf("StoreFD error = %#v, want a *systemd.Error for store-fd of a:b", err)
	}
	if err := c.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if got := fake.Stored(); len(got) != 0 {
		t.Errorf("stored %q", got)
	}
}

func TestUnmanaged(t *testing.T) {
	testutil.FDLeakCheck(t)
	t.Setenv("NOTIFY_SOCKET", "")
	os.Unsetenv("NOTIFY_SOCKET")
	for _, k := range []string{"FDSTORE", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		t.Setenv(k, "")
	}
	m, err := systemd.FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if m.Managed() || m.FDStoreMax() != 0 || m.WatchdogInterval() != 0 || len(m.Restored().Names()) != 0 {
		t.Fatalf("unmanaged: Managed=%v FDStoreMax=%d Watchdog=%v Restored=%q",
			m.Managed(), m.FDStoreMax(), m.WatchdogInterval(), m.Restored().Names())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // a no-op must not even look at the context
	f := memfd(t, "x")
	for name, err := range map[string]error{
		"Notify":   m.Notify("READY=1"),
		"StoreFD":  m.StoreFD("lease-1", f),
		"RemoveFD": m.RemoveFD(ctx, "lease-1"),
		"Barrier":  m.Barrier(ctx),
	} {
		if err != nil {
			t.Errorf("%s without NOTIFY_SOCKET: %v", name, err)
		}
	}
}

func TestFromEnv(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 16})
	fake.Setenv(t)
	t.Setenv("WATCHDOG_USEC", "30000000")
	m, err := systemd.FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	defer m.Restored().Close()
	if !m.Managed() || m.NotifySocket() != fake.Addr() || m.FDStoreMax() != 16 || m.WatchdogInterval() != 30*time.Second {
		t.Fatalf("FromEnv: Managed=%v NotifySocket=%q FDStoreMax=%d Watchdog=%v",
			m.Managed(), m.NotifySocket(), m.FDStoreMax(), m.WatchdogInterval())
	}
	if err := m.Notify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if err := fake.WaitState(ctx, "READY=1"); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []string{"relative/path", "vsock:2:1234", "@", "/" + strings.Repeat("p", 107)} {
		t.Setenv("NOTIFY_SOCKET", bad)
		if _, err := systemd.FromEnv(); err == nil {
			t.Errorf("FromEnv with NOTIFY_SOCKET=%.20q succeeded", bad)
		}
	}
	t.Setenv("NOTIFY_SOCKET", fake.Addr())
	t.Setenv("FDSTORE", "many")
	if _, err := systemd.FromEnv(); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("FromEnv with FDSTORE=many: %v, want ErrInvalidArgument", err)
	}
}

func TestAbstractSocket(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 2, Abstract: true})
	if !strings.HasPrefix(fake.Addr(), "@") {
		t.Fatalf("abstract fake at %q", fake.Addr())
	}
	c := client(t, fake)
	if err := c.Notify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if err := c.StoreFD("dev", memfd(t, "d")); err != nil {
		t.Fatal(err)
	}
	if err := c.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"READY=1"}, fake.States()); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"dev"}, fake.Stored()); diff != "" {
		t.Errorf("stored (-want +got):\n%s", diff)
	}
}

// A service manager that never reads: Barrier gives up when ctx is done, and leaves no
// fd or goroutine behind.
func TestBarrierContext(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	path := dir + "/notify"
	deaf, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer deaf.Close()
	m, err := systemd.New(systemd.Config{NotifySocket: path})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := m.Barrier(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Barrier with a deaf manager = %v, want context.DeadlineExceeded", err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.RemoveFD(ctx, "x") }()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("RemoveFD cancelled = %v, want context.Canceled", err)
	}
	// Drain what the deaf manager received so that no fd stays queued in its socket.
	deaf.SetReadDeadline(time.Now())
	buf, oob := make([]byte, 4096), make([]byte, 256)
	for {
		_, oobn, _, _, err := deaf.ReadMsgUnix(buf, oob)
		if err != nil {
			break
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for i := range msgs {
			fds, _ := unix.ParseUnixRights(&msgs[i])
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}
}

func TestNotifySocketGone(t *testing.T) {
	m, err := systemd.New(systemd.Config{NotifySocket: testutil.ShortTempDir(t) + "/gone"})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Notify("READY=1"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Notify to a missing socket = %v, want ENOENT", err)
	}
}

// A simulated crash and restart in process: the second Client sees the store.
func TestClientRestart(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4})
	first := client(t, fake)
	for _, name := range []string{"lease-1", "lease-2", "other"} {
		if err := first.StoreFD(name, memfd(t, "content of "+name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	second := client(t, fake)
	r := second.Restored()
	if diff := cmp.Diff([]string{"other", "lease-2", "lease-1"}, r.Names()); diff != "" {
		t.Errorf("restored names (-want +got):\n%s", diff)
	}
	leases := r.TakePrefix("lease-")
	if len(leases) != 2 {
		t.Fatalf("TakePrefix(lease-) = %v", leases)
	}
	for name, f := range leases {
		if got := contents(t, f); got != "content of "+name {
			t.Errorf("restored %s reads %q", name, got)
		}
		f.Close()
	}
	if err := second.RemoveFD(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"lease-2", "lease-1"}, fake.Stored()); diff != "" {
		t.Errorf("stored (-want +got):\n%s", diff)
	}
}

// A real restart through exec: the child receives the store as fds 3… with
// LISTEN_FDS/LISTEN_FDNAMES and reads it through go-systemd's activation.Files.
func TestRestartChild(t *testing.T) {
	testutil.FDLeakCheck(t)
	ctx := testContext(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4})
	c := client(t, fake)
	for _, name := range []string{"lease-1", "lease-2"} {
		if err := c.StoreFD(name, memfd(t, "content of "+name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	env, files, err := fake.Restart()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"=restored")
	cmd.Env = append(cmd.Env, env...)
	cmd.ExtraFiles = files
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	for _, f := range files {
		f.Close()
	}
	if err != nil {
		t.Fatalf("child: %v\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	want := "managed=true fdstore=4\nfd lease-2=content of lease-2\nfd lease-1=content of lease-1\n"
	if diff := cmp.Diff(want, stdout.String()); diff != "" {
		t.Errorf("child output (-want +got):\n%s", diff)
	}
	if err := fake.WaitState(ctx, "READY=1"); err != nil {
		t.Fatal(err)
	}
}

func TestStoreClosedFile(t *testing.T) {
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4})
	c := client(t, fake)
	f := memfd(t, "x")
	f.Close()
	if err := c.StoreFD("closed", f); !errors.Is(err, os.ErrClosed) {
		t.Errorf("StoreFD of a closed file = %v, want os.ErrClosed", err)
	}
	if err := c.StoreFD("nil", nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("StoreFD(nil) = %v, want ErrInvalidArgument", err)
	}
}
