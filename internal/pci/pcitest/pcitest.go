// Package pcitest builds fake sysfs trees for tests of code that uses [pci.Sysfs], and
// emulates how the kernel reacts to driver binding writes (driver_override, bind, unbind,
// drivers_probe), recording every write.
//
// The tree mirrors the real layout: device directories live under
// <root>/devices/pciDDDD:BB/<bdf> and <root>/bus/pci/devices/<bdf> links to them; drivers
// are directories under <root>/bus/pci/drivers; IOMMU groups under
// <root>/kernel/iommu_groups/<n>/devices link back to their devices.
package pcitest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// Tree is a fake sysfs tree rooted in a test's temporary directory. Its methods are safe
// for concurrent use.
type Tree struct {
	// Root is the directory to use as [pci.Sysfs] Root.
	Root string

	mu      sync.Mutex
	devices map[pci.Address]*DeviceSpec // guarded by mu
	writes  []Write                     // guarded by mu
	fail    map[string]error            // guarded by mu; relative path -> error
	nextVF  int                         // guarded by mu
	vfio    map[string]bool             // guarded by mu; drivers built on vfio_pci_core
}

// Write is one attribute write the code under test made.
type Write struct {
	Path string // relative to Root, e.g. "bus/pci/devices/0000:00:03.0/driver_override"
	Data string
}

// DeviceSpec describes a fake device.
type DeviceSpec struct {
	Address          pci.Address
	Vendor, DeviceID uint16
	Class            uint32
	// Driver is the bound driver, "" for none. A missing driver directory is created as a
	// plain (non-VFIO) driver; add a VFIO variant with [Tree.AddVFIODriver] first.
	Driver string
	// DefaultDriver is the driver drivers_probe binds the device to when no driver_override
	// is set (what the kernel would match by ID); "" for none.
	DefaultDriver string
	IOMMUGroup    int  // -1 for none; VFIO drivers refuse to bind a device without a group
	Cdev          bool // vfio-dev/vfioN gets a "dev" attribute while bound to a VFIO driver
	// BARs lists the implemented BARs (Index, Start, Size, Flags used); the resource file
	// gets 13 lines as the kernel writes for an endpoint.
	BARs []pci.BAR
	// Resource, if non-empty, is written as the resource file verbatim instead of BARs.
	Resource string
	TSM      *pci.TSMState // nil: no tsm directory
}

// New returns an empty tree with bus/pci/drivers_probe and the vfio-pci driver directory
// (a VFIO driver, see [Tree.AddVFIODriver]).
func New(t testing.TB) *Tree {
	t.Helper()
	tr := &Tree{
		Root:    t.TempDir(),
		devices: make(map[pci.Address]*DeviceSpec),
		fail:    make(map[string]error),
		vfio:    make(map[string]bool),
	}
	for _, d := range []string{"bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "devices"} {
		must(t, os.MkdirAll(filepath.Join(tr.Root, d), 0o755))
	}
	must(t, os.WriteFile(filepath.Join(tr.Root, "bus/pci/drivers_probe"), nil, 0o200))
	tr.AddVFIODriver(t, pci.VFIODriver)
	return tr
}

// Sysfs returns a [pci.Sysfs] on this tree whose writes go through the emulation.
func (tr *Tree) Sysfs() pci.Sysfs { return pci.Sysfs{Root: tr.Root, Writer: tr} }

// AddDriver creates <root>/bus/pci/drivers/<name> with bind and unbind attributes.
func (tr *Tree) AddDriver(t testing.TB, name string) {
	t.Helper()
	dir := filepath.Join(tr.Root, "bus/pci/drivers", name)
	must(t, os.MkdirAll(dir, 0o755))
	for _, f := range []string{"bind", "unbind", "new_id", "remove_id"} {
		must(t, os.WriteFile(filepath.Join(dir, f), nil, 0o200))
	}
}

// AddVFIODriver creates the driver directory like [Tree.AddDriver] and makes name a VFIO
// PCI driver: vfio-pci or a variant built on vfio_pci_core, such as "mlx5_vfio_pci". Like
// the kernel's, binding a device to it registers a vfio_device, which creates
// <device>/vfio-dev/vfioN (with a "dev" attribute if the device's spec has Cdev), and it
// refuses a device without an IOMMU group with EINVAL. Any name works, so a test can
// tell the vfio-dev entry from the driver's name.
func (tr *Tree) AddVFIODriver(t testing.TB, name string) {
	t.Helper()
	tr.AddDriver(t, name)
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.vfio[name] = true
}

// Rebind moves device a to driver as someone outside the code under test would (an
// administrator, another tool): it unbinds a from its current driver, if any, and binds it
// to driver, creating a plain driver directory if there is none; with driver "" the device
// is left unbound. The writes are not recorded. A VFIO driver refusing the device fails t.
func (tr *Tree) Rebind(t testing.TB, a pci.Address, driver string) {
	t.Helper()
	if driver != "" {
		if _, err := os.Stat(filepath.Join(tr.Root, "bus/pci/drivers", driver)); err != nil {
			tr.AddDriver(t, driver)
		}
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	d, ok := tr.devices[a]
	if !ok {
		t.Fatalf("pcitest: rebind %s: no such device", a)
	}
	if d.Driver != "" {
		must(t, tr.unbindLocked(a.String(), d.Driver))
	}
	if driver != "" {
		must(t, tr.bindLocked(a, driver))
	}
}

// RemoveDriver removes a driver directory, as unloading its module would.
func (tr *Tree) RemoveDriver(t testing.TB, name string) {
	t.Helper()
	must(t, os.RemoveAll(filepath.Join(tr.Root, "bus/pci/drivers", name)))
}

// DevicePath returns the real (link-resolved) directory of device a.
func (tr *Tree) DevicePath(a pci.Address) string {
	return filepath.Join(tr.Root, "devices", fmt.Sprintf("pci%04x:%02x", a.Domain, a.Bus), a.String())
}

// AddDevice creates a device as spec describes it. Adding the same address twice fails t.
func (tr *Tree) AddDevice(t testing.TB, spec DeviceSpec) {
	t.Helper()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	a := spec.Address
	dir := tr.DevicePath(a)
	must(t, os.MkdirAll(dir, 0o755))
	must(t, os.Symlink(rel(t, filepath.Join(tr.Root, "bus/pci/devices"), dir),
		filepath.Join(tr.Root, "bus/pci/devices", a.String())))
	files := map[string]string{
		"vendor":          fmt.Sprintf("0x%04x\n", spec.Vendor),
		"device":          fmt.Sprintf("0x%04x\n", spec.DeviceID),
		"class":           fmt.Sprintf("0x%06x\n", spec.Class),
		"driver_override": "(null)\n",
		"resource":        spec.Resource,
		"config":          "",
	}
	if spec.Resource == "" {
		files["resource"] = resourceFile(spec.BARs)
	}
	for name, content := range files {
		must(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
	if spec.IOMMUGroup >= 0 {
		gdir := filepath.Join(tr.Root, "kernel/iommu_groups", strconv.Itoa(spec.IOMMUGroup))
		must(t, os.MkdirAll(filepath.Join(gdir, "devices"), 0o755))
		must(t, os.Symlink(rel(t, dir, gdir), filepath.Join(dir, "iommu_group")))
		must(t, os.Symlink(rel(t, filepath.Join(gdir, "devices"), dir), filepath.Join(gdir, "devices", a.String())))
	}
	if spec.TSM != nil {
		tdir := filepath.Join(dir, "tsm")
		must(t, os.MkdirAll(tdir, 0o755))
		must(t, os.WriteFile(filepath.Join(tdir, "connect"), []byte(spec.TSM.Connect+"\n"), 0o644))
		must(t, os.WriteFile(filepath.Join(tdir, "bound"), []byte(spec.TSM.Bound+"\n"), 0o444))
		must(t, os.WriteFile(filepath.Join(tdir, "disconnect"), nil, 0o200))
	}
	s := spec
	tr.devices[a] = &s
	if spec.Driver != "" {
		if _, err := os.Stat(filepath.Join(tr.Root, "bus/pci/drivers", spec.Driver)); err != nil {
			tr.AddDriver(t, spec.Driver)
		}
		must(t, tr.bindLocked(a, spec.Driver))
	}
}

// RemoveDevice removes device a from the tree, as a hot-unplug would.
func (tr *Tree) RemoveDevice(t testing.TB, a pci.Address) {
	t.Helper()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	must(t, os.Remove(filepath.Join(tr.Root, "bus/pci/devices", a.String())))
	must(t, os.RemoveAll(tr.DevicePath(a)))
	delete(tr.devices, a)
}

// FailWrite makes every write to path (relative to Root, e.g.
// "bus/pci/devices/0000:00:03.0/driver/unbind") fail with err; nil removes the failure.
// The failed write is still recorded.
func (tr *Tree) FailWrite(path string, err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if err == nil {
		delete(tr.fail, path)
		return
	}
	tr.fail[path] = err
}

// Writes returns the attribute writes made so far, in order.
func (tr *Tree) Writes() []Write {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]Write(nil), tr.writes...)
}

// ResetWrites forgets the recorded writes.
func (tr *Tree) ResetWrites() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.writes = nil
}

// WriteAttr implements [pci.AttrWriter]: it records the write and applies it as the kernel
// would.
func (tr *Tree) WriteAttr(path string, data []byte) error {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	r, err := filepath.Rel(tr.Root, path)
	if err != nil || strings.HasPrefix(r, "..") {
		return fmt.Errorf("pcitest: write outside the tree: %s", path)
	}
	tr.writes = append(tr.writes, Write{Path: r, Data: string(data)})
	if err := tr.fail[r]; err != nil {
		return err
	}
	val := strings.TrimSpace(string(data))
	parts := strings.Split(r, "/")
	switch {
	case r == "bus/pci/drivers_probe":
		return tr.probeLocked(val)
	case len(parts) == 5 && parts[0] == "bus" && parts[2] == "devices" && parts[4] == "driver_override":
		a, err := tr.lookupLocked(parts[3])
		if err != nil {
			return err
		}
		content := val
		if content == "" {
			content = "(null)"
		}
		return os.WriteFile(filepath.Join(tr.DevicePath(a), "driver_override"), []byte(content+"\n"), 0o644)
	case len(parts) == 6 && parts[2] == "devices" && parts[4] == "driver" && parts[5] == "unbind":
		a, err := tr.lookupLocked(parts[3])
		if err != nil {
			return err
		}
		drv := tr.devices[a].Driver
		if drv == "" {
			return unix.ENOENT // no driver link to write through
		}
		return tr.unbindLocked(val, drv)
	case len(parts) == 5 && parts[2] == "drivers" && parts[4] == "unbind":
		return tr.unbindLocked(val, parts[3])
	case len(parts) == 5 && parts[2] == "drivers" && parts[4] == "bind":
		a, err := tr.lookupLocked(val)
		if err != nil {
			return err
		}
		d := tr.devices[a]
		if d.Driver != "" {
			return unix.EBUSY
		}
		if o := tr.overrideLocked(a); o != "" && o != parts[3] {
			return unix.ENODEV
		}
		return tr.bindLocked(a, parts[3])
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	return errors.Join(err, f.Close())
}

func (tr *Tree) lookupLocked(bdf string) (pci.Address, error) {
	a, err := pci.ParseAddress(bdf)
	if err != nil {
		return pci.Address{}, unix.EINVAL
	}
	if _, ok := tr.devices[a]; !ok {
		return pci.Address{}, unix.ENODEV
	}
	return a, nil
}

func (tr *Tree) overrideLocked(a pci.Address) string {
	b, _ := os.ReadFile(filepath.Join(tr.DevicePath(a), "driver_override"))
	s := strings.TrimSpace(string(b))
	if s == "(null)" {
		return ""
	}
	return s
}

func (tr *Tree) probeLocked(bdf string) error {
	a, err := tr.lookupLocked(bdf)
	if err != nil {
		return err
	}
	d := tr.devices[a]
	if d.Driver != "" {
		return nil
	}
	drv := tr.overrideLocked(a)
	if drv == "" {
		drv = d.DefaultDriver
	}
	if drv == "" {
		return nil
	}
	if _, err := os.Stat(filepath.Join(tr.Root, "bus/pci/drivers", drv)); err != nil {
		return nil // no such driver: the device stays unbound, the write succeeds
	}
	if err := tr.bindLocked(a, drv); err != nil && !errors.Is(err, unix.EINVAL) {
		return err
	}
	return nil // a failed probe leaves the device unbound, drivers_probe still succeeds
}

// bindLocked binds a to drv, creating the links the kernel creates, and for a VFIO driver
// the vfio-dev/vfioN entry of the vfio_device it registers. A VFIO driver refuses a device
// without an IOMMU group with EINVAL.
func (tr *Tree) bindLocked(a pci.Address, drv string) error {
	d := tr.devices[a]
	dir := tr.DevicePath(a)
	ddir := filepath.Join(tr.Root, "bus/pci/drivers", drv)
	if tr.vfio[drv] {
		if d.IOMMUGroup < 0 {
			return unix.EINVAL
		}
		vdir := filepath.Join(dir, "vfio-dev", "vfio"+strconv.Itoa(tr.nextVF))
		tr.nextVF++
		if err := os.MkdirAll(vdir, 0o755); err != nil {
			return err
		}
		if d.Cdev {
			if err := os.WriteFile(filepath.Join(vdir, "dev"), []byte("511:0\n"), 0o444); err != nil {
				return err
			}
		}
	}
	if err := os.Symlink(relPath(dir, ddir), filepath.Join(dir, "driver")); err != nil {
		return err
	}
	if err := os.Symlink(relPath(ddir, dir), filepath.Join(ddir, a.String())); err != nil {
		return err
	}
	d.Driver = drv
	return nil
}

func (tr *Tree) unbindLocked(bdf, drv string) error {
	a, err := tr.lookupLocked(bdf)
	if err != nil {
		return err
	}
	d := tr.devices[a]
	if d.Driver != drv {
		return unix.ENODEV
	}
	dir := tr.DevicePath(a)
	if err := os.Remove(filepath.Join(dir, "driver")); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(tr.Root, "bus/pci/drivers", drv, a.String())); err != nil {
		return err
	}
	if err := os.RemoveAll(filepath.Join(dir, "vfio-dev")); err != nil {
		return err
	}
	d.Driver = ""
	return nil
}

// resourceFile renders BARs as the kernel's 13-line resource file of an endpoint.
func resourceFile(bars []pci.BAR) string {
	var lines [13][3]uint64
	for _, b := range bars {
		if b.Index < 0 || b.Index >= 6 {
			continue
		}
		end := uint64(0)
		if b.Size > 0 {
			end = b.Start + b.Size - 1
		}
		lines[b.Index] = [3]uint64{b.Start, end, b.Flags}
	}
	var sb strings.Builder
	for _, l := range lines {
		fmt.Fprintf(&sb, "0x%016x 0x%016x 0x%016x\n", l[0], l[1], l[2])
	}
	return sb.String()
}

func relPath(from, to string) string {
	r, err := filepath.Rel(from, to)
	if err != nil {
		return to
	}
	return r
}

func rel(t testing.TB, from, to string) string {
	t.Helper()
	r, err := filepath.Rel(from, to)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
