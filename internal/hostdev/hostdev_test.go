package hostdev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

var (
	_ broker.Device        = (*Device)(nil)
	_ broker.Notifier      = (*Device)(nil)
	_ broker.Suspender     = (*Device)(nil)
	_ broker.BufferRevoker = (*Device)(nil)
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeVFIO records the calls Device makes; export returns a pipe end (not a dma-buf) or an
// error.
type fakeVFIO struct {
	mu    sync.Mutex
	calls []string // guarded by mu

	// Set by the test between calls.
	memErr    error // SetMemoryEnable(false) fails with it
	reopenErr error
	exportErr error
	exported  []*os.File
	closed    bool

	irqErr    map[uint32]error    // SetIRQEventfd(index) fails with it
	irqs      map[uint32]*os.File // guarded by mu: the eventfd registered per index (borrowed)
	revokeErr error               // DMABufRevokeSupported's answer
	revoked   []uint64            // guarded by mu: inodes passed to RevokeDMABuf
}

func (f *fakeVFIO) SetIRQEventfd(index uint32, ev *os.File) error {
	f.record(fmt.Sprintf("set-irq-%d", index))
	if err := f.irqErr[index]; err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.irqs == nil {
		f.irqs = make(map[uint32]*os.File)
	}
	f.irqs[index] = ev
	return nil
}

// signal plays the kernel: it signals the eventfd registered for index n times.
func (f *fakeVFIO) signal(t *testing.T, index uint32, n uint64) {
	t.Helper()
	f.mu.Lock()
	ev := f.irqs[index]
	f.mu.Unlock()
	if ev == nil {
		t.Fatalf("no eventfd registered for irq index %d", index)
	}
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], n)
	if _, err := ev.Write(b[:]); err != nil {
		t.Fatalf("signal irq %d: %v", index, err)
	}
}

func (f *fakeVFIO) DMABufRevokeSupported() error { return f.revokeErr }

func (f *fakeVFIO) RevokeDMABuf(buf *os.File) error {
	f.record("revoke-buffer")
	fi, err := buf.Stat()
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revoked = append(f.revoked, fi.Sys().(*syscall.Stat_t).Ino)
	return nil
}

func (f *fakeVFIO) record(c string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
}

func (f *fakeVFIO) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeVFIO) Mode() vfio.Mode        { return vfio.ModeGroup }
func (f *fakeVFIO) DMABufSupported() error { return nil }

func (f *fakeVFIO) ExportDMABuf(bar int, ranges []vfio.DMARange, openFlags int) (*os.File, error) {
	f.record("export")
	if openFlags != unix.O_RDWR {
		return nil, errors.New("unexpected open flags")
	}
	if f.exportErr != nil {
		return nil, f.exportErr
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	w.Close()
	f.exported = append(f.exported, r)
	return r, nil
}

func (f *fakeVFIO) SetMemoryEnable(on bool) error {
	if on {
		f.record("memory-on")
		return nil
	}
	f.record("memory-off")
	return f.memErr
}

func (f *fakeVFIO) Reopen() error  { f.record("reopen"); return f.reopenErr }
func (f *fakeVFIO) Close() error   { f.record("close"); f.closed = true; return nil }
func (f *fakeVFIO) Detach() error  { f.record("detach"); f.closed = true; return nil }
func (f *fakeVFIO) Restored() bool { return false }

var edu = pci.MustParseAddress("0000:00:03.0")

func tree(t *testing.T, driver string) *pcitest.Tree {
	tr := pcitest.New(t)
	if driver != "" && driver != pci.VFIODriver {
		tr.AddDriver(t, driver)
	}
	tr.AddDevice(t, pcitest.DeviceSpec{
		Address: edu, Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00,
		Driver: driver, DefaultDriver: driver, IOMMUGroup: 3,
		BARs: []pci.BAR{
			{Index: 0, Start: 0xfe000000, Size: 1 << 20, Flags: pci.IORESOURCE_MEM},
			{Index: 1, Start: 0xc000, Size: 0x100, Flags: pci.IORESOURCE_IO},
			{Index: 2, Start: 0x800000000, Size: 1 << 30, Flags: pci.IORESOURCE_MEM | pci.IORESOURCE_PREFETCH | pci.IORESOURCE_MEM_64},
		},
	})
	return tr
}

func openFake(t *testing.T, tr *pcitest.Tree, opt Options, fv *fakeVFIO, openErr error) (*Device, error) {
	t.Helper()
	opt.Sysfs = tr.Sysfs()
	return open(edu, opt, func(a pci.Address, o vfio.OpenOptions) (vfioDevice, pci.Device, error) {
		if o.Mode != opt.Mode || o.DevRoot != opt.DevRoot || o.Sysfs.Root != tr.Root {
			t.Errorf("vfio options %+v do not carry Options %+v", o, opt)
		}
		if openErr != nil {
			return nil, pci.Device{}, openErr
		}
		p, err := o.Sysfs.Device(a)
		return fv, p, err
	})
}

func TestOpenEnablesMemoryAndInfo(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, pci.VFIODriver)
	fv := &fakeVFIO{}
	d, err := openFake(t, tr, Options{Mode: "group"}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"memory-on", "set-irq-4", "set-irq-3"}, fv.Calls()); diff != "" {
		t.Errorf("calls at open (-want +got):\n%s", diff)
	}
	// TSM state changes after open show up in Info.
	tsm := filepath.Join(tr.DevicePath(edu), "tsm")
	if err := os.MkdirAll(tsm, 0o755); err != nil {
		t.Fatal(err)
	}
	for f, v := range map[string]string{"connect": "tsm0\n", "bound": "\n"} {
		if err := os.WriteFile(filepath.Join(tsm, f), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := broker.DeviceInfo{
		BDF: "0000:00:03.0", Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00,
		Driver: pci.VFIODriver, IOMMUGroup: 3, Mode: "group",
		BARs: []broker.BAR{
			{Index: 0, Size: 1 << 20, Mem: true},
			{Index: 1, Size: 0x100},
			{Index: 2, Size: 1 << 30, Mem: true, Prefetch: true, Is64: true},
		},
		TSM: broker.TSMState{Present: true, Connect: "tsm0"},
	}
	if diff := cmp.Diff(want, d.Info()); diff != "" {
		t.Errorf("Info (-want +got):\n%s", diff)
	}
	// A device gone from sysfs reports its last snapshot.
	tr.RemoveDevice(t, edu)
	if got := d.Info(); got.Vendor != 0x1234 || got.TSM.Connect != "tsm0" {
		t.Errorf("Info after removal = %+v, want the last snapshot", got)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if got := fv.Calls(); slices.Index(got, "close") != len(got)-1 || !fv.closed {
		t.Errorf("calls %v: want one close, last", got)
	}
	if info := d.Info(); !errors.Is(info.DMABuf, errdefs.ErrUnavailable) {
		t.Errorf("Info().DMABuf after Close = %v", info.DMABuf)
	}
	if _, err := d.Export(0, []broker.Range{{Offset: 0, Length: 4096}}, ""); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Export after Close = %v", err)
	}
	if err := d.Revoke(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Revoke after Close = %v", err)
	}
}

func TestRevokeOrder(t *testing.T) {
	tr := tree(t, pci.VFIODriver)
	fv := &fakeVFIO{}
	d, err := openFake(t, tr, Options{}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Revoke(); err != nil {
		t.Fatal(err)
	}
	// The reopen drops the kernel notifiers with the old fd: they are registered again.
	want := []string{"memory-on", "set-irq-4", "set-irq-3", "memory-off", "reopen", "set-irq-4", "set-irq-3", "memory-on"}
	if diff := cmp.Diff(want, fv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}

	// A failing memory-off does not stop the reopen, which makes the revoke permanent.
	fv.memErr = unix.EIO
	err = d.Revoke()
	if !errors.Is(err, unix.EIO) {
		t.Errorf("Revoke = %v, want EIO", err)
	}
	want = append(want, "memory-off", "reopen", "set-irq-4", "set-irq-3", "memory-on")
	if diff := cmp.Diff(want, fv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
	// A failed reopen is reported; memory stays off.
	fv.memErr, fv.reopenErr = nil, unix.ENODEV
	if err := d.Revoke(); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Revoke = %v, want ENODEV", err)
	}
	want = append(want, "memory-off", "reopen")
	if diff := cmp.Diff(want, fv.Calls()); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
}

func TestExportErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, pci.VFIODriver)
	fv := &fakeVFIO{exportErr: &vfio.Error{Op: "export-dma-buf", BDF: "0000:00:03.0", Err: errdefs.ErrInvalidArgument}}
	d, err := openFake(t, tr, Options{}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Export(0, []broker.Range{{Offset: 0, Length: 4096}}, "x"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Export = %v, want the vfio error", err)
	}
	// Something that is not a dma-buf is refused and closed (FDLeakCheck).
	fv.exportErr = nil
	_, err = d.Export(0, []broker.Range{{Offset: 0, Length: 4096}}, "x")
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Export of a non-dma-buf = %v, want ErrInvalidArgument", err)
	}
	if len(fv.exported) != 1 {
		t.Fatalf("%d exports", len(fv.exported))
	}
	if _, err := fv.exported[0].Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("the refused file was not closed: %v", err)
	}
}

func TestManagedBind(t *testing.T) {
	tr := tree(t, "e1000e")
	fv := &fakeVFIO{}
	d, err := openFake(t, tr, Options{ManagedBind: true}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != pci.VFIODriver {
		t.Fatalf("driver after managed open = %q", p.Driver)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != "e1000e" || p.DriverOverride != "" {
		t.Errorf("after Close: driver %q override %q, want e1000e and none", p.Driver, p.DriverOverride)
	}

	// A failed VFIO open puts the driver back too.
	_, err = openFake(t, tr, Options{ManagedBind: true}, fv, unix.EBUSY)
	if !errors.Is(err, unix.EBUSY) {
		t.Errorf("open = %v, want EBUSY", err)
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != "e1000e" {
		t.Errorf("after failed open: driver %q, want e1000e", p.Driver)
	}
}

func TestManagedBindAlreadyVFIO(t *testing.T) {
	tr := tree(t, pci.VFIODriver)
	d, err := openFake(t, tr, Options{ManagedBind: true}, &fakeVFIO{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr.ResetWrites()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Errorf("Close of a device that was on vfio-pci already wrote %v", w)
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != pci.VFIODriver {
		t.Errorf("driver %q", p.Driver)
	}
}

func TestUnmanagedRefusesOtherDriver(t *testing.T) {
	tr := tree(t, "e1000e")
	_, err := Open(edu, Options{Sysfs: tr.Sysfs()})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Open of a device on e1000e = %v, want ErrFailedPrecondition", err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Errorf("unmanaged Open wrote %v", w)
	}
}
