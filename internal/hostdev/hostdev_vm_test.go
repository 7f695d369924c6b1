//go:build vmtest

package hostdev

import (
	"errors"
	"log/slog"
	"os"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// Runs as root inside the test/vm guest against the edu devices bound to vfio-pci.

const mib = 1 << 20

func vmDevice(t *testing.T, env string) pci.Address {
	t.Helper()
	testutil.SkipUnlessRoot(t)
	s := os.Getenv(env)
	if s == "" {
		t.Skipf("%s is not set: run inside the VM rig (make test-vm)", env)
	}
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

func TestVMHostdevExportRevoke(t *testing.T) {
	edu := vmDevice(t, "MMIOBROKER_VM_EDU1")
	iommu := os.Getenv("MMIOBROKER_VM_KERNEL") == "iommufd"
	testutil.FDLeakCheck(t)
	d, err := Open(edu, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
	}()
	info := d.Info()
	if info.BDF != edu.String() || info.Vendor != 0x1234 || info.Driver != pci.VFIODriver || info.DMABuf != nil {
		t.Errorf("Info = %+v", info)
	}
	if len(info.BARs) != 1 || info.BARs[0] != (broker.BAR{Index: 0, Size: mib, Mem: true}) {
		t.Errorf("BARs = %+v, want BAR0 1 MiB memory", info.BARs)
	}
	if want := map[bool]string{true: "cdev", false: "group"}[iommu]; info.Mode != want {
		t.Errorf("Mode = %q, want %q", info.Mode, want)
	}

	buf, err := d.Export(0, []broker.Range{{Offset: 0, Length: mib}}, "mmb-vmtest")
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	if buf.Size() != mib || buf.Inode() == 0 {
		t.Errorf("buffer size %d inode %d", buf.Size(), buf.Inode())
	}
	fi, err := buf.(*dmabuf.Buffer).Info()
	if err != nil {
		t.Fatal(err)
	}
	if fi.Name != "mmb-vmtest" || fi.ExpName != "vfio_pci_core" || fi.Inode != buf.Inode() {
		t.Errorf("fdinfo %+v", fi)
	}
	dup, err := buf.Dup()
	if err != nil {
		t.Fatal(err)
	}
	dup.Close()
	if _, err := d.Export(0, []broker.Range{{Offset: 0, Length: 2 * mib}}, ""); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Export beyond the BAR = %v, want ErrInvalidArgument", err)
	}

	var io *iommufd.FD
	var ioas uint32
	mapBuf := func(b broker.Buffer) error {
		_, err := io.MapFile(ioas, b.(*dmabuf.Buffer).File(), 0, b.Size(), 0, iommufd.MapReadable|iommufd.MapWriteable)
		return err
	}
	if iommu {
		if io, err = iommufd.Open(""); err != nil {
			t.Fatal(err)
		}
		defer io.Close()
		if ioas, err = io.AllocIOAS(); err != nil {
			t.Fatal(err)
		}
		if err := mapBuf(buf); err != nil {
			t.Fatalf("MAP_FILE before Revoke: %v", err)
		}
	}
	if err := d.Revoke(); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	fresh, err := d.Export(0, []broker.Range{{Offset: 0, Length: mib}}, "mmb-vmtest-2")
	if err != nil {
		t.Fatalf("Export after Revoke: %v", err)
	}
	defer fresh.Close()
	if fresh.Inode() == buf.Inode() {
		t.Error("the new export has the old inode")
	}
	if !iommu {
		t.Skip("no importer on the stock kernel (no CONFIG_IOMMUFD); Revoke and re-export checked")
	}
	if err := mapBuf(buf); !errors.Is(err, unix.ENODEV) {
		t.Errorf("MAP_FILE of a revoked buffer = %v, want ENODEV", err)
	}
	if err := mapBuf(fresh); err != nil {
		t.Errorf("MAP_FILE of a buffer exported after Revoke: %v", err)
	}
}

func TestVMHostdevManagedBind(t *testing.T) {
	a := vmDevice(t, "MMIOBROKER_VM_EDU2")
	testutil.FDLeakCheck(t)
	s := pci.Sysfs{}
	// Start from an unbound device, as an operator's machine would have it (edu has no
	// host driver), and put it back on vfio-pci for the other tests afterwards.
	if err := s.RestoreDriver(a, ""); err != nil {
		t.Fatalf("unbind from vfio-pci: %v", err)
	}
	defer func() {
		if _, err := s.BindVFIO(a); err != nil {
			t.Errorf("rebinding to vfio-pci: %v", err)
		}
	}()
	if p, err := s.Device(a); err != nil || p.Driver != "" {
		t.Fatalf("device %+v, %v: want unbound", p, err)
	}
	if _, err := Open(a, Options{}); err == nil {
		t.Fatal("unmanaged Open of an unbound device succeeded")
	}
	d, err := Open(a, Options{ManagedBind: true, Log: testLog(t)})
	if err != nil {
		t.Fatalf("managed Open: %v", err)
	}
	if got := d.Info().Driver; got != pci.VFIODriver {
		t.Errorf("driver while open = %q", got)
	}
	buf, err := d.Export(0, []broker.Range{{Offset: 0, Length: mib}}, "")
	if err != nil {
		t.Fatalf("Export: %v", err)
	}
	buf.Close()
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if p, err := s.Device(a); err != nil || p.Driver != "" || p.DriverOverride != "" {
		t.Errorf("after Close: driver %q override %q (%v), want unbound", p.Driver, p.DriverOverride, err)
	}
}
