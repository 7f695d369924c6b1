package dmabuf

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestNewRejectsRegularFile(t *testing.T) {
	testutil.FDLeakCheck(t)
	f, err := os.Create(filepath.Join(t.TempDir(), "not-a-dmabuf"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(f)
	if err == nil {
		b.Close()
		t.Fatal("New accepted a regular file")
	}
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not a dma-buf") {
		t.Fatalf("New(regular file) = %v; want ErrInvalidArgument saying not a dma-buf", err)
	}
	if err := f.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("New did not close the rejected file: Close() = %v", err)
	}
}

func TestNewRejectsPipe(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := New(r); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not a dma-buf") {
		t.Fatalf("New(pipe) = %v; want ErrInvalidArgument", err)
	}
}

func TestNewNil(t *testing.T) {
	if _, err := New(nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("New(nil) = %v", err)
	}
}

func TestNewClosedFile(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := New(f); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("New(closed file) = %v; want os.ErrClosed", err)
	}
}

// fakeBuffer wraps a regular file in a Buffer, bypassing New's check, to test the
// descriptor handling that does not depend on the kernel object being a dma-buf.
func fakeBuffer(t *testing.T) *Buffer {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "fake"))
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(f.Name(), &st); err != nil {
		t.Fatal(err)
	}
	return &Buffer{ino: st.Ino, size: 4096, f: f}
}

func TestCloseIdempotent(t *testing.T) {
	testutil.FDLeakCheck(t)
	b := fakeBuffer(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- b.Close() })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	if b.File() != nil {
		t.Error("File() after Close is not nil")
	}
	if _, err := b.Dup(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Dup after Close = %v; want os.ErrClosed", err)
	}
	if _, err := b.Info(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Info after Close = %v; want os.ErrClosed", err)
	}
	if err := b.SetName("x"); !errors.Is(err, os.ErrClosed) {
		t.Errorf("SetName after Close = %v; want os.ErrClosed", err)
	}
	if f := b.Disown(); f != nil {
		t.Errorf("Disown after Close = %v", f)
	}
}

func TestDup(t *testing.T) {
	testutil.FDLeakCheck(t)
	b := fakeBuffer(t)
	defer b.Close()
	d, err := b.Dup()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(d.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Ino != b.Inode() {
		t.Fatalf("dup has inode %d, want %d", st.Ino, b.Inode())
	}
	flags, err := unix.FcntlInt(d.Fd(), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.FD_CLOEXEC == 0 {
		t.Fatal("dup is not close-on-exec")
	}
	// The dup outlives the Buffer.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(int(d.Fd()), &st); err != nil {
		t.Fatalf("dup after Close of the buffer: %v", err)
	}
}

func TestDisown(t *testing.T) {
	testutil.FDLeakCheck(t)
	b := fakeBuffer(t)
	f := b.Disown()
	if f == nil {
		t.Fatal("Disown returned nil")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Stat(); err != nil {
		t.Fatalf("disowned file was closed: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestSetNameValidatesBeforeSyscall(t *testing.T) {
	b := fakeBuffer(t)
	defer b.Close()
	for _, name := range []string{strings.Repeat("n", MaxNameLen+1), "a\nino:\t1", "a\x00b"} {
		err := b.SetName(name)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("SetName(%q) = %v; want ErrInvalidArgument", name, err)
		}
		if errors.Is(err, unix.ENOTTY) {
			t.Errorf("SetName(%q) reached the kernel", name)
		}
	}
	// A valid name reaches the kernel; a regular file answers ENOTTY, and the errno is kept.
	err := b.SetName(strings.Repeat("n", MaxNameLen))
	if !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "DMA_BUF_SET_NAME") {
		t.Fatalf("SetName on a regular file = %v; want ENOTTY from DMA_BUF_SET_NAME_B", err)
	}
}

func TestInfoOfNonDmabuf(t *testing.T) {
	b := fakeBuffer(t)
	defer b.Close()
	// The generic fdinfo lines parse, but without exp_name it is no dma-buf.
	if _, err := b.Info(); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not a dma-buf") {
		t.Fatalf("Info of a regular file = %v", err)
	}
}

func TestLookupErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = Lookup(os.Getpid(), int(f.Fd()))
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "/dev/null") {
		t.Errorf("Lookup of /dev/null = %v; want ErrInvalidArgument naming /dev/null", err)
	}
	_, err = Lookup(os.Getpid(), 1<<20)
	if !errors.Is(err, errdefs.ErrNotFound) || !errors.Is(err, unix.ENOENT) {
		t.Errorf("Lookup of a closed fd = %v; want ErrNotFound and ENOENT", err)
	}
	for _, pf := range [][2]int{{0, 0}, {-1, 0}, {1, -1}} {
		if _, err := Lookup(pf[0], pf[1]); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Lookup(%d, %d) = %v; want ErrInvalidArgument", pf[0], pf[1], err)
		}
	}
}
