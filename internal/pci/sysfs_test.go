package pci_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
)

var (
	edu     = pci.MustParseAddress("0000:00:03.0")
	ivshmem = pci.MustParseAddress("0000:00:04.0")
	nic     = pci.MustParseAddress("0000:01:00.0")
)

func eduSpec() pcitest.DeviceSpec {
	return pcitest.DeviceSpec{
		Address: edu, Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00,
		Driver: "vfio-pci", IOMMUGroup: 3, Cdev: true,
		BARs: []pci.BAR{{Index: 0, Start: 0xfea00000, Size: 1 << 20, Flags: 0x40200}},
	}
}

func TestDevice(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddDevice(t, eduSpec())
	tr.AddDevice(t, pcitest.DeviceSpec{
		Address: ivshmem, Vendor: 0x1af4, DeviceID: 0x1110, Class: 0x050000,
		IOMMUGroup: -1,
		BARs: []pci.BAR{
			{Index: 0, Start: 0xfe800000, Size: 0x100, Flags: 0x40200},
			{Index: 2, Start: 0xfe0000000, Size: 64 << 20, Flags: 0x14220c},
		},
		TSM: &pci.TSMState{Connect: "tsm0"},
	})

	got, err := tr.Sysfs().Device(edu)
	if err != nil {
		t.Fatal(err)
	}
	want := pci.Device{
		Address: edu, Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00,
		Driver: "vfio-pci", IOMMUGroup: 3, VFIODev: "vfio0", CdevNode: "/dev/vfio/devices/vfio0",
		BARs: [6]pci.BAR{
			{Index: 0, Start: 0xfea00000, Size: 1 << 20, Flags: 0x40200, Mem: true},
			{Index: 1}, {Index: 2}, {Index: 3}, {Index: 4}, {Index: 5},
		},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Device(%v) (-want +got):\n%s", edu, d)
	}

	got, err = tr.Sysfs().Device(ivshmem)
	if err != nil {
		t.Fatal(err)
	}
	want = pci.Device{
		Address: ivshmem, Vendor: 0x1af4, DeviceID: 0x1110, Class: 0x050000,
		IOMMUGroup: -1,
		BARs: [6]pci.BAR{
			{Index: 0, Start: 0xfe800000, Size: 0x100, Flags: 0x40200, Mem: true},
			{Index: 1},
			{Index: 2, Start: 0xfe0000000, Size: 64 << 20, Flags: 0x14220c, Mem: true, Prefetch: true, Is64: true},
			{Index: 3}, {Index: 4}, {Index: 5},
		},
		TSM: pci.TSMState{Present: true, Connect: "tsm0"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Device(%v) (-want +got):\n%s", ivshmem, d)
	}
}

func TestDeviceVFIOWithoutCdev(t *testing.T) {
	tr := pcitest.New(t)
	spec := eduSpec()
	spec.Cdev = false
	tr.AddDevice(t, spec)
	got, err := tr.Sysfs().Device(edu)
	if err != nil {
		t.Fatal(err)
	}
	if got.VFIODev != "vfio0" || got.CdevNode != "" {
		t.Fatalf("VFIODev, CdevNode = %q, %q; want vfio0 and none", got.VFIODev, got.CdevNode)
	}
}

func TestDeviceNotFound(t *testing.T) {
	tr := pcitest.New(t)
	_, err := tr.Sysfs().Device(edu)
	for _, target := range []error{errdefs.ErrNotFound, fs.ErrNotExist, unix.ENOENT} {
		if !errors.Is(err, target) {
			t.Errorf("Device of a missing device: %v; want it to wrap %v", err, target)
		}
	}
	if err == nil || !strings.Contains(err.Error(), edu.String()) {
		t.Errorf("error %v does not name the device", err)
	}
}

func TestDeviceBadFiles(t *testing.T) {
	for _, tc := range []struct{ file, content, wantInErr string }{
		{"vendor", "1234\n", "vendor"},
		{"device", "0x123456\n", "device"},
		{"class", "bogus", "class"},
		{"resource", "0x2 0x1 0x200\n", "resource"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			tr := pcitest.New(t)
			tr.AddDevice(t, eduSpec())
			if err := os.WriteFile(filepath.Join(tr.DevicePath(edu), tc.file), []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := tr.Sysfs().Device(edu)
			if err == nil || !strings.Contains(err.Error(), tc.wantInErr) || !strings.Contains(err.Error(), edu.String()) {
				t.Fatalf("Device with a bad %s file: %v", tc.file, err)
			}
		})
	}
}

func TestDeviceTSMBound(t *testing.T) {
	tr := pcitest.New(t)
	spec := eduSpec()
	spec.TSM = &pci.TSMState{Connect: "tsm0", Bound: "tsm0"}
	tr.AddDevice(t, spec)
	got, err := tr.Sysfs().Device(edu)
	if err != nil {
		t.Fatal(err)
	}
	if want := (pci.TSMState{Present: true, Connect: "tsm0", Bound: "tsm0"}); got.TSM != want {
		t.Fatalf("TSM = %+v, want %+v", got.TSM, want)
	}
}

func TestListAndGroups(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddDevice(t, pcitest.DeviceSpec{Address: nic, IOMMUGroup: 3, Driver: "e1000e"})
	tr.AddDevice(t, eduSpec()) // group 3 too
	tr.AddDevice(t, pcitest.DeviceSpec{Address: ivshmem, IOMMUGroup: -1})
	s := tr.Sysfs()

	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]pci.Address{edu, ivshmem, nic}, all); d != "" {
		t.Errorf("List (-want +got):\n%s", d)
	}
	members, err := s.GroupMembers(edu)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]pci.Address{edu, nic}, members); d != "" {
		t.Errorf("GroupMembers (-want +got):\n%s", d)
	}
	group, err := s.Group(3)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(members, group); d != "" {
		t.Errorf("Group(3) differs from GroupMembers (-members +group):\n%s", d)
	}
	if _, err := s.GroupMembers(ivshmem); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("GroupMembers of a device without a group: %v, want ErrFailedPrecondition", err)
	}
	if _, err := s.GroupMembers(pci.MustParseAddress("0000:09:00.0")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("GroupMembers of a missing device: %v, want ErrNotFound", err)
	}
	if _, err := s.Group(42); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Group(42): %v, want ErrNotFound", err)
	}
}

func TestTSMProviders(t *testing.T) {
	tr := pcitest.New(t)
	s := tr.Sysfs()
	got, err := s.TSMProviders()
	if err != nil || len(got) != 0 {
		t.Fatalf("TSMProviders without class/tsm = %v, %v", got, err)
	}
	for _, n := range []string{"tsm1", "tsm0"} {
		if err := os.MkdirAll(filepath.Join(tr.Root, "class", "tsm", n), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	got, err = s.TSMProviders()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"tsm0", "tsm1"}, got); d != "" {
		t.Fatalf("TSMProviders (-want +got):\n%s", d)
	}
}

// TestRealSysfs reads every PCI device of the machine running the tests (read-only).
func TestRealSysfs(t *testing.T) {
	var s pci.Sysfs
	addrs, err := s.List()
	if errors.Is(err, fs.ErrNotExist) || len(addrs) == 0 {
		t.Skip("no /sys/bus/pci/devices here")
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		d, err := s.Device(a)
		if err != nil {
			t.Errorf("Device(%v): %v", a, err)
			continue
		}
		if d.Vendor == 0 || d.Vendor == 0xffff {
			t.Errorf("Device(%v): vendor %#x", a, d.Vendor)
		}
		t.Logf("%v %04x:%04x class %06x driver %q group %d", a, d.Vendor, d.DeviceID, d.Class, d.Driver, d.IOMMUGroup)
	}
}

func TestVFIOBound(t *testing.T) {
	tr := pcitest.New(t)
	tr.AddVFIODriver(t, "mlx5_vfio_pci")
	tr.AddVFIODriver(t, "acme_passthru") // a variant whose name says nothing
	for i, drv := range []string{"vfio-pci", "mlx5_vfio_pci", "acme_passthru", "e1000e", "vfio_shim", ""} {
		spec := eduSpec()
		spec.Address = pci.Address{Bus: 2, Device: uint8(i)}
		spec.Driver = drv
		spec.Cdev = i%2 == 0
		tr.AddDevice(t, spec)
		d, err := tr.Sysfs().Device(spec.Address)
		if err != nil {
			t.Fatal(err)
		}
		want := i < 3
		if got := d.VFIOBound(); got != want || (d.VFIODev != "") != want {
			t.Errorf("device on %q: VFIOBound %v, VFIODev %q; want %v", drv, got, d.VFIODev, want)
		}
	}

	// Without a vfio-dev entry (a kernel before 6.1, a Device from a uevent) the name decides.
	for _, tt := range []struct {
		d    pci.Device
		want bool
	}{
		{pci.Device{Driver: "vfio-pci"}, true},
		{pci.Device{Driver: "mlx5_vfio_pci"}, true},
		{pci.Device{Driver: "nvgrace-gpu-vfio-pci"}, true},
		{pci.Device{Driver: "acme_passthru"}, false},
		{pci.Device{Driver: "vfio_shim"}, false},
		{pci.Device{Driver: "vfio-platform"}, false},
		{pci.Device{Driver: "e1000e"}, false},
		{pci.Device{}, false},
		// Unbinding: the kernel drops the driver link before the driver's remove deletes
		// vfio-dev (and remove waits for the VFIO fds to close).
		{pci.Device{VFIODev: "vfio3"}, false},
		{pci.Device{Driver: "acme_passthru", VFIODev: "vfio3"}, true},
	} {
		if got := tt.d.VFIOBound(); got != tt.want {
			t.Errorf("Device{Driver: %q, VFIODev: %q}.VFIOBound() = %v, want %v", tt.d.Driver, tt.d.VFIODev, got, tt.want)
		}
	}
}
