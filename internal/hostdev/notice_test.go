package hostdev

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
	"golang.org/x/sys/unix"
)

// recv waits for the next notice; the deadline only bounds a broken test.
func recv(t *testing.T, d *Device) Notice {
	t.Helper()
	select {
	case n, ok := <-d.Notices():
		if !ok {
			t.Fatal("Notices channel closed")
		}
		return n
	case <-time.After(10 * time.Second):
		t.Fatal("no notice within 10 s")
	}
	return Notice{}
}

func TestNotices(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, pci.VFIODriver)
	fv := &fakeVFIO{}
	d, err := openFake(t, tr, Options{}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []NoticeKind{NoticeRelease, NoticeError} {
		if err := d.Notifier(k); err != nil {
			t.Errorf("Notifier(%s) = %v, want registered", k, err)
		}
	}
	start := time.Now()
	fv.signal(t, vfio.VFIO_PCI_REQ_IRQ_INDEX, 1)
	n := recv(t, d)
	if n.Kind != NoticeRelease || n.Count != 1 || n.Time.Before(start) {
		t.Errorf("notice %+v, want release count 1", n)
	}
	fv.signal(t, vfio.VFIO_PCI_ERR_IRQ_INDEX, 3)
	if n := recv(t, d); n.Kind != NoticeError || n.Count != 3 {
		t.Errorf("notice %+v, want error count 3", n)
	}

	// After a revoke (the fd is reopened) the same eventfds are registered again.
	if err := d.Revoke(); err != nil {
		t.Fatal(err)
	}
	fv.signal(t, vfio.VFIO_PCI_REQ_IRQ_INDEX, 2)
	if n := recv(t, d); n.Kind != NoticeRelease || n.Count != 2 {
		t.Errorf("notice after Revoke %+v, want release count 2", n)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-d.Notices(); ok {
		t.Error("Notices channel open after Close")
	}
	if err := d.Notifier(NoticeRelease); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Notifier after Close = %v, want os.ErrClosed", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestNoticesDropWhenFull(t *testing.T) {
	d := &Device{bdf: "0000:00:03.0", log: slog.New(slog.DiscardHandler), notices: make(chan Notice, 1)}
	first := Notice{Kind: NoticeRelease, Count: 1}
	d.deliver(first)
	d.deliver(Notice{Kind: NoticeError, Count: 1}) // must not block
	d.deliver(Notice{Kind: NoticeRelease, Count: 2})
	if got := d.DroppedNotices(); got != 2 {
		t.Errorf("DroppedNotices = %d, want 2", got)
	}
	if got := <-d.notices; got != first {
		t.Errorf("queued notice %+v, want the first %+v", got, first)
	}
}

func TestNotifierMissing(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, pci.VFIODriver)
	noERR := &vfio.FeatureError{BDF: edu.String(), Feature: "AER error notifier", Reason: "conventional PCI"}
	fv := &fakeVFIO{irqErr: map[uint32]error{vfio.VFIO_PCI_ERR_IRQ_INDEX: noERR}}
	d, err := openFake(t, tr, Options{NoticeBuffer: 4}, fv, nil)
	if err != nil {
		t.Fatalf("Open of a device without an AER notifier: %v", err)
	}
	if cap(d.Notices()) != 4 {
		t.Errorf("notice buffer %d, want 4", cap(d.Notices()))
	}
	if err := d.Notifier(NoticeError); !errors.Is(err, errdefs.ErrNotSupported) {
		t.Errorf("Notifier(error) = %v, want ErrNotSupported", err)
	}
	if err := d.Notifier(NoticeRelease); err != nil {
		t.Errorf("Notifier(release) = %v", err)
	}
	if err := d.Notifier(NoticeKind(9)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Notifier(9) = %v", err)
	}
	// Only the REQ notifier is registered again after a revoke.
	if err := d.Revoke(); err != nil {
		t.Fatal(err)
	}
	want := []string{"memory-on", "set-irq-4", "set-irq-3", "memory-off", "reopen", "set-irq-4", "memory-on"}
	if diff := cmp.Diff(want, fv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
	// A failed re-registration does not fail the revoke but shows in Notifier.
	fv.irqErr[vfio.VFIO_PCI_REQ_IRQ_INDEX] = unix.EIO
	if err := d.Revoke(); err != nil {
		t.Errorf("Revoke with a failing re-registration = %v, want nil (the buffers are revoked)", err)
	}
	if err := d.Notifier(NoticeRelease); !errors.Is(err, unix.EIO) {
		t.Errorf("Notifier(release) after a failed re-registration = %v, want EIO", err)
	}
	// A failed reopen leaves no notifier.
	fv.irqErr[vfio.VFIO_PCI_REQ_IRQ_INDEX] = nil
	fv.reopenErr = unix.ENODEV
	if err := d.Revoke(); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Revoke = %v, want ENODEV", err)
	}
	if err := d.Notifier(NoticeRelease); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Notifier(release) after a failed reopen = %v, want ENODEV", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestNotifierFailureFailsOpen(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, "e1000e")
	fv := &fakeVFIO{irqErr: map[uint32]error{vfio.VFIO_PCI_REQ_IRQ_INDEX: unix.EIO}}
	_, err := openFake(t, tr, Options{ManagedBind: true}, fv, nil)
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("Open = %v, want EIO", err)
	}
	if !fv.closed {
		t.Error("the vfio device was not closed")
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != "e1000e" {
		t.Errorf("after the failed open: driver %q, want e1000e restored", p.Driver)
	}
	if _, err := openFake(t, tr, Options{NoticeBuffer: -1}, &fakeVFIO{}, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("NoticeBuffer -1 = %v, want ErrInvalidArgument", err)
	}
}

// fakeBuffer is a broker.Buffer over a pipe end.
type fakeBuffer struct {
	f *os.File
}

func (b *fakeBuffer) Inode() uint64 {
	fi, err := b.f.Stat()
	if err != nil {
		return 0
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}
func (b *fakeBuffer) Size() uint64 { return 0 }
func (b *fakeBuffer) Dup() (*os.File, error) {
	if b.f == nil {
		return nil, fmt.Errorf("dup: %w", os.ErrClosed)
	}
	rc, err := b.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	return os.NewFile(uintptr(nfd), "dup"), nil
}
func (b *fakeBuffer) Close() error { return nil }

var _ broker.Buffer = (*fakeBuffer)(nil)

func TestRevokeBuffers(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, pci.VFIODriver)
	notSupported := &vfio.FeatureError{BDF: edu.String(), Feature: "per-buffer dma-buf revoke", Reason: "kernel lacks it", Err: unix.ENOTTY}
	fv := &fakeVFIO{revokeErr: notSupported}
	d, err := openFake(t, tr, Options{}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	a, b := &fakeBuffer{f: r}, &fakeBuffer{f: w}

	if err := d.RevokeBuffers(a, b); !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) {
		t.Errorf("RevokeBuffers without kernel support = %v, want ErrNotSupported", err)
	}
	for _, c := range fv.Calls() {
		if c == "revoke-buffer" {
			t.Fatal("RevokeBuffers issued a revoke although the kernel lacks it")
		}
	}

	fv.revokeErr = nil
	closed := &fakeBuffer{}
	err = d.RevokeBuffers(a, closed, b)
	if !errors.Is(err, os.ErrClosed) {
		t.Errorf("RevokeBuffers with a closed buffer = %v, want os.ErrClosed", err)
	}
	fv.mu.Lock()
	got := fv.revoked
	fv.mu.Unlock()
	if diff := cmp.Diff([]uint64{a.Inode(), b.Inode()}, got); diff != "" {
		t.Errorf("revoked inodes (-want +got):\n%s", diff)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.RevokeBuffers(a); !errors.Is(err, os.ErrClosed) {
		t.Errorf("RevokeBuffers after Close = %v", err)
	}
}
