//go:build vmtest

package pci_test

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func vmDevice(t *testing.T, env string) pci.Address {
	t.Helper()
	s := os.Getenv(env)
	if s == "" {
		t.Skipf("%s is not set: run inside the VM rig (make test-vm)", env)
	}
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatalf("%s: %v", env, err)
	}
	return a
}

// TestPCIDevices reads the rig's devices, which the guest init bound to vfio-pci.
func TestPCIDevices(t *testing.T) {
	var s pci.Sysfs
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		env            string
		vendor, device uint16
		bar            int
		barSize        uint64
	}{
		{"MMIOBROKER_VM_EDU1", 0x1234, 0x11e8, 0, 1 << 20},
		{"MMIOBROKER_VM_EDU2", 0x1234, 0x11e8, 0, 1 << 20},
		{"MMIOBROKER_VM_IVSHMEM", 0x1af4, 0x1110, 2, 1 << 20},
		{"MMIOBROKER_VM_TESTDEV", 0x1b36, 0x0005, 2, 1 << 20},
	} {
		t.Run(tc.env, func(t *testing.T) {
			a := vmDevice(t, tc.env)
			if !slices.Contains(all, a) {
				t.Errorf("List() lacks %v", a)
			}
			d, err := s.Device(a)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%v %04x:%04x class %06x driver %s group %d vfio-dev %s cdev %q tsm %+v",
				a, d.Vendor, d.DeviceID, d.Class, d.Driver, d.IOMMUGroup, d.VFIODev, d.CdevNode, d.TSM)
			for _, b := range d.BARs {
				if b.Size > 0 {
					t.Logf("  bar %d start %#x size %#x flags %#x mem %v io %v prefetch %v 64 %v",
						b.Index, b.Start, b.Size, b.Flags, b.Mem, b.IO, b.Prefetch, b.Is64)
				}
			}
			if d.Vendor != tc.vendor || d.DeviceID != tc.device {
				t.Errorf("id %04x:%04x, want %04x:%04x", d.Vendor, d.DeviceID, tc.vendor, tc.device)
			}
			if d.Driver != pci.VFIODriver || d.IOMMUGroup < 0 || d.VFIODev == "" {
				t.Errorf("driver %q group %d vfio-dev %q; want vfio-pci with a group and a vfio-dev", d.Driver, d.IOMMUGroup, d.VFIODev)
			}
			wantCdev := os.Getenv("MMIOBROKER_VM_KERNEL") == "iommufd"
			if (d.CdevNode != "") != wantCdev {
				t.Errorf("CdevNode %q on kernel %q", d.CdevNode, os.Getenv("MMIOBROKER_VM_KERNEL"))
			}
			if d.CdevNode != "" {
				if _, err := os.Stat(d.CdevNode); err != nil {
					t.Errorf("cdev node: %v", err)
				}
			}
			if _, err := os.Stat(filepath.Join("/dev/vfio", strconv.Itoa(d.IOMMUGroup))); err != nil {
				t.Errorf("group node: %v", err)
			}
			bar := d.BARs[tc.bar]
			if !bar.Mem || bar.Size != tc.barSize || bar.Start == 0 {
				t.Errorf("BAR %d = %+v; want a memory BAR of %#x bytes", tc.bar, bar, tc.barSize)
			}
			members, err := s.GroupMembers(a)
			if err != nil || !slices.Contains(members, a) {
				t.Errorf("GroupMembers = %v, %v; want it to contain %v", members, err, a)
			}
			group, err := s.Group(d.IOMMUGroup)
			if err != nil || !slices.Equal(group, members) {
				t.Errorf("Group(%d) = %v, %v; want %v", d.IOMMUGroup, group, err, members)
			}
			if d.TSM.Bound != "" {
				t.Errorf("TSM bound %q on 7.2, where nothing binds a TDI", d.TSM.Bound)
			}
		})
	}
}

// TestPCIBindRestore takes the test device off vfio-pci, binds it again with BindVFIO and
// runs RestoreDriver, checking the driver at each step. The device ends bound to vfio-pci
// with driver_override "vfio-pci", as the guest init left it.
func TestPCIBindRestore(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	a := vmDevice(t, "MMIOBROKER_VM_TESTDEV")
	var s pci.Sysfs
	dev := func() pci.Device {
		t.Helper()
		d, err := s.Device(a)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	write := func(path, val string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(val), 0); err != nil {
			t.Fatal(err)
		}
	}
	if d := dev(); d.Driver != pci.VFIODriver {
		t.Fatalf("test device %v is bound to %q, want vfio-pci (guest init)", a, d.Driver)
	}
	t.Cleanup(func() {
		if _, err := s.BindVFIO(a); err != nil {
			t.Errorf("cleanup: rebinding %v to vfio-pci: %v", a, err)
		}
	})

	// Already on vfio-pci: BindVFIO reports it and changes nothing.
	prev, err := s.BindVFIO(a)
	if err != nil || prev != pci.VFIODriver {
		t.Fatalf("BindVFIO of a device on vfio-pci = %q, %v", prev, err)
	}

	// Take the device off vfio-pci and clear the override, leaving it unbound (pci-testdev
	// has no host driver).
	write(filepath.Join(s.DriverPath(pci.VFIODriver), "unbind"), a.String())
	write(filepath.Join(s.DevicePath(a), "driver_override"), "\n")
	if d := dev(); d.Driver != "" || d.DriverOverride != "" || d.VFIODev != "" {
		t.Fatalf("after manual unbind: driver %q override %q vfio-dev %q", d.Driver, d.DriverOverride, d.VFIODev)
	}

	prev, err = s.BindVFIO(a)
	if err != nil {
		t.Fatal(err)
	}
	if prev != "" {
		t.Errorf("BindVFIO returned previous driver %q, want none", prev)
	}
	if d := dev(); d.Driver != pci.VFIODriver || d.DriverOverride != pci.VFIODriver || d.VFIODev == "" {
		t.Fatalf("after BindVFIO: driver %q override %q vfio-dev %q", d.Driver, d.DriverOverride, d.VFIODev)
	}

	if err := s.RestoreDriver(a, prev); err != nil {
		t.Fatal(err)
	}
	if d := dev(); d.Driver != "" || d.DriverOverride != "" {
		t.Fatalf("after RestoreDriver(%q): driver %q override %q", prev, d.Driver, d.DriverOverride)
	}
	// RestoreDriver again is harmless.
	if err := s.RestoreDriver(a, prev); err != nil {
		t.Fatalf("second RestoreDriver: %v", err)
	}

	// The cleanup's BindVFIO puts it back; check that here so a failure names this test.
	if prev, err := s.BindVFIO(a); err != nil || prev != "" {
		t.Fatalf("final BindVFIO = %q, %v", prev, err)
	}
	if d := dev(); d.Driver != pci.VFIODriver {
		t.Fatalf("final driver %q", d.Driver)
	}
}
