package vfio

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

func eventfd(t *testing.T) *os.File {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// On the fake backend the device fd is a regular file: every ioctl fails with ENOTTY.
func TestIRQNotifiersOnFake(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)
	ev := eventfd(t)

	err := d.SetIRQEventfd(VFIO_PCI_REQ_IRQ_INDEX, ev)
	want := "vfio 0000:00:03.0: set-irqs: irq index 4 (req): ioctl VFIO_DEVICE_GET_IRQ_INFO: inappropriate ioctl for device"
	if err == nil || err.Error() != want {
		t.Errorf("SetIRQEventfd(REQ) = %v, want %q", err, want)
	}
	if !errors.Is(err, unix.ENOTTY) {
		t.Errorf("errno lost: %v", err)
	}
	if err := d.SetIRQEventfd(VFIO_PCI_NUM_IRQS, ev); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("SetIRQEventfd(5) of 5 = %v, want ErrInvalidArgument", err)
	}
	if err := d.SetIRQEventfd(VFIO_PCI_REQ_IRQ_INDEX, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("SetIRQEventfd(nil) = %v, want ErrInvalidArgument", err)
	}
	err = d.ClearIRQ(VFIO_PCI_ERR_IRQ_INDEX)
	if !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "set-irqs: irq index 3 (err): clear: ioctl VFIO_DEVICE_SET_IRQS") {
		t.Errorf("ClearIRQ(ERR) = %v", err)
	}
	if err := d.ClearIRQ(7); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ClearIRQ(7) = %v, want ErrInvalidArgument", err)
	}
}

func TestDMABufRevokeProbeOnFake(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)

	err := d.DMABufRevokeSupported()
	var fe *FeatureError
	if !errors.As(err, &fe) || !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("DMABufRevokeSupported = %#v, want a FeatureError with ENOTTY", err)
	}
	if !strings.Contains(err.Error(), "per-buffer dma-buf revoke not supported: kernel lacks VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE") {
		t.Errorf("message %q", err)
	}
	if again := d.DMABufRevokeSupported(); again != err {
		t.Errorf("second probe = %v, not the remembered %v", again, err)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := d.RevokeDMABuf(f); !errors.As(err, &fe) {
		t.Errorf("RevokeDMABuf without kernel support = %v, want the FeatureError", err)
	}
	if err := d.RevokeDMABuf(nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("RevokeDMABuf(nil) = %v", err)
	}
}

func TestRevokeFeatureError(t *testing.T) {
	for _, tt := range []struct {
		errno   unix.Errno
		feature bool
		reason  string
	}{
		{unix.ENOTTY, true, "kernel lacks"},
		{unix.EOPNOTSUPP, true, "driver vfio-pci does not support it"},
		{unix.EINVAL, true, "does not accept SET"},
		{unix.EIO, false, ""},
	} {
		err := revokeFeatureError("0000:00:03.0", "vfio-pci", os.NewSyscallError("ioctl VFIO_DEVICE_FEATURE", tt.errno))
		var fe *FeatureError
		if got := errors.As(err, &fe); got != tt.feature {
			t.Errorf("%v: FeatureError = %v, want %v", tt.errno, got, tt.feature)
			continue
		}
		if !errors.Is(err, tt.errno) {
			t.Errorf("%v: errno lost in %v", tt.errno, err)
		}
		if tt.feature && (!strings.Contains(fe.Reason, tt.reason) || !errors.Is(err, errdefs.ErrNotSupported)) {
			t.Errorf("%v: %v, want reason containing %q and ErrNotSupported", tt.errno, err, tt.reason)
		}
	}
}

func TestBARIOAndBusMaster(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)

	// The fake's BAR0 region starts at offset 0 of the device file.
	if err := d.WriteBAR(0, 0x80, []byte{1, 2, 3, 4, 5, 6, 7, 8}); err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	if err := d.ReadBAR(0, 0x80, b[:]); err != nil || b != [8]byte{1, 2, 3, 4, 5, 6, 7, 8} {
		t.Errorf("ReadBAR = % x, %v", b, err)
	}
	for _, c := range []struct {
		bar int
		off int64
		n   int
	}{{0, -1, 1}, {0, 1<<20 - 4, 8}, {0, 1 << 20, 1}, {3, 0, 1}, {6, 0, 1}, {-1, 0, 1}} {
		if err := d.ReadBAR(c.bar, c.off, make([]byte, c.n)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ReadBAR(%d, %#x, %d) = %v, want ErrInvalidArgument", c.bar, c.off, c.n, err)
		}
		if err := d.WriteBAR(c.bar, c.off, make([]byte, c.n)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("WriteBAR(%d, %#x, %d) = %v, want ErrInvalidArgument", c.bar, c.off, c.n, err)
		}
	}

	cmd := func() uint16 {
		t.Helper()
		var b [2]byte
		if err := d.ReadConfig(PCI_COMMAND, b[:]); err != nil {
			t.Fatal(err)
		}
		return uint16(b[0]) | uint16(b[1])<<8
	}
	if err := d.SetBusMaster(false); err != nil {
		t.Fatal(err)
	}
	if got := cmd(); got != 0x0103 {
		t.Errorf("COMMAND after SetBusMaster(false) = %#04x, want 0x0103", got)
	}
	if err := d.SetBusMaster(true); err != nil {
		t.Fatal(err)
	}
	if got := cmd(); got != 0x0107 {
		t.Errorf("COMMAND after SetBusMaster(true) = %#04x, want 0x0107", got)
	}
}

func TestOpenCallerIOMMUFD(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, true)
	r := newRegistry(be)
	io, err := iommufd.Open(be.dir)
	if err != nil {
		t.Fatal(err)
	}
	defer io.Close()
	open := func(mode string, tr2 *pcitest.Tree) (*Device, error) {
		return r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: mode, Sysfs: tr2.Sysfs(), DevRoot: "/fakedev", IOMMUFD: io, IOAS: 7})
	}
	for _, mode := range []string{"", "auto", "cdev"} {
		d, err := open(mode, tr)
		if err != nil {
			t.Fatalf("open %q: %v", mode, err)
		}
		if d.Mode() != ModeCdev {
			t.Errorf("mode %q: opened as %s, want cdev", mode, d.Mode())
		}
		if fd, ioas, ok := d.IOMMU(); fd != io || ioas != 7 || !ok {
			t.Errorf("IOMMU() = %p, %d, %v; want the caller's %p, 7", fd, ioas, ok, io)
		}
		if _, i, _ := be.counts(); i != 0 {
			t.Errorf("the registry opened its own iommufd %d times", i)
		}
		if _, i, _ := r.snapshot(); len(i) != 0 {
			t.Errorf("the caller's iommufd is in the registry: %v", i)
		}
		closeOK(t, d)
		// The caller's iommufd is still open.
		if _, err := io.File().Stat(); err != nil {
			t.Fatalf("caller's iommufd after device Close: %v", err)
		}
	}
	assertEmpty(t, r)
	if _, err := open("group", tr); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("group mode with a caller's iommufd = %v, want ErrInvalidArgument", err)
	}
	if _, err := open("", fakeTree(t, false)); !errors.Is(err, errdefs.ErrNotSupported) {
		t.Errorf("a caller's iommufd without a cdev = %v, want ErrNotSupported", err)
	}
	assertEmpty(t, r)

	// A group-mode device reports no iommufd.
	d := mustOpen(t, r, fakeTree(t, false), "0000:00:03.0", "group")
	defer closeOK(t, d)
	if _, _, ok := d.IOMMU(); ok {
		t.Error("group-mode device reports an iommufd")
	}
}
