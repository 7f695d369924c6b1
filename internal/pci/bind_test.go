package pci_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
)

const nicDir = "bus/pci/devices/0000:01:00.0/"

func nicTree(t *testing.T) *pcitest.Tree {
	t.Helper()
	tr := pcitest.New(t)
	tr.AddDevice(t, pcitest.DeviceSpec{
		Address: nic, Vendor: 0x8086, DeviceID: 0x10d3, Class: 0x020000,
		Driver: "e1000e", DefaultDriver: "e1000e", IOMMUGroup: 7,
	})
	return tr
}

func driverOf(t *testing.T, s pci.Sysfs, a pci.Address) pci.Device {
	t.Helper()
	d, err := s.Device(a)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestBindRestore(t *testing.T) {
	tr := nicTree(t)
	s := tr.Sysfs()

	prev, err := s.BindVFIO(nic)
	if err != nil {
		t.Fatal(err)
	}
	if prev != "e1000e" {
		t.Errorf("BindVFIO returned previous driver %q, want e1000e", prev)
	}
	want := []pcitest.Write{
		{Path: nicDir + "driver_override", Data: "vfio-pci"},
		{Path: nicDir + "driver/unbind", Data: "0000:01:00.0"},
		{Path: "bus/pci/drivers_probe", Data: "0000:01:00.0"},
	}
	if d := cmp.Diff(want, tr.Writes()); d != "" {
		t.Errorf("BindVFIO writes (-want +got):\n%s", d)
	}
	if d := driverOf(t, s, nic); d.Driver != "vfio-pci" || d.DriverOverride != "vfio-pci" || d.VFIODev == "" {
		t.Errorf("after BindVFIO: driver %q override %q vfio-dev %q", d.Driver, d.DriverOverride, d.VFIODev)
	}

	tr.ResetWrites()
	if err := s.RestoreDriver(nic, prev); err != nil {
		t.Fatal(err)
	}
	want = []pcitest.Write{
		{Path: nicDir + "driver/unbind", Data: "0000:01:00.0"},
		{Path: nicDir + "driver_override", Data: "\n"},
		{Path: "bus/pci/drivers/e1000e/bind", Data: "0000:01:00.0"},
	}
	if d := cmp.Diff(want, tr.Writes()); d != "" {
		t.Errorf("RestoreDriver writes (-want +got):\n%s", d)
	}
	if d := driverOf(t, s, nic); d.Driver != "e1000e" || d.DriverOverride != "" || d.VFIODev != "" {
		t.Errorf("after RestoreDriver: driver %q override %q vfio-dev %q", d.Driver, d.DriverOverride, d.VFIODev)
	}
}

func TestBindAlreadyVFIO(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddDevice(t, eduSpec())
	s := tr.Sysfs()
	prev, err := s.BindVFIO(edu)
	if err != nil || prev != "vfio-pci" {
		t.Fatalf("BindVFIO = %q, %v; want vfio-pci, nil", prev, err)
	}
	if err := s.RestoreDriver(edu, prev); err != nil {
		t.Fatal(err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Fatalf("bind and restore of a device already on vfio-pci wrote %v", w)
	}
	if d := driverOf(t, s, edu); d.Driver != "vfio-pci" {
		t.Fatalf("driver is %q", d.Driver)
	}
}

// A device on a vfio variant driver is already where a VFIO open needs it: BindVFIO leaves
// it there (no vfio-pci downgrade) and RestoreDriver has nothing to undo.
func TestBindAlreadyVariant(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddVFIODriver(t, "mlx5_vfio_pci")
	spec := eduSpec()
	spec.Driver = "mlx5_vfio_pci"
	tr.AddDevice(t, spec)
	s := tr.Sysfs()
	prev, err := s.BindVFIO(edu)
	if err != nil || prev != pci.VFIODriver {
		t.Fatalf("BindVFIO = %q, %v; want vfio-pci (nothing changed), nil", prev, err)
	}
	if err := s.RestoreDriver(edu, prev); err != nil {
		t.Fatal(err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Fatalf("bind and restore of a device on a vfio variant driver wrote %v", w)
	}
	if d := driverOf(t, s, edu); d.Driver != "mlx5_vfio_pci" {
		t.Fatalf("driver is %q, want mlx5_vfio_pci", d.Driver)
	}
}

func TestBindUnbound(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddDevice(t, pcitest.DeviceSpec{Address: nic, IOMMUGroup: 7})
	s := tr.Sysfs()
	prev, err := s.BindVFIO(nic)
	if err != nil || prev != "" {
		t.Fatalf("BindVFIO = %q, %v; want \"\", nil", prev, err)
	}
	want := []pcitest.Write{
		{Path: nicDir + "driver_override", Data: "vfio-pci"},
		{Path: "bus/pci/drivers_probe", Data: "0000:01:00.0"},
	}
	if d := cmp.Diff(want, tr.Writes()); d != "" {
		t.Errorf("BindVFIO writes (-want +got):\n%s", d)
	}
	tr.ResetWrites()
	if err := s.RestoreDriver(nic, prev); err != nil {
		t.Fatal(err)
	}
	want = []pcitest.Write{
		{Path: nicDir + "driver/unbind", Data: "0000:01:00.0"},
		{Path: nicDir + "driver_override", Data: "\n"},
	}
	if d := cmp.Diff(want, tr.Writes()); d != "" {
		t.Errorf("RestoreDriver writes (-want +got):\n%s", d)
	}
	if d := driverOf(t, s, nic); d.Driver != "" {
		t.Fatalf("restored to unbound but driver is %q", d.Driver)
	}
}

func TestBindVFIONotLoaded(t *testing.T) {
	tr := nicTree(t)
	tr.RemoveDriver(t, "vfio-pci")
	_, err := tr.Sysfs().BindVFIO(nic)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "modprobe vfio-pci") {
		t.Fatalf("BindVFIO without vfio-pci: %v", err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Fatalf("BindVFIO without vfio-pci wrote %v", w)
	}
}

func TestBindMissingDevice(t *testing.T) {
	tr := pcitest.New(t)
	if _, err := tr.Sysfs().BindVFIO(nic); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("BindVFIO of a missing device: %v", err)
	}
}

// vfio-pci refuses a device without an IOMMU group; drivers_probe still succeeds, so only
// the final check notices. BindVFIO must roll back to the old driver.
func TestBindProbeFailsRollsBack(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddDevice(t, pcitest.DeviceSpec{Address: nic, Driver: "e1000e", DefaultDriver: "e1000e", IOMMUGroup: -1})
	s := tr.Sysfs()
	_, err := s.BindVFIO(nic)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), nic.String()) {
		t.Fatalf("BindVFIO = %v; want ErrFailedPrecondition naming the device", err)
	}
	d := driverOf(t, s, nic)
	if d.Driver != "e1000e" || d.DriverOverride != "" {
		t.Fatalf("after the failed bind: driver %q override %q; want e1000e and none", d.Driver, d.DriverOverride)
	}
}

func TestBindUnbindFails(t *testing.T) {
	tr := nicTree(t)
	tr.FailWrite(nicDir+"driver/unbind", unix.EBUSY)
	s := tr.Sysfs()
	_, err := s.BindVFIO(nic)
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("BindVFIO = %v; want EBUSY", err)
	}
	for _, part := range []string{nic.String(), "driver/unbind"} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q does not name %q", err, part)
		}
	}
	d := driverOf(t, s, nic)
	if d.Driver != "e1000e" || d.DriverOverride != "" {
		t.Fatalf("after the failed bind: driver %q override %q; want e1000e and none", d.Driver, d.DriverOverride)
	}
}

func TestRestoreDriverMovedByOthers(t *testing.T) {
	tr := nicTree(t)
	tr.AddDriver(t, "igb")
	s := tr.Sysfs()
	if _, err := s.BindVFIO(nic); err != nil {
		t.Fatal(err)
	}
	// Someone else moves the device to igb.
	if err := s.RestoreDriver(nic, "vfio-pci"); err != nil {
		t.Fatal(err)
	}
	if err := tr.WriteAttr(tr.Root+"/"+nicDir+"driver/unbind", []byte(nic.String())); err != nil {
		t.Fatal(err)
	}
	if err := tr.WriteAttr(tr.Root+"/"+nicDir+"driver_override", []byte("igb")); err != nil {
		t.Fatal(err)
	}
	if err := tr.WriteAttr(tr.Root+"/bus/pci/drivers_probe", []byte(nic.String())); err != nil {
		t.Fatal(err)
	}
	tr.ResetWrites()
	if err := s.RestoreDriver(nic, "e1000e"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("RestoreDriver after someone else moved the device: %v", err)
	}
	if w := tr.Writes(); len(w) != 0 {
		t.Fatalf("RestoreDriver wrote %v", w)
	}
}

func TestRestoreDriverUnloadedFallsBackToProbe(t *testing.T) {
	tr := nicTree(t)
	s := tr.Sysfs()
	prev, err := s.BindVFIO(nic)
	if err != nil {
		t.Fatal(err)
	}
	tr.RemoveDriver(t, "e1000e")
	tr.ResetWrites()
	err = s.RestoreDriver(nic, prev)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("RestoreDriver to an unloaded driver: %v", err)
	}
	if w := tr.Writes(); len(w) == 0 || w[len(w)-1].Path != "bus/pci/drivers_probe" {
		t.Fatalf("RestoreDriver writes %v; want drivers_probe last", w)
	}
}

func TestRestoreDriverBindFails(t *testing.T) {
	tr := nicTree(t)
	s := tr.Sysfs()
	prev, err := s.BindVFIO(nic)
	if err != nil {
		t.Fatal(err)
	}
	tr.FailWrite("bus/pci/drivers/e1000e/bind", unix.ENODEV)
	err = s.RestoreDriver(nic, prev)
	if !errors.Is(err, unix.ENODEV) || !strings.Contains(err.Error(), "drivers/e1000e/bind") {
		t.Fatalf("RestoreDriver with a failing bind = %v; want ENODEV naming the bind file", err)
	}
}
