package ioctl

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func pipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

func TestIoctlStruct(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, w := pipe(t)
	if _, err := w.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	var n int32
	if _, err := Ioctl(r, "FIONREAD", unix.TIOCINQ, &n); err != nil {
		t.Fatalf("FIONREAD: %v", err)
	}
	if n != 5 {
		t.Errorf("FIONREAD = %d, want 5", n)
	}
}

func TestBytes(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, w := pipe(t)
	if _, err := w.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := Bytes(r, "FIONREAD", unix.TIOCINQ, buf); err != nil {
		t.Fatalf("FIONREAD: %v", err)
	}
	if got := int32(buf[0]) | int32(buf[1])<<8 | int32(buf[2])<<16 | int32(buf[3])<<24; got != 3 {
		t.Errorf("FIONREAD = %d, want 3", got)
	}
	_, err := Bytes(r, "FIONREAD", unix.TIOCINQ, nil)
	if !errors.Is(err, unix.EINVAL) {
		t.Errorf("Bytes(nil) = %v, want EINVAL", err)
	}
}

func TestErrnoKept(t *testing.T) {
	testutil.FDLeakCheck(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = Value(f, "VFIO_GET_API_VERSION", IO(';', 100), 0)
	if !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("ioctl on /dev/null = %v, want ENOTTY", err)
	}
	var se *os.SyscallError
	if !errors.As(err, &se) || se.Syscall != "ioctl VFIO_GET_API_VERSION" {
		t.Errorf("error %#v is not an *os.SyscallError naming the request", err)
	}
	if !strings.Contains(err.Error(), "ioctl VFIO_GET_API_VERSION") {
		t.Errorf("error %q does not name the request", err)
	}
	var arg [8]byte
	if _, err := Ioctl(f, "X", IO(';', 101), &arg); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Ioctl on /dev/null = %v, want ENOTTY", err)
	}
}

func TestClosedFile(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, w := pipe(t)
	r.Close()
	w.Close()
	var n int32
	if _, err := Ioctl(r, "FIONREAD", unix.TIOCINQ, &n); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Ioctl on closed file = %v, want os.ErrClosed", err)
	}
	if err := WithFD(r, func(int) error { return nil }); !errors.Is(err, os.ErrClosed) {
		t.Errorf("WithFD on closed file = %v, want os.ErrClosed", err)
	}
}

func TestWithFD(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, _ := pipe(t)
	fi, err := r.Stat()
	if err != nil {
		t.Fatal(err)
	}
	want := fi.Sys().(*syscall.Stat_t)
	var got unix.Stat_t
	if err := WithFD(r, func(fd int) error { return unix.Fstat(fd, &got) }); err != nil {
		t.Fatal(err)
	}
	if got.Ino != want.Ino || got.Dev != want.Dev {
		t.Errorf("WithFD saw inode %d/%d, want %d/%d", got.Dev, got.Ino, want.Dev, want.Ino)
	}
	sentinel := errors.New("boom")
	if err := WithFD(r, func(int) error { return sentinel }); err != sentinel {
		t.Errorf("WithFD error = %v, want fn's error", err)
	}
}
