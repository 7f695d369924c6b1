package systemd_test

import (
	"errors"
	"net"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// newFile returns a memfd not registered for cleanup: the Restored under test owns it.
func newFile(t *testing.T, content string) *os.File {
	t.Helper()
	f := memfd(t, content)
	// memfd registered f.Close at cleanup; a second Close is harmless (os.ErrClosed).
	return f
}

func TestRestored(t *testing.T) {
	testutil.FDLeakCheck(t)
	names := []string{"control", "lease-1", "lease-2", "lease-1", "other", ""}
	files := make([]*os.File, len(names))
	for i, n := range names {
		files[i] = newFile(t, "#"+n)
	}
	r := systemd.NewRestored(files, names)
	want := []string{"control", "lease-1", "lease-2", "lease-1", "other", "memfd"}
	if diff := cmp.Diff(want, r.Names()); diff != "" {
		t.Fatalf("names (-want +got):\n%s", diff)
	}

	if f := r.Take("missing"); f != nil {
		t.Errorf("Take(missing) = %v", f)
	}
	f := r.Take("lease-1")
	if f != files[1] {
		t.Errorf("Take(lease-1) = %v, want the first lease-1", f)
	}
	f.Close()
	if diff := cmp.Diff([]string{"control", "lease-2", "lease-1", "other", "memfd"}, r.Names()); diff != "" {
		t.Errorf("names after Take (-want +got):\n%s", diff)
	}

	got := r.TakePrefix("lease-")
	if len(got) != 2 || got["lease-1"] != files[3] || got["lease-2"] != files[2] {
		t.Errorf("TakePrefix(lease-) = %v", got)
	}
	for _, f := range got {
		f.Close()
	}
	if got := r.TakePrefix("lease-"); len(got) != 0 {
		t.Errorf("second TakePrefix = %v", got)
	}
	if diff := cmp.Diff([]string{"control", "other", "memfd"}, r.Names()); diff != "" {
		t.Errorf("names after TakePrefix (-want +got):\n%s", diff)
	}

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 4, 5} {
		if _, err := files[i].Stat(); !errors.Is(err, os.ErrClosed) {
			t.Errorf("file %q after Close: Stat = %v, want closed", names[i], err)
		}
	}
	if n := r.Names(); len(n) != 0 {
		t.Errorf("names after Close: %q", n)
	}
	if f := r.Take("control"); f != nil {
		t.Errorf("Take after Close = %v", f)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// Duplicate names: TakePrefix takes the first of each, the rest stay for Close.
func TestRestoredTakePrefixDuplicates(t *testing.T) {
	testutil.FDLeakCheck(t)
	a, b, c := newFile(t, "a"), newFile(t, "b"), newFile(t, "c")
	r := systemd.NewRestored([]*os.File{a, b, nil, c}, []string{"lease-x", "lease-x", "ignored", "keep"})
	got := r.TakePrefix("lease-")
	if len(got) != 1 || got["lease-x"] != a {
		t.Errorf("TakePrefix = %v, want lease-x: the first file", got)
	}
	if diff := cmp.Diff([]string{"lease-x", "keep"}, r.Names()); diff != "" {
		t.Errorf("names (-want +got):\n%s", diff)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("duplicate not closed by Close: %v", err)
	}
}

func TestRestoredTakeListener(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: dir + "/s", Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	lf, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	notSocket := newFile(t, "x")
	r := systemd.NewRestored([]*os.File{lf, notSocket}, []string{"control", "data"})
	defer r.Close()

	if got, err := r.TakeListener("missing"); got != nil || err != nil {
		t.Errorf("TakeListener(missing) = %v, %v; want nil, nil", got, err)
	}
	ln, err := r.TakeListener("control")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := lf.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("listener file not closed: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	conn, err := net.Dial("unix", dir+"/s")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if ln, err := r.TakeListener("data"); err == nil {
		ln.Close()
		t.Error("TakeListener of a memfd succeeded")
	}
	if _, err := notSocket.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("fd not consumed by a failed TakeListener: %v", err)
	}
	if n := r.Names(); len(n) != 0 {
		t.Errorf("names left: %q", n)
	}
}
