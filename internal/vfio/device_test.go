package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestOpenGroupSharing(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)

	d1 := mustOpen(t, r, tr, "0000:00:03.0", "group")
	d2 := mustOpen(t, r, tr, "0000:00:04.0", "auto") // no cdev: auto means group
	d3 := mustOpen(t, r, tr, "0000:00:05.0", "")
	for _, d := range []*Device{d1, d2, d3} {
		if d.Mode() != ModeGroup {
			t.Errorf("%s: mode %s, want group", d.bdf, d.Mode())
		}
	}
	if d1.grp != d2.grp || d1.grp == d3.grp {
		t.Error("devices of group 3 do not share one group, or group 4 shares it")
	}
	if g, _, _ := be.counts(); g[3] != 1 || g[4] != 1 {
		t.Errorf("group opens = %v, want each group opened once", g)
	}
	if d1.Address() != pci.MustParseAddress("0000:00:03.0") || d1.PCI().Vendor != 0x1234 || !d1.Info().PCI() {
		t.Errorf("d1: address %v, pci %+v, info %+v", d1.Address(), d1.PCI(), d1.Info())
	}

	// A second open of an open device is refused: Reopen must be the device's last close.
	_, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Sysfs: tr.Sysfs()})
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second open = %v, want ErrAlreadyExists", err)
	}

	closeOK(t, d1)
	if g, _, _ := r.snapshot(); g[groupKey{"/fakedev", 3}] != 1 {
		t.Errorf("after closing one of two devices: groups %v, want group 3 with 1 ref", g)
	}
	// The device can be opened again after Close, and shares the still-open group.
	d1 = mustOpen(t, r, tr, "0000:00:03.0", "group")
	if g, _, _ := be.counts(); g[3] != 1 {
		t.Errorf("group 3 opened %d times", g[3])
	}
	closeOK(t, d1)
	closeOK(t, d2)
	closeOK(t, d3)
	closeOK(t, d3) // idempotent
	assertEmpty(t, r)
}

func TestOpenCdev(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, true)
	r := newRegistry(be)
	d1 := mustOpen(t, r, tr, "0000:00:03.0", "auto")
	d2 := mustOpen(t, r, tr, "0000:00:05.0", "cdev")
	if d1.Mode() != ModeCdev || d2.Mode() != ModeCdev {
		t.Errorf("modes %s, %s; want cdev", d1.Mode(), d2.Mode())
	}
	if d1.iommu != d2.iommu || d1.grp != nil {
		t.Error("cdev devices do not share one iommufd, or hold a group")
	}
	if g, i, _ := be.counts(); i != 1 || len(g) != 0 {
		t.Errorf("iommufd opened %d times, groups %v; want 1 and none", i, g)
	}
	// Group mode works next to cdev mode as far as the registry goes.
	d3 := mustOpen(t, r, tr, "0000:00:04.0", "group")
	if d3.Mode() != ModeGroup {
		t.Errorf("mode %s, want group", d3.Mode())
	}
	closeOK(t, d1)
	if _, i, _ := r.snapshot(); i["/fakedev"] != 1 {
		t.Errorf("iommus = %v after closing one of two cdev devices", i)
	}
	closeOK(t, d2)
	closeOK(t, d3)
	assertEmpty(t, r)
}

func TestOpenAutoFallsBackToGroup(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, true)
	be.set(func(b *fakeBackend) { b.failIOMMU = fmt.Errorf("open /dev/iommu: %w", fs.ErrNotExist) })
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "auto")
	if d.Mode() != ModeGroup {
		t.Errorf("mode %s, want group when /dev/iommu does not open", d.Mode())
	}
	closeOK(t, d)
	_, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "cdev", Sysfs: tr.Sysfs()})
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("cdev open without /dev/iommu = %v, want the iommufd error", err)
	}
	assertEmpty(t, r)
}

func TestOpenErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	tr.AddDevice(t, otherDevice("0000:00:06.0", "", 5))
	tr.AddDevice(t, otherDevice("0000:00:07.0", "e1000e", 6))
	// A driver with "vfio" in its name that registers no vfio_device (no vfio-dev entry).
	tr.AddDevice(t, otherDevice("0000:00:0a.0", "vfio_shim", 7))
	// vfio-pci refuses devices without an IOMMU group, so fake the binding by hand.
	tr.AddDevice(t, otherDevice("0000:00:08.0", "", -1))
	if err := os.Symlink(filepath.Join(tr.Root, "bus/pci/drivers", pci.VFIODriver),
		filepath.Join(tr.DevicePath(pci.MustParseAddress("0000:00:08.0")), "driver")); err != nil {
		t.Fatal(err)
	}
	r := newRegistry(be)
	tests := []struct {
		bdf, mode string
		class     error
		msg       string
	}{
		{"0000:00:03.0", "bogus", errdefs.ErrInvalidArgument, `vfio 0000:00:03.0: open: mode "bogus": want auto, group or cdev`},
		{"0000:00:09.0", "", errdefs.ErrNotFound, "vfio 0000:00:09.0: open: pci device 0000:00:09.0: not found"},
		{"0000:00:06.0", "", errdefs.ErrFailedPrecondition, "vfio 0000:00:06.0: open: not bound to a driver (bind it to vfio-pci)"},
		{"0000:00:07.0", "", errdefs.ErrFailedPrecondition, "vfio 0000:00:07.0: open: bound to e1000e, not a VFIO driver (vfio-pci or a vfio variant)"},
		{"0000:00:0a.0", "", errdefs.ErrFailedPrecondition, "vfio 0000:00:0a.0: open: bound to vfio_shim, not a VFIO driver (vfio-pci or a vfio variant)"},
		{"0000:00:08.0", "group", errdefs.ErrFailedPrecondition, "vfio 0000:00:08.0: open: no iommu group"},
		{"0000:00:03.0", "cdev", errdefs.ErrNotSupported, "vfio 0000:00:03.0: open: no VFIO cdev for the device"},
	}
	for _, tt := range tests {
		_, err := r.open(pci.MustParseAddress(tt.bdf), OpenOptions{Mode: tt.mode, Sysfs: tr.Sysfs()})
		if !errors.Is(err, tt.class) || err == nil || !strings.HasPrefix(err.Error(), tt.msg) {
			t.Errorf("open %s mode %q = %v\nwant %v starting with %q", tt.bdf, tt.mode, err, tt.class, tt.msg)
		}
	}
	assertEmpty(t, r)

	// Failures after the shared objects were acquired release them.
	be.set(func(b *fakeBackend) { b.failDevice = fmt.Errorf("get device fd: %w", unix.ENODEV) })
	_, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Sysfs: tr.Sysfs()})
	if !errors.Is(err, unix.ENODEV) {
		t.Errorf("open with failing device fd = %v, want ENODEV", err)
	}
	assertEmpty(t, r)
	be.set(func(b *fakeBackend) { b.failDevice, b.failGroup = nil, fmt.Errorf("open /dev/vfio/3: %w", unix.EBUSY) })
	_, err = r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Sysfs: tr.Sysfs()})
	if !errors.Is(err, unix.EBUSY) || !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("open with busy group = %v, want EBUSY / ErrUnavailable", err)
	}
	if !strings.HasPrefix(err.Error(), "vfio 0000:00:03.0: open: iommu group 3: ") {
		t.Errorf("error %q does not name the group", err)
	}
	assertEmpty(t, r)
}

// A device bound to a vfio_pci_core-based variant driver opens like one bound to vfio-pci,
// whatever the variant's name: its vfio-dev entry tells.
func TestOpenVariantDriver(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, true)
	for _, drv := range []string{"mlx5_vfio_pci", "acme_passthru"} {
		tr.AddVFIODriver(t, drv)
		tr.Rebind(t, pci.MustParseAddress("0000:00:05.0"), drv)
		r := newRegistry(be)
		for _, mode := range []string{"group", "cdev"} {
			d := mustOpen(t, r, tr, "0000:00:05.0", mode)
			if d.Mode() != Mode(mode) {
				t.Errorf("%s: mode %s, want %s", drv, d.Mode(), mode)
			}
			closeOK(t, d)
		}
		assertEmpty(t, r)
	}
}

func otherDevice(bdf, driver string, group int) pcitest.DeviceSpec {
	return pcitest.DeviceSpec{Address: pci.MustParseAddress(bdf), Vendor: 0x8086, DeviceID: 0x10d3, Driver: driver, IOMMUGroup: group}
}

func TestReopenKeepsSharedObjects(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)
	old := d.file
	if err := d.Reopen(); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("old device fd still open after Reopen: %v", err)
	}
	if g, _, n := be.counts(); g[3] != 1 || n != 2 {
		t.Errorf("after Reopen: group opens %v, device opens %d; want group once, device twice", g, n)
	}
	if d.Mode() != ModeGroup {
		t.Errorf("mode changed to %s", d.Mode())
	}

	// A failed reopen leaves the device unusable but closable.
	be.set(func(b *fakeBackend) { b.failDevice = unix.ENODEV })
	if err := d.Reopen(); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Reopen = %v, want ENODEV", err)
	}
	var b [2]byte
	err := d.ReadConfig(0, b[:])
	if !errors.Is(err, errdefs.ErrUnavailable) || !errors.Is(err, unix.ENODEV) {
		t.Errorf("ReadConfig after failed Reopen = %v, want ErrUnavailable wrapping ENODEV", err)
	}
	be.set(func(b *fakeBackend) { b.failDevice = nil })
	if err := d.Reopen(); err != nil {
		t.Fatalf("Reopen after the failure cleared: %v", err)
	}
	if err := d.ReadConfig(0, b[:]); err != nil || b != [2]byte{0x34, 0x12} {
		t.Errorf("ReadConfig = % x, %v", b, err)
	}
}

func TestClosedDevice(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	closeOK(t, d)
	assertEmpty(t, r)
	var b [4]byte
	checks := map[string]error{
		"ReadConfig":      d.ReadConfig(0, b[:]),
		"WriteConfig":     d.WriteConfig(0, b[:]),
		"SetMemoryEnable": d.SetMemoryEnable(true),
		"Reset":           d.Reset(),
		"ProbeFeature":    d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF, 0),
		"DMABufSupported": d.DMABufSupported(),
		"Reopen":          d.Reopen(),
		"SetBusMaster":    d.SetBusMaster(true),
		"ReadBAR":         d.ReadBAR(0, 0, b[:]),
		"WriteBAR":        d.WriteBAR(0, 0, b[:]),
		"SetIRQEventfd":   d.SetIRQEventfd(VFIO_PCI_REQ_IRQ_INDEX, os.Stdin),
		"ClearIRQ":        d.ClearIRQ(VFIO_PCI_REQ_IRQ_INDEX),
		"DMABufRevoke":    d.DMABufRevokeSupported(),
		"RevokeDMABuf":    d.RevokeDMABuf(os.Stdin),
	}
	_, checks["Region"] = d.Region(0)
	_, checks["ExportDMABuf"] = d.ExportDMABuf(0, []DMARange{{0, 4096}}, unix.O_RDWR)
	for name, err := range checks {
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("%s after Close = %v, want os.ErrClosed", name, err)
		}
	}
}

func TestConfigSpace(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)

	var id [4]byte
	if err := d.ReadConfig(PCI_VENDOR_ID, id[:]); err != nil {
		t.Fatal(err)
	}
	if id != [4]byte{0x34, 0x12, 0xe8, 0x11} {
		t.Errorf("vendor/device = % x", id)
	}
	cmd := func() uint16 {
		t.Helper()
		var b [2]byte
		if err := d.ReadConfig(PCI_COMMAND, b[:]); err != nil {
			t.Fatal(err)
		}
		return uint16(b[0]) | uint16(b[1])<<8
	}
	if err := d.SetMemoryEnable(false); err != nil {
		t.Fatal(err)
	}
	if got := cmd(); got != 0x0105 {
		t.Errorf("COMMAND after SetMemoryEnable(false) = %#04x, want 0x0105 (other bits kept)", got)
	}
	if on, err := d.MemoryEnabled(); err != nil || on {
		t.Errorf("MemoryEnabled = %v, %v; want false", on, err)
	}
	if err := d.SetMemoryEnable(true); err != nil {
		t.Fatal(err)
	}
	if got := cmd(); got != 0x0107 {
		t.Errorf("COMMAND after SetMemoryEnable(true) = %#04x, want 0x0107", got)
	}
	if on, err := d.MemoryEnabled(); err != nil || !on {
		t.Errorf("MemoryEnabled = %v, %v; want true", on, err)
	}
	if err := d.WriteConfig(0x40, []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	if err := d.ReadConfig(0x40, id[:]); err != nil || id != [4]byte{1, 2, 3, 4} {
		t.Errorf("read back % x, %v", id, err)
	}
	for _, c := range []struct {
		off int64
		n   int
	}{{-1, 1}, {255, 2}, {256, 1}, {0, 257}} {
		err := d.ReadConfig(c.off, make([]byte, c.n))
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ReadConfig(%d, %d bytes) = %v, want ErrInvalidArgument", c.off, c.n, err)
		}
		if err := d.WriteConfig(c.off, make([]byte, c.n)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("WriteConfig(%d, %d bytes) = %v, want ErrInvalidArgument", c.off, c.n, err)
		}
	}
}

// On a regular file every VFIO ioctl fails with ENOTTY: this checks how each operation
// wraps a kernel error.
func TestKernelErrorsWrapped(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)

	err := d.Reset()
	if want := "vfio 0000:00:03.0: reset: ioctl VFIO_DEVICE_RESET: inappropriate ioctl for device"; err == nil || err.Error() != want {
		t.Errorf("Reset = %v, want %q", err, want)
	}
	if !errors.Is(err, unix.ENOTTY) || !errors.Is(err, errdefs.ErrNotSupported) {
		t.Errorf("Reset error lost its errno or class: %v", err)
	}
	if _, err := d.Region(0); !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "get-region-info: region 0: ioctl VFIO_DEVICE_GET_REGION_INFO") {
		t.Errorf("Region(0) = %v", err)
	}
	if _, err := d.Region(9); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Region(9) of 9 = %v, want ErrInvalidArgument", err)
	}
	if _, err := d.IRQ(4); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("IRQ(4) = %v", err)
	}
	if _, err := d.IRQ(5); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("IRQ(5) of 5 = %v", err)
	}
	if err := d.ProbeFeature(1<<16, 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ProbeFeature(1<<16) = %v", err)
	}
	if err := d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE, VFIO_DEVICE_FEATURE_SET); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("ProbeFeature(13) = %v", err)
	}

	// ENOTTY from the dma-buf probe is a FeatureError, remembered.
	err = d.DMABufSupported()
	var fe *FeatureError
	if !errors.As(err, &fe) || !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) || fe.MinKernel != "6.19" {
		t.Fatalf("DMABufSupported = %#v", err)
	}
	if !strings.Contains(err.Error(), "kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA)") {
		t.Errorf("DMABufSupported message %q", err)
	}
	if again := d.DMABufSupported(); again != err {
		t.Errorf("second DMABufSupported = %v, not the remembered %v", again, err)
	}

	// A valid export reaches the kernel and reports the FeatureError.
	_, err = d.ExportDMABuf(0, []DMARange{{0, 4096}}, unix.O_RDWR)
	if !errors.As(err, &fe) {
		t.Errorf("ExportDMABuf on a kernel without the feature = %v, want the FeatureError", err)
	}
}

func TestExportValidation(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)
	page := uint64(os.Getpagesize())
	tests := []struct {
		bar    int
		ranges []DMARange
		want   string
	}{
		{6, []DMARange{{0, page}}, "vfio 0000:00:03.0: export-dma-buf: bar 6: only bars 0 to 5 can be exported: invalid argument"},
		{1, []DMARange{{0, page}}, "vfio 0000:00:03.0: export-dma-buf: bar 1 is an I/O-port bar; only memory bars can be exported: invalid argument"},
		{3, []DMARange{{0, page}}, "vfio 0000:00:03.0: export-dma-buf: bar 3 is not implemented (size 0): invalid argument"},
		{0, []DMARange{{0, page}, {1 << 20, page}}, fmt.Sprintf("vfio 0000:00:03.0: export-dma-buf: bar 0 range 1 [0x100000,+%#x): ends beyond the bar (size 0x100000): invalid argument", page)},
	}
	for _, tt := range tests {
		f, err := d.ExportDMABuf(tt.bar, tt.ranges, unix.O_RDWR)
		if f != nil {
			f.Close()
		}
		if err == nil || err.Error() != tt.want || !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ExportDMABuf(%d, %v) = %v\nwant %q", tt.bar, tt.ranges, err, tt.want)
		}
		var ve *Error
		if !errors.As(err, &ve) || ve.Op != "export-dma-buf" {
			t.Errorf("not an *Error with Op export-dma-buf: %#v", err)
		}
	}
}

// Reopen waits for calls in flight and no call sees a closed fd.
func TestConcurrentReopen(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	d := mustOpen(t, r, tr, "0000:00:03.0", "group")
	defer closeOK(t, d)
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for range 4 {
		wg.Go(func() {
			for range 50 {
				var b [2]byte
				if err := d.ReadConfig(0, b[:]); err != nil {
					errs <- err
				}
				if err := d.SetMemoryEnable(true); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if err := d.Reopen(); err != nil {
				errs <- err
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
