package pci

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// VFIODriver is the name of the vfio-pci driver in /sys/bus/pci/drivers. Devices bound to
// it are not the only ones VFIO serves: see [Device.VFIOBound].
const VFIODriver = "vfio-pci"

// Sysfs reads and writes the PCI part of a sysfs tree.
//
// The zero value uses the real /sys. A Sysfs is a small value, safe to copy and to use
// from several goroutines (the kernel serialises the writes; callers must not bind and
// restore the same device concurrently).
type Sysfs struct {
	// Root is the sysfs mount point; "" means "/sys".
	Root string
	// Writer, if non-nil, performs every attribute write (driver_override, unbind, bind,
	// drivers_probe) instead of the filesystem. Tests set it to emulate how the kernel
	// reacts to those writes (see package pcitest); production code leaves it nil.
	Writer AttrWriter
}

// AttrWriter writes one sysfs attribute; see [Sysfs.Writer].
type AttrWriter interface {
	// WriteAttr writes data to the attribute at path in a single write(2), as sysfs
	// requires. path is absolute (it starts with the [Sysfs] root).
	WriteAttr(path string, data []byte) error
}

// Device is a snapshot of one PCI device as sysfs showed it when [Sysfs.Device] read it.
type Device struct {
	Address  Address
	Vendor   uint16 // from "vendor", e.g. 0x1b36
	DeviceID uint16 // from "device"
	Class    uint32 // from "class": base class, subclass and programming interface, e.g. 0x00ff00

	// Driver is the basename of the "driver" link, e.g. "vfio-pci"; "" if unbound.
	Driver string
	// DriverOverride is the content of "driver_override", "" if unset ("(null)") or absent.
	DriverOverride string
	// IOMMUGroup is the number of the "iommu_group" link; -1 if the device has none.
	IOMMUGroup int
	// VFIODev is the name of the VFIO device object, "vfio0" if "vfio-dev/vfio0" exists
	// (a VFIO driver registered the device, see [Device.VFIOBound]); "" otherwise.
	VFIODev string
	// CdevNode is "/dev/vfio/devices/vfioN" if "vfio-dev/vfioN/dev" exists, that is if the
	// kernel has CONFIG_VFIO_DEVICE_CDEV; "" otherwise. It names the node as udev creates it
	// under /dev, whatever the Sysfs root.
	CdevNode string
	// BARs are the six standard BARs from the first six lines of "resource". The upper
	// half of a 64-bit BAR shows as an empty slot.
	BARs [6]BAR
	// TSM is the PCI TSM (TDISP link) state.
	TSM TSMState
}

// VFIOBound reports whether d is bound to a VFIO PCI driver: vfio-pci or one of its
// variant drivers built on vfio_pci_core (mlx5_vfio_pci, hisi_acc_vfio_pci,
// nvgrace_gpu_vfio_pci, virtio_vfio_pci, ...), which VFIO opens alike. It is the one test
// of "can VFIO open this PCI device" in this module.
//
// The structural signal decides: the device's vfio-dev/vfioN entry ([Device.VFIODev]).
// Every such driver registers a vfio_device for the PCI device in its probe
// (vfio_pci_core_register_device -> vfio_register_group_dev -> __vfio_register_dev ->
// vfio_device_add, drivers/vfio/vfio_main.c and drivers/vfio/vfio.h), a device of class
// "vfio-dev" whose parent is the PCI device, so sysfs shows it under the device; the
// driver's remove deletes it (vfio_unregister_group_dev -> vfio_device_del). The entry does
// not depend on CONFIG_VFIO_DEVICE_CDEV: since the cdev arrived (Linux 6.6; checked up to
// the current mainline source), vfio_device_add is cdev_device_add with the option and
// plain device_add without it (and for a noiommu device), so only the entry's "dev"
// attribute ([Device.CdevNode]) needs the option; before 6.6 registration called
// device_add directly. The "vfio-dev" class exists since Linux 6.1. An mdev's vfio_device hangs below the mdev, not its parent PCI
// device, so a PCI device whose driver offers mdevs is not VFIO-bound, nor is one with no
// driver link: the kernel removes that link before the driver's remove, so a device whose
// unbind waits for its VFIO fds to close still shows vfio-dev but no driver.
//
// Without the entry (a kernel before 6.1, a probe still running, a Device filled from a
// uevent's DRIVER alone) the driver's name decides: "vfio-pci", or a name ending in
// "_vfio_pci" (or "-vfio-pci"), as every in-tree variant's does.
func (d Device) VFIOBound() bool {
	if d.Driver == "" {
		return false
	}
	if d.VFIODev != "" {
		return true
	}
	n := strings.ReplaceAll(d.Driver, "-", "_")
	return n == "vfio_pci" || strings.HasSuffix(n, "_vfio_pci")
}

// BAR is one base address register as the kernel assigned it.
type BAR struct {
	Index int    // 0 to 5
	Start uint64 // physical (or I/O port) start; 0 if unassigned
	Size  uint64 // 0 if the BAR is not implemented
	Flags uint64 // kernel IORESOURCE_* flags
	Mem   bool   // IORESOURCE_MEM
	IO    bool   // IORESOURCE_IO
	// Prefetch is IORESOURCE_PREFETCH.
	Prefetch bool
	// Is64 is IORESOURCE_MEM_64: a 64-bit memory BAR, which also uses slot Index+1.
	Is64 bool
}

// Kernel resource flags (include/linux/ioport.h) as they appear in the "resource" file.
const (
	IORESOURCE_IO       = 0x00000100
	IORESOURCE_MEM      = 0x00000200
	IORESOURCE_PREFETCH = 0x00002000
	IORESOURCE_MEM_64   = 0x00100000
)

// TSMState is the PCI TSM state of a device (Linux 6.19+, docs/kernel.md §7).
type TSMState struct {
	// Present reports whether the device has a "tsm" directory; it appears only while a
	// link TSM is registered and the device is TSM-capable.
	Present bool
	// Connect is the trimmed content of tsm/connect: the name of the TSM that holds an SPDM
	// (and possibly IDE) session with the device, e.g. "tsm0"; "" if none.
	Connect string
	// Bound is the trimmed content of tsm/bound: the TSM name while the TDI is LOCKED, RUN
	// or ERROR; "" otherwise (always "" on Linux 7.2, where nothing binds a TDI).
	Bound string
}

func (s Sysfs) root() string {
	if s.Root == "" {
		return "/sys"
	}
	return s.Root
}

// DevicePath returns the sysfs directory of a: <root>/bus/pci/devices/<a>.
func (s Sysfs) DevicePath(a Address) string {
	return filepath.Join(s.root(), "bus", "pci", "devices", a.String())
}

// DriverPath returns the sysfs directory of the named PCI driver: <root>/bus/pci/drivers/<name>.
func (s Sysfs) DriverPath(name string) string {
	return filepath.Join(s.root(), "bus", "pci", "drivers", name)
}

// Device reads a snapshot of device a. If the device does not exist the error wraps
// [errdefs.ErrNotFound] and the errno (errors.Is(err, fs.ErrNotExist) holds).
func (s Sysfs) Device(a Address) (Device, error) {
	dir := s.DevicePath(a)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Device{}, fmt.Errorf("pci device %s: %w: %w", a, errdefs.ErrNotFound, err)
		}
		return Device{}, fmt.Errorf("pci device %s: %w", a, err)
	}
	d, err := s.readDevice(a, dir)
	if err != nil {
		// A device removed while being read is as absent as one never there.
		if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
			return Device{}, fmt.Errorf("pci device %s: %w: %w", a, errdefs.ErrNotFound, serr)
		}
		return Device{}, err
	}
	return d, nil
}

func (s Sysfs) readDevice(a Address, dir string) (Device, error) {
	d := Device{Address: a, IOMMUGroup: -1}
	var err error
	if d.Vendor, err = readID16(dir, "vendor"); err != nil {
		return Device{}, devError(a, err)
	}
	if d.DeviceID, err = readID16(dir, "device"); err != nil {
		return Device{}, devError(a, err)
	}
	class, err := readHexFile(dir, "class", 32)
	if err != nil {
		return Device{}, devError(a, err)
	}
	d.Class = uint32(class)

	if d.Driver, err = linkBase(dir, "driver"); err != nil {
		return Device{}, devError(a, err)
	}
	if d.DriverOverride, err = readDriverOverride(dir); err != nil {
		return Device{}, devError(a, err)
	}
	group, err := linkBase(dir, "iommu_group")
	if err != nil {
		return Device{}, devError(a, err)
	}
	if group != "" {
		n, err := strconv.Atoi(group)
		if err != nil || n < 0 {
			return Device{}, devError(a, fmt.Errorf("iommu_group link names %q, not a group number", group))
		}
		d.IOMMUGroup = n
	}
	if d.VFIODev, d.CdevNode, err = vfioDev(dir); err != nil {
		return Device{}, devError(a, err)
	}

	res, err := os.ReadFile(filepath.Join(dir, "resource"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return Device{}, devError(a, err)
	}
	if d.BARs, err = parseResource(string(res)); err != nil {
		return Device{}, devError(a, fmt.Errorf("%s: %w", filepath.Join(dir, "resource"), err))
	}
	if d.TSM, err = readTSM(dir); err != nil {
		return Device{}, devError(a, err)
	}
	return d, nil
}

// List returns the addresses of all PCI devices under <root>/bus/pci/devices, sorted.
// Entries whose names are not addresses [ParseAddress] accepts (such as VMD domains above
// 0xffff) are skipped.
func (s Sysfs) List() ([]Address, error) {
	return readAddrDir(filepath.Join(s.root(), "bus", "pci", "devices"))
}

// GroupMembers returns the addresses of the devices in a's IOMMU group (a included), from
// <device>/iommu_group/devices, sorted. A device without an IOMMU group yields an error
// wrapping [errdefs.ErrFailedPrecondition].
func (s Sysfs) GroupMembers(a Address) ([]Address, error) {
	dir := s.DevicePath(a)
	if _, err := os.Lstat(filepath.Join(dir, "iommu_group")); err != nil {
		if _, derr := os.Stat(dir); derr != nil && errors.Is(derr, fs.ErrNotExist) {
			return nil, fmt.Errorf("pci device %s: %w: %w", a, errdefs.ErrNotFound, derr)
		}
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("pci device %s: no iommu_group (IOMMU off or device not translated): %w",
				a, errdefs.ErrFailedPrecondition)
		}
		return nil, devError(a, err)
	}
	addrs, err := readAddrDir(filepath.Join(dir, "iommu_group", "devices"))
	if err != nil {
		return nil, devError(a, err)
	}
	return addrs, nil
}

// Group returns the addresses of the PCI devices in IOMMU group n, from
// <root>/kernel/iommu_groups/<n>/devices, sorted. Non-PCI members are skipped.
func (s Sysfs) Group(n int) ([]Address, error) {
	dir := filepath.Join(s.root(), "kernel", "iommu_groups", strconv.Itoa(n), "devices")
	addrs, err := readAddrDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("iommu group %d: %w: %w", n, errdefs.ErrNotFound, err)
		}
		return nil, fmt.Errorf("iommu group %d: %w", n, err)
	}
	return addrs, nil
}

// TSMProviders returns the registered TSM devices (<root>/class/tsm/tsmN), sorted; an empty
// list if there are none or the kernel lacks CONFIG_TSM. While it is empty the absence of a
// device's tsm directory says nothing (docs/kernel.md §7.3).
func (s Sysfs) TSMProviders() ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(s.root(), "class", "tsm"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

func readAddrDir(dir string) ([]Address, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var addrs []Address
	for _, e := range ents {
		if len(e.Name()) != len("0000:00:00.0") {
			continue
		}
		a, err := ParseAddress(e.Name())
		if err != nil {
			continue
		}
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, Address.Compare)
	return addrs, nil
}

func devError(a Address, err error) error {
	return fmt.Errorf("pci device %s: %w", a, err)
}

// readHexFile reads a sysfs attribute of the form "0x1b36\n".
func readHexFile(dir, name string, bits int) (uint64, error) {
	p := filepath.Join(dir, name)
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	t := strings.TrimSpace(string(b))
	v, ok := parseHex0x(t)
	if !ok || (bits < 64 && v>>bits != 0) {
		return 0, fmt.Errorf("%s: %q is not a %d-bit 0x-prefixed hex number", p, clip(t), bits)
	}
	return v, nil
}

func readID16(dir, name string) (uint16, error) {
	v, err := readHexFile(dir, name, 16)
	return uint16(v), err
}

// parseHex0x parses "0x" followed by 1 to 16 hex digits of either case.
func parseHex0x(s string) (uint64, bool) {
	h, ok := strings.CutPrefix(s, "0x")
	if !ok || len(h) == 0 || len(h) > 16 {
		return 0, false
	}
	return parseHex(strings.ToLower(h))
}

// linkBase returns the basename of the symlink dir/name, or "" if it does not exist.
func linkBase(dir, name string) (string, error) {
	t, err := os.Readlink(filepath.Join(dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return filepath.Base(t), nil
}

func readDriverOverride(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "driver_override"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	s := strings.TrimSpace(string(b))
	if s == "(null)" {
		s = ""
	}
	return s, nil
}

// vfioDev finds dir/vfio-dev/vfioN and whether it has a "dev" attribute (a cdev).
func vfioDev(dir string) (name, node string, err error) {
	ents, err := os.ReadDir(filepath.Join(dir, "vfio-dev"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", err
	}
	for _, e := range ents {
		n, ok := strings.CutPrefix(e.Name(), "vfio")
		if !ok || n == "" || strings.Trim(n, "0123456789") != "" {
			continue
		}
		name = e.Name()
		if _, err := os.Stat(filepath.Join(dir, "vfio-dev", name, "dev")); err == nil {
			node = "/dev/vfio/devices/" + name
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", "", err
		}
		return name, node, nil
	}
	return "", "", nil
}

func readTSM(dir string) (TSMState, error) {
	tdir := filepath.Join(dir, "tsm")
	fi, err := os.Stat(tdir)
	if errors.Is(err, fs.ErrNotExist) {
		return TSMState{}, nil
	}
	if err != nil {
		return TSMState{}, err
	}
	if !fi.IsDir() {
		return TSMState{}, nil
	}
	st := TSMState{Present: true}
	for _, f := range []struct {
		name string
		dst  *string
	}{{"connect", &st.Connect}, {"bound", &st.Bound}} {
		b, err := os.ReadFile(filepath.Join(tdir, f.name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return TSMState{}, err
		}
		*f.dst = strings.TrimSpace(string(b))
	}
	return st, nil
}

// parseResource parses the first six lines of a sysfs "resource" file: "start end flags",
// each 0x-prefixed hex. Missing lines leave their BARs empty; later lines (expansion ROM,
// bridge windows, SR-IOV BARs) are ignored.
func parseResource(text string) ([6]BAR, error) {
	var bars [6]BAR
	for i := range bars {
		bars[i].Index = i
	}
	for i := 0; i < len(bars) && text != ""; i++ {
		var line string
		line, text, _ = strings.Cut(text, "\n")
		f := strings.Fields(line)
		if len(f) != 3 {
			return bars, fmt.Errorf("line %d: want 3 fields, got %d", i+1, len(f))
		}
		var v [3]uint64
		for j := range f {
			var ok bool
			if v[j], ok = parseHex0x(f[j]); !ok {
				return bars, fmt.Errorf("line %d: field %d %q is not 0x-prefixed hex", i+1, j+1, clip(f[j]))
			}
		}
		start, end, flags := v[0], v[1], v[2]
		b := BAR{Index: i, Start: start, Flags: flags}
		if end != 0 {
			if end < start || (start == 0 && end == ^uint64(0)) {
				return bars, fmt.Errorf("line %d: bad range [%#x, %#x]", i+1, start, end)
			}
			b.Size = end - start + 1
		}
		b.IO = flags&IORESOURCE_IO != 0
		b.Mem = flags&IORESOURCE_MEM != 0
		b.Prefetch = flags&IORESOURCE_PREFETCH != 0
		b.Is64 = flags&IORESOURCE_MEM_64 != 0
		bars[i] = b
	}
	return bars, nil
}
