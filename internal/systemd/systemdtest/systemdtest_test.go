package systemdtest_test

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/systemd/systemdtest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// rawSend sends msg with fds to the fake as an arbitrary client would, then waits for a
// barrier so that the fake has handled it.
func rawSend(t *testing.T, fake *systemdtest.Manager, msg string, fds ...int) {
	t.Helper()
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(s, []byte(msg), oob, &unix.SockaddrUnix{Name: fake.Addr()}, 0); err != nil {
		t.Fatal(err)
	}
	barrier(t, fake)
}

func barrier(t *testing.T, fake *systemdtest.Manager) {
	t.Helper()
	m, err := systemd.New(systemd.Config{NotifySocket: fake.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
}

// pipeFDs returns a pipe whose ends are closed at cleanup unless the test closed them.
func pipeFDs(t *testing.T) (r, w int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	return p[0], p[1]
}

// closedElsewhere reports whether every copy of the write end of the pipe with read end
// r is closed (read sees EOF rather than EAGAIN).
func closedElsewhere(t *testing.T, r int) bool {
	t.Helper()
	var b [1]byte
	n, err := unix.Read(r, b[:])
	switch {
	case n == 0 && err == nil:
		return true
	case err == unix.EAGAIN:
		return false
	}
	t.Fatalf("read: n=%d err=%v", n, err)
	return false
}

// Every fd handed to the fake without being stored is closed once the message is
// handled, and stored ones when the fake closes.
func TestFakeClosesWhatItDoesNotKeep(t *testing.T) {
	testutil.FDLeakCheck(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 1})
	type probe struct{ r, w int }
	newProbe := func() probe { r, w := pipeFDs(t); return probe{r, w} }
	sendAndClose := func(msg string, ps ...probe) {
		fds := make([]int, len(ps))
		for i, p := range ps {
			fds[i] = p.w
		}
		rawSend(t, fake, msg, fds...)
		for _, p := range ps {
			unix.Close(p.w)
		}
	}

	kept, full := newProbe(), newProbe()
	sendAndClose("FDSTORE=1\nFDNAME=one", kept, full) // the store holds one: the second is closed
	plain := newProbe()
	sendAndClose("READY=1", plain) // fds on a plain state are closed
	dupName := newProbe()
	sendAndClose("FDSTOREREMOVE=1\nFDNAME=absent", dupName)
	badBarrier1, badBarrier2 := newProbe(), newProbe()
	sendAndClose("BARRIER=1", badBarrier1, badBarrier2)
	nul := newProbe()
	sendAndClose("READY=1\x00junk", nul)

	for name, p := range map[string]probe{"full": full, "plain": plain, "remove": dupName,
		"barrier": badBarrier1, "barrier2": badBarrier2, "nul": nul} {
		if !closedElsewhere(t, p.r) {
			t.Errorf("%s: the fake kept an fd it should have closed", name)
		}
	}
	if closedElsewhere(t, kept.r) {
		t.Error("stored fd closed")
	}
	if diff := cmp.Diff([]string{"one"}, fake.Stored()); diff != "" {
		t.Errorf("stored (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"READY=1"}, fake.States()); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
	if got := len(fake.Warnings()); got != 5 {
		t.Errorf("%d warnings, want 5: %q", got, fake.Warnings())
	}
	if err := fake.Close(); err != nil {
		t.Fatal(err)
	}
	if !closedElsewhere(t, kept.r) {
		t.Error("Close left a stored fd open")
	}
	for _, p := range []probe{kept, full, plain, dupName, badBarrier1, badBarrier2, nul} {
		unix.Close(p.r)
	}
}

func TestFakeStoreSemantics(t *testing.T) {
	testutil.FDLeakCheck(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 8})
	newMemfd := func() int {
		fd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	a, b, c := newMemfd(), newMemfd(), newMemfd()
	rawSend(t, fake, "FDSTORE=1", a)                     // no name: "stored"
	rawSend(t, fake, "FDSTORE=1\nFDNAME=bad:name", b)    // invalid name: "stored"
	rawSend(t, fake, "FDSTORE=1\nFDNAME=other", a)       // same description again: dropped
	rawSend(t, fake, "FDSTORE=1\nFDNAME=x\nFDPOLL=0", c) // FDPOLL ignored
	dupOfC, err := unix.FcntlInt(uintptr(c), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	rawSend(t, fake, "FDSTORE=1\nFDNAME=y", dupOfC) // a dup is the same description too
	unix.Close(dupOfC)
	if diff := cmp.Diff([]string{"x", "stored", "stored"}, fake.Stored()); diff != "" {
		t.Errorf("stored (-want +got):\n%s", diff)
	}
	rawSend(t, fake, "FDSTOREREMOVE=1\nFDNAME=stored") // removes every entry of that name
	if diff := cmp.Diff([]string{"x"}, fake.Stored()); diff != "" {
		t.Errorf("stored after remove (-want +got):\n%s", diff)
	}
	// FDSTOREREMOVE wins over FDSTORE in one message, as in service_notify_message.
	rawSend(t, fake, "FDSTOREREMOVE=1\nFDSTORE=1\nFDNAME=x", a)
	if got := fake.Stored(); len(got) != 0 {
		t.Errorf("stored %q, want empty", got)
	}
	if w := fake.Warnings(); !slices.ContainsFunc(w, func(s string) bool { return strings.Contains(s, "duplicate") }) {
		t.Errorf("no duplicate warning in %q", w)
	}
}

func TestFakeDisabledStore(t *testing.T) {
	testutil.FDLeakCheck(t)
	fake := systemdtest.Start(t, systemdtest.Options{})
	r, w := pipeFDs(t)
	defer unix.Close(r)
	rawSend(t, fake, "FDSTORE=1\nFDNAME=x", w)
	unix.Close(w)
	if !closedElsewhere(t, r) || len(fake.Stored()) != 0 {
		t.Errorf("a store with FDStoreMax=0 kept an fd: %q", fake.Stored())
	}
	for _, kv := range fake.Env() {
		if strings.HasPrefix(kv, "FDSTORE=") {
			t.Errorf("Env() has %q with the store disabled", kv)
		}
	}
}

func TestFakeRestartAndFlush(t *testing.T) {
	testutil.FDLeakCheck(t)
	fake := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 4, Abstract: true})
	env, files, err := fake.Restart()
	if err != nil || len(files) != 0 {
		t.Fatalf("Restart of an empty store: %q, %v, %v", env, files, err)
	}
	if diff := cmp.Diff([]string{"NOTIFY_SOCKET=" + fake.Addr(), "FDSTORE=4"}, env); diff != "" {
		t.Errorf("env (-want +got):\n%s", diff)
	}
	r1, w1 := pipeFDs(t)
	r2, w2 := pipeFDs(t)
	defer unix.Close(r1)
	defer unix.Close(r2)
	rawSend(t, fake, "FDSTORE=1\nFDNAME=first", w1)
	rawSend(t, fake, "FDSTORE=1\nFDNAME=second", w2)
	unix.Close(w1)
	unix.Close(w2)

	env, files, err = fake.Restart()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"NOTIFY_SOCKET=" + fake.Addr(), "FDSTORE=4", "LISTEN_FDS=2", "LISTEN_FDNAMES=second:first"}
	if diff := cmp.Diff(want, env); diff != "" {
		t.Errorf("env (-want +got):\n%s", diff)
	}
	if len(files) != 2 || files[0].Name() != "second" || files[1].Name() != "first" {
		t.Errorf("files = %v", files)
	}
	for _, f := range files {
		f.Close()
	}
	fake.Flush()
	if !closedElsewhere(t, r1) || !closedElsewhere(t, r2) || len(fake.Stored()) != 0 {
		t.Error("Flush left stored fds open")
	}
}

func TestFakeWaitAfterClose(t *testing.T) {
	fake, err := systemdtest.New(systemdtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := fake.Addr()[:strings.LastIndexByte(fake.Addr(), '/')]
	if err := fake.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fake.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := fake.WaitState(context.Background(), "READY=1"); err == nil {
		t.Error("WaitState on a closed fake returned nil")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("socket directory %s left behind: %v", dir, err)
	}
}
