package vfio

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/failpoint"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"golang.org/x/sys/unix"
)

// Mode is how a device was opened.
type Mode string

// Open modes.
const (
	// ModeAuto picks [ModeCdev] when the device has a VFIO cdev and /dev/iommu opens,
	// [ModeGroup] otherwise.
	ModeAuto Mode = "auto"
	// ModeGroup is the legacy path: /dev/vfio/N joined to a type1v2 container.
	ModeGroup Mode = "group"
	// ModeCdev is /dev/vfio/devices/vfioN bound to an iommufd and attached to an IOAS.
	ModeCdev Mode = "cdev"
)

// OpenOptions configures [Open].
type OpenOptions struct {
	// Mode is "auto" (or ""), "group" or "cdev"; see [Mode].
	Mode string
	// Sysfs locates the device in sysfs.
	Sysfs pci.Sysfs
	// DevRoot is where the vfio and iommu nodes live; "" means "/dev".
	DevRoot string
	// IOMMUFD, when set, opens the device in cdev mode bound to this iommufd and attached
	// to its address space IOAS, instead of the process-wide iommufd that cdev devices
	// share otherwise. This is the client side of peer-to-peer DMA: a process that owns a
	// DMA-capable device attaches it to its own IOAS and maps brokered dma-bufs there
	// (iommufd.FD.MapFile). The FD stays the caller's: it must outlive the Device, whose
	// Close does not close it. Mode must be "auto", "" or "cdev".
	IOMMUFD *iommufd.FD
	// IOAS is the IO address space within IOMMUFD to attach to (iommufd.FD.AllocIOAS);
	// only used with IOMMUFD.
	IOAS uint32
	// Keeper, when set, keeps the fds Open opens (device, group and container, or iommufd)
	// outside the process and gives back those a previous run kept, so that a restart of
	// the process revokes nothing (see [Keeper]). Devices of one group or iommufd share
	// the Keeper of the first of them opened.
	Keeper Keeper
}

// DeviceInfo is what VFIO_DEVICE_GET_INFO reports.
type DeviceInfo struct {
	Flags      uint32 // VFIO_DEVICE_FLAGS_*
	NumRegions uint32 // 9 + device-specific regions for vfio-pci
	NumIRQs    uint32
	Caps       []Cap // the device capability chain, if any
}

// PCI reports whether the device is a vfio-pci device.
func (i DeviceInfo) PCI() bool { return i.Flags&VFIO_DEVICE_FLAGS_PCI != 0 }

// ResetSupported reports whether [Device.Reset] can work (VFIO_DEVICE_FLAGS_RESET).
func (i DeviceInfo) ResetSupported() bool { return i.Flags&VFIO_DEVICE_FLAGS_RESET != 0 }

// RegionInfo is what VFIO_DEVICE_GET_REGION_INFO reports for one region, with its
// capability chain decoded.
type RegionInfo struct {
	Index  int
	Flags  uint32 // VFIO_REGION_INFO_FLAG_*
	Size   uint64 // 0 for an unimplemented BAR
	Offset uint64 // where the region starts in the device fd (pread/pwrite/mmap)
	// Sparse lists the mmap-able areas when the region has a sparse-mmap capability
	// (only variant drivers emit one); nil if it has none.
	Sparse []SparseArea
	// Type is the region's type capability, nil if it has none.
	Type *RegionType
	// MSIXMappable reports VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the whole BAR, MSI-X table
	// included, may be mmapped.
	MSIXMappable bool
	// Caps is the raw capability chain.
	Caps []Cap
}

// Readable, Writable and Mappable report the region's READ, WRITE and MMAP flags.
func (r RegionInfo) Readable() bool { return r.Flags&VFIO_REGION_INFO_FLAG_READ != 0 }

// Writable reports VFIO_REGION_INFO_FLAG_WRITE.
func (r RegionInfo) Writable() bool { return r.Flags&VFIO_REGION_INFO_FLAG_WRITE != 0 }

// Mappable reports VFIO_REGION_INFO_FLAG_MMAP.
func (r RegionInfo) Mappable() bool { return r.Flags&VFIO_REGION_INFO_FLAG_MMAP != 0 }

// RegionType is a VFIO_REGION_INFO_CAP_TYPE capability (struct vfio_region_info_cap_type).
type RegionType struct {
	Type, Subtype uint32
}

// IRQInfo is what VFIO_DEVICE_GET_IRQ_INFO reports for one IRQ index.
type IRQInfo struct {
	Index int
	Flags uint32 // VFIO_IRQ_INFO_*
	Count uint32
}

// maxInfoSize bounds the buffer an INFO ioctl may ask for when its capability chain does
// not fit; the kernel's chains are a few dozen bytes.
const maxInfoSize = 1 << 16

// Device is an open VFIO device. It owns the device fd and holds references on what the
// fd was opened through (group and container, or iommufd). All methods are safe for
// concurrent use; [Device.Reopen] and [Device.Close] wait for calls in flight.
type Device struct {
	addr     pci.Address
	bdf      string
	pdev     pci.Device // sysfs snapshot taken by Open
	mode     Mode
	reg      *registry
	grp      *groupRef // ModeGroup
	iommu    *iommuRef // ModeCdev
	openFD   func() (*os.File, error)
	pageSize uint64
	keeper   Keeper // nil: nothing kept
	restored bool   // the device fd came from the Keeper

	mu          sync.RWMutex
	file        *os.File // guarded by mu; nil after a failed Reopen
	reopenErr   error    // guarded by mu; why file is nil
	closed      bool     // guarded by mu
	deviceState          // guarded by mu

	cfgMu sync.Mutex // serializes read-modify-write of config space

	probeMu        sync.Mutex
	probed         bool  // guarded by probeMu
	probeErr       error // guarded by probeMu
	revokeProbed   bool  // guarded by probeMu
	revokeProbeErr error // guarded by probeMu
}

// Open opens the VFIO device bdf, which must be bound to vfio-pci (or a vfio variant
// driver). See [OpenOptions] and [Mode] for how. A device can be open only once per
// process at a time; devices of one IOMMU group share the group and container, cdev
// devices share one iommufd and IOAS.
func Open(bdf pci.Address, opt OpenOptions) (*Device, error) {
	return defaultRegistry.open(bdf, opt)
}

func (r *registry) open(addr pci.Address, opt OpenOptions) (_ *Device, err error) {
	bdf := addr.String()
	defer func() { err = opError("open", bdf, err) }()

	mode := Mode(opt.Mode)
	switch mode {
	case "":
		mode = ModeAuto
	case ModeAuto, ModeGroup, ModeCdev:
	default:
		return nil, fmt.Errorf("mode %q: want auto, group or cdev: %w", opt.Mode, errdefs.ErrInvalidArgument)
	}
	devRoot := opt.DevRoot
	if devRoot == "" {
		devRoot = "/dev"
	}
	pdev, err := opt.Sysfs.Device(addr)
	if err != nil {
		return nil, err
	}
	switch {
	case pdev.Driver == "":
		return nil, fmt.Errorf("not bound to a driver (bind it to %s): %w", pci.VFIODriver, errdefs.ErrFailedPrecondition)
	case !pdev.VFIOBound():
		return nil, fmt.Errorf("bound to %s, not a VFIO driver (vfio-pci or a vfio variant): %w", pdev.Driver, errdefs.ErrFailedPrecondition)
	}
	hasCdev := pdev.VFIODev != "" && pdev.CdevNode != ""
	if opt.IOMMUFD != nil {
		if mode == ModeGroup {
			return nil, fmt.Errorf("a caller's iommufd needs cdev mode, not group: %w", errdefs.ErrInvalidArgument)
		}
		mode = ModeCdev
	}
	if mode == ModeCdev && !hasCdev {
		return nil, fmt.Errorf("no VFIO cdev for the device (kernel without CONFIG_VFIO_DEVICE_CDEV?); use group mode: %w", errdefs.ErrNotSupported)
	}

	if err := r.claimDevice(bdf); err != nil {
		return nil, err
	}
	d := &Device{addr: addr, bdf: bdf, pdev: pdev, reg: r, pageSize: uint64(os.Getpagesize()), keeper: opt.Keeper}
	defer func() {
		if err != nil {
			d.release(true)
		}
	}()

	if opt.IOMMUFD != nil {
		d.iommu = &iommuRef{fd: opt.IOMMUFD, ioas: opt.IOAS, borrowed: true}
	} else if mode == ModeCdev || (mode == ModeAuto && hasCdev) {
		d.iommu, err = r.acquireIOMMU(devRoot, opt.Keeper)
		switch {
		case err == nil:
			mode = ModeCdev
		case mode == ModeCdev:
			return nil, err
		default:
			mode = ModeGroup // auto: no usable /dev/iommu
		}
	}
	if mode == ModeAuto {
		mode = ModeGroup
	}
	d.mode = mode
	if mode == ModeCdev {
		path := filepath.Join(devRoot, "vfio", "devices", pdev.VFIODev)
		d.openFD = func() (*os.File, error) { return r.be.cdevDevice(d.iommu, path) }
	} else {
		if pdev.IOMMUGroup < 0 {
			return nil, fmt.Errorf("no iommu group (IOMMU disabled?): %w", errdefs.ErrFailedPrecondition)
		}
		if d.grp, err = r.acquireGroup(devRoot, pdev.IOMMUGroup, opt.Keeper); err != nil {
			return nil, fmt.Errorf("iommu group %d: %w", pdev.IOMMUGroup, err)
		}
		d.openFD = func() (*os.File, error) { return r.be.groupDevice(d.grp, bdf) }
	}
	if d.keeper != nil && opt.IOMMUFD == nil {
		if f := d.keeper.Take(KeepName(bdf)); f != nil {
			d.file, d.restored = f, true
			if err := d.refreshLocked(); err != nil {
				// Unusable: closing it is its last close (revokes its dma-bufs); start over.
				f.Close()
				d.file, d.restored = nil, false
			}
		}
	}
	if d.file == nil {
		if d.file, err = d.openFD(); err != nil {
			return nil, err
		}
		if err := d.refreshLocked(); err != nil {
			return nil, err
		}
		if err := d.keep(); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// keep keeps the current device fd with the Keeper, if any.
func (d *Device) keep() error {
	if d.keeper == nil || d.iommu != nil && d.iommu.borrowed {
		return nil
	}
	if err := d.keeper.Keep(KeepName(d.bdf), d.file); err != nil {
		return fmt.Errorf("keep the device fd: %w", err)
	}
	return nil
}

// forget drops the kept copy of the device fd, if any, before its close.
func (d *Device) forget() error {
	if d.keeper == nil || d.iommu != nil && d.iommu.borrowed {
		return nil
	}
	if err := d.keeper.Forget(KeepName(d.bdf)); err != nil {
		return fmt.Errorf("drop the kept device fd: %w", err)
	}
	return nil
}

// Restored reports whether Open got the device fd back from the [Keeper] (a previous run
// kept it open): dma-bufs exported by that run are still live.
func (d *Device) Restored() bool { return d.restored }

// release closes the device fd and drops the registry references; with forget, kept
// copies are dropped first, so that the closes are the last ones. Callers hold d.mu or
// own d exclusively.
func (d *Device) release(forget bool) error {
	var errs []error
	if d.file != nil {
		if forget {
			if err := d.forget(); err != nil {
				// Closing now would not revoke; keep going, but say so.
				errs = append(errs, err)
			}
		}
		errs = append(errs, d.file.Close())
		d.file = nil
	}
	if d.grp != nil {
		errs = append(errs, d.reg.releaseGroup(d.grp, forget))
		d.grp = nil
	}
	if d.iommu != nil {
		errs = append(errs, d.reg.releaseIOMMU(d.iommu, forget))
		d.iommu = nil
	}
	d.reg.releaseDevice(d.bdf)
	return errors.Join(errs...)
}

// deviceState is what a Device caches about its fd: read at open and at each Reopen.
type deviceState struct {
	info DeviceInfo
	cfg  RegionInfo    // the config region
	bars [6]RegionInfo // BAR regions 0-5
}

// refreshLocked re-reads the deviceState from the current fd. d.mu must be held for
// writing (or d not yet shared).
func (d *Device) refreshLocked() error {
	st, err := d.reg.be.query(d.file)
	if err != nil {
		return err
	}
	d.deviceState = st
	return nil
}

// queryDevice reads the device info, the config region and the BAR regions.
func queryDevice(f *os.File) (deviceState, error) {
	var st deviceState
	var err error
	if st.info, err = getDeviceInfo(f); err != nil {
		return st, err
	}
	if st.info.NumRegions <= VFIO_PCI_CONFIG_REGION_INDEX {
		return st, fmt.Errorf("device has %d regions, no PCI config region: %w", st.info.NumRegions, errdefs.ErrNotSupported)
	}
	if st.cfg, err = getRegionInfo(f, VFIO_PCI_CONFIG_REGION_INDEX); err != nil {
		return st, err
	}
	for i := range st.bars {
		if st.bars[i], err = getRegionInfo(f, i); err != nil {
			return st, err
		}
	}
	return st, nil
}

// IOMMU returns the iommufd and IO address space a cdev-mode device is attached to
// (borrowed: the FD belongs to the Device's process-wide registry or to the caller of
// [Open] that passed it in [OpenOptions]), and false in group mode. DMA by the device
// goes through that IOAS, so this is where a dma-buf must be mapped for the device to
// reach it.
func (d *Device) IOMMU() (*iommufd.FD, uint32, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.iommu == nil {
		return nil, 0, false
	}
	return d.iommu.fd, d.iommu.ioas, true
}

// Mode returns how the device was opened: [ModeGroup] or [ModeCdev].
func (d *Device) Mode() Mode { return d.mode }

// Address returns the device's PCI address.
func (d *Device) Address() pci.Address { return d.addr }

// PCI returns the sysfs snapshot taken when the device was opened.
func (d *Device) PCI() pci.Device { return d.pdev }

// Info returns the device info read at open (or at the last Reopen).
func (d *Device) Info() DeviceInfo {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.info
}

// use runs fn with the device fd under the read lock, and wraps its error as op.
func (d *Device) use(op string, fn func(f *os.File) error) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.usableLocked(); err != nil {
		return opError(op, d.bdf, err)
	}
	return opError(op, d.bdf, fn(d.file))
}

func (d *Device) usableLocked() error {
	if d.closed {
		return fmt.Errorf("device is closed: %w", os.ErrClosed)
	}
	if d.file == nil {
		return fmt.Errorf("no device fd since a failed reopen (%w): %w", d.reopenErr, errdefs.ErrUnavailable)
	}
	return nil
}

// Region returns the info of region index i (VFIO_DEVICE_GET_REGION_INFO) with its
// capability chain.
func (d *Device) Region(i int) (RegionInfo, error) {
	var r RegionInfo
	err := d.use("get-region-info", func(f *os.File) error {
		if i < 0 || uint32(i) >= d.info.NumRegions {
			return fmt.Errorf("region %d: the device has %d regions: %w", i, d.info.NumRegions, errdefs.ErrInvalidArgument)
		}
		var err error
		r, err = getRegionInfo(f, i)
		return err
	})
	return r, err
}

// IRQ returns the info of IRQ index i (VFIO_DEVICE_GET_IRQ_INFO).
func (d *Device) IRQ(i int) (IRQInfo, error) {
	var r IRQInfo
	err := d.use("get-irq-info", func(f *os.File) error {
		if i < 0 || uint32(i) >= d.info.NumIRQs {
			return fmt.Errorf("irq index %d: the device has %d: %w", i, d.info.NumIRQs, errdefs.ErrInvalidArgument)
		}
		var err error
		r, err = getIRQInfo(f, uint32(i))
		return err
	})
	return r, err
}

// ReadConfig reads len(b) bytes of PCI config space at off through the config region
// (pread on the device fd). Config space is virtualized by vfio-pci.
func (d *Device) ReadConfig(off int64, b []byte) error {
	return d.use("read-config", func(f *os.File) error { return d.configIO(f, off, b, false) })
}

// WriteConfig writes b to PCI config space at off through the config region (pwrite).
// Clearing PCI_COMMAND_MEMORY this way revokes the device's dma-bufs; see
// [Device.SetMemoryEnable].
func (d *Device) WriteConfig(off int64, b []byte) error {
	return d.use("write-config", func(f *os.File) error { return d.configIO(f, off, b, true) })
}

func (d *Device) configIO(f *os.File, off int64, b []byte, write bool) error {
	if off < 0 || uint64(off)+uint64(len(b)) > d.cfg.Size {
		return fmt.Errorf("config range [%#x,+%#x) is outside the %#x-byte config space: %w", off, len(b), d.cfg.Size, errdefs.ErrInvalidArgument)
	}
	return regionIO(f, d.cfg, off, b, write)
}

// regionIO reads or writes b at off within region r of the device fd f.
func regionIO(f *os.File, r RegionInfo, off int64, b []byte, write bool) error {
	at := int64(r.Offset) + off
	var err error
	if write {
		_, err = f.WriteAt(b, at)
	} else {
		_, err = f.ReadAt(b, at)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	}
	return err
}

// ReadBAR reads len(b) bytes at off of BAR bar through the VFIO region (pread on the
// device fd), e.g. device registers. The range must lie inside the BAR.
func (d *Device) ReadBAR(bar int, off int64, b []byte) error {
	return d.use("read-bar", func(f *os.File) error { return d.barIO(f, bar, off, b, false) })
}

// WriteBAR writes b at off of BAR bar through the VFIO region (pwrite on the device fd).
// vfio-pci turns an aligned 1, 2, 4 or 8-byte write into one access of that size.
func (d *Device) WriteBAR(bar int, off int64, b []byte) error {
	return d.use("write-bar", func(f *os.File) error { return d.barIO(f, bar, off, b, true) })
}

func (d *Device) barIO(f *os.File, bar int, off int64, b []byte, write bool) error {
	if bar < VFIO_PCI_BAR0_REGION_INDEX || bar > VFIO_PCI_BAR5_REGION_INDEX {
		return fmt.Errorf("bar %d: not a bar (0 to 5): %w", bar, errdefs.ErrInvalidArgument)
	}
	r := d.bars[bar]
	if off < 0 || uint64(off)+uint64(len(b)) > r.Size {
		return fmt.Errorf("bar %d range [%#x,+%#x) is outside the bar (size %#x): %w", bar, off, len(b), r.Size, errdefs.ErrInvalidArgument)
	}
	return regionIO(f, r, off, b, write)
}

// SetMemoryEnable sets or clears PCI_COMMAND_MEMORY (memory-space decode) with a
// read-modify-write of the command register through the config region. Clearing it
// revokes every dma-buf of the device until it is set again (importers such as iommufd
// must map again); setting it also un-revokes buffers born while it was clear.
func (d *Device) SetMemoryEnable(on bool) error {
	return d.setCommand("set-memory-enable", PCI_COMMAND_MEMORY, on)
}

// SetBusMaster sets or clears PCI_COMMAND_MASTER (bus mastering) with a read-modify-write
// of the command register through the config region. A device needs it to DMA.
func (d *Device) SetBusMaster(on bool) error {
	return d.setCommand("set-bus-master", PCI_COMMAND_MASTER, on)
}

// setCommand sets or clears bit in the PCI command register.
func (d *Device) setCommand(op string, bit uint16, on bool) error {
	d.cfgMu.Lock()
	defer d.cfgMu.Unlock()
	return d.use(op, func(f *os.File) error {
		var b [2]byte
		if err := d.configIO(f, PCI_COMMAND, b[:], false); err != nil {
			return err
		}
		cmd := uint16(b[0]) | uint16(b[1])<<8
		if on {
			cmd |= bit
		} else {
			cmd &^= bit
		}
		b[0], b[1] = byte(cmd), byte(cmd>>8)
		return d.configIO(f, PCI_COMMAND, b[:], true)
	})
}

// MemoryEnabled reports whether PCI_COMMAND_MEMORY is set in the (virtual) command
// register.
func (d *Device) MemoryEnabled() (bool, error) {
	var on bool
	err := d.use("read-config", func(f *os.File) error {
		var b [2]byte
		if err := d.configIO(f, PCI_COMMAND, b[:], false); err != nil {
			return err
		}
		on = b[0]&PCI_COMMAND_MEMORY != 0
		return nil
	})
	return on, err
}

// Reset resets the device (VFIO_DEVICE_RESET). Its dma-bufs are revoked during the reset
// and restored afterwards if memory decode is enabled. EINVAL if the device has no reset
// method (see [DeviceInfo.ResetSupported]).
func (d *Device) Reset() error {
	return d.use("reset", func(f *os.File) error {
		_, err := ioctl.Value(f, "VFIO_DEVICE_RESET", VFIO_DEVICE_RESET, 0)
		return err
	})
}

// ProbeFeature asks whether the device supports feature with the access in flags
// (VFIO_DEVICE_FEATURE_GET and/or _SET): VFIO_DEVICE_FEATURE with
// PROBE|flags|feature. nil means supported; an unknown feature fails with ENOTTY.
func (d *Device) ProbeFeature(feature uint32, flags uint32) error {
	return d.use("probe-feature", func(f *os.File) error { return probeFeature(f, feature, flags) })
}

func probeFeature(f *os.File, feature, flags uint32) error {
	if feature > VFIO_DEVICE_FEATURE_MASK {
		return fmt.Errorf("feature %d: above %d: %w", feature, VFIO_DEVICE_FEATURE_MASK, errdefs.ErrInvalidArgument)
	}
	hdr := newFeatureHeader(VFIO_DEVICE_FEATURE_PROBE | flags | feature)
	_, err := ioctl.Ioctl(f, "VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE, &hdr)
	if err != nil {
		return fmt.Errorf("feature %d flags %#x: %w", feature, flags, err)
	}
	return nil
}

// DMABufSupported reports whether the device can export dma-bufs: nil, or a
// *[FeatureError] (errdefs.ErrNotSupported) saying why not. The probe
// (PROBE|GET|VFIO_DEVICE_FEATURE_DMA_BUF) runs once per device; other failures are
// returned as they are and not remembered.
func (d *Device) DMABufSupported() error {
	d.probeMu.Lock()
	defer d.probeMu.Unlock()
	if d.probed {
		return d.probeErr
	}
	var perr error
	err := d.use("probe-dma-buf", func(f *os.File) error {
		perr = probeFeature(f, VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET)
		return nil
	})
	if err != nil {
		return err
	}
	switch {
	case perr == nil:
	case errors.Is(perr, unix.ENOTTY):
		perr = &FeatureError{BDF: d.bdf, Feature: "dma-buf export", MinKernel: "6.19",
			Reason: "kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA)", Err: perr}
	case errors.Is(perr, unix.EOPNOTSUPP):
		perr = &FeatureError{BDF: d.bdf, Feature: "dma-buf export",
			Reason: fmt.Sprintf("driver %s does not support dma-buf export", d.pdev.Driver), Err: perr}
	default:
		return opError("probe-dma-buf", d.bdf, perr)
	}
	d.probed, d.probeErr = true, perr
	return perr
}

// ExportDMABuf exports ranges of BAR bar as a new dma-buf (VFIO_DEVICE_FEATURE_GET with
// VFIO_DEVICE_FEATURE_DMA_BUF) and returns its file, which the caller owns. openFlags
// are O_RDONLY, O_WRONLY or O_RDWR, optionally with O_NONBLOCK; O_CLOEXEC is always added.
//
// The arguments are checked first (bar 0 to 5 and implemented, a memory BAR, 1 to
// [MaxDMARanges] non-empty page-aligned ranges inside the BAR); mistakes are
// errdefs.ErrInvalidArgument errors naming the bar and range. The kernel's own errno
// comes through wrapped. If the kernel or driver cannot export at all, the error is the
// *[FeatureError] of [Device.DMABufSupported].
//
// The dma-buf is revoked (importers lose access) whenever the device's memory decode is
// cleared or it is reset, and for good when the device fd is closed or reopened. A
// dma-buf exported while memory decode is off is born revoked.
func (d *Device) ExportDMABuf(bar int, ranges []DMARange, openFlags int) (*os.File, error) {
	var f *os.File
	err := d.use("export-dma-buf", func(file *os.File) error {
		var size uint64
		var isIO bool
		if bar >= 0 && bar < len(d.bars) {
			size, isIO = d.bars[bar].Size, d.pdev.BARs[bar].IO
		}
		if err := validateExport(bar, size, isIO, ranges, openFlags, d.pageSize); err != nil {
			return err
		}
		var err error
		f, err = d.exportLocked(file, dmaBufRequest{
			Region:    uint32(bar),
			OpenFlags: uint32(openFlags | unix.O_CLOEXEC),
			Ranges:    ranges,
		})
		return err
	})
	if err != nil && (errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP)) {
		if ferr := d.DMABufSupported(); ferr != nil {
			var fe *FeatureError
			if errors.As(ferr, &fe) {
				return nil, ferr
			}
		}
	}
	return f, err
}

func (d *Device) exportLocked(file *os.File, req dmaBufRequest) (*os.File, error) {
	buf, err := req.encode()
	if err != nil {
		return nil, err
	}
	fd, err := ioctl.Bytes(file, "VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE, buf)
	if err != nil {
		return nil, fmt.Errorf("bar %d: %w", req.Region, err)
	}
	return os.NewFile(fd, fmt.Sprintf("dmabuf:%s/bar%d", d.bdf, req.Region)), nil
}

// Reopen closes the device fd and opens the device again the same way, keeping the
// group and container (or the iommufd and IOAS) open. Because a device is open only once
// per process, this is the device's last close: every dma-buf exported so far is revoked
// for good. Buffers exported afterwards are live. If opening fails, the Device stays
// unusable (methods fail with errdefs.ErrUnavailable) until a later Reopen succeeds;
// Close still releases it.
func (d *Device) Reopen() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return opError("reopen", d.bdf, fmt.Errorf("device is closed: %w", os.ErrClosed))
	}
	var closeErr error
	if d.file != nil {
		// The kept copy goes first: the close below must be the device's last.
		if err := d.forget(); err != nil {
			return opError("reopen", d.bdf, err)
		}
		if d.keeper != nil {
			failpoint.Hit(failpoint.AfterFDStoreRemove)
		}
		closeErr = d.file.Close()
		d.file = nil
	}
	f, err := d.openAfterClose()
	if err != nil {
		d.reopenErr = err
		return opError("reopen", d.bdf, err)
	}
	d.file, d.reopenErr = f, nil
	if err := d.refreshLocked(); err != nil {
		return opError("reopen", d.bdf, err)
	}
	if err := d.keep(); err != nil {
		return opError("reopen", d.bdf, err)
	}
	return opError("reopen", d.bdf, closeErr)
}

// releaseWait bounds how long Reopen waits for a kept copy of the old device fd to be
// closed by its keeper.
const releaseWait = 5 * time.Second

// openAfterClose opens the device again after this process closed its fd. A kept copy
// (see [Keeper]) may still be on its way to being closed: systemd closes the fds it drops
// from its store asynchronously, after it has answered. Until the old open file is gone,
// the device is still open, and opening it again would keep the dma-bufs exported through
// the old file alive. The VFIO cdev path makes that visible: binding a second open of a
// device fails with EINVAL while another is open, so Reopen retries until the old file is
// released (bounded by releaseWait). The group path allows several opens and has no such
// signal; see the package documentation.
//
// The group path allows several opens of a device, but a group cannot leave its container
// while a device of it is open (VFIO_GROUP_UNSET_CONTAINER fails with EBUSY). When this
// device is the only one of its group this process has open, Reopen takes the group out
// of its container and puts it back until that succeeds — then the old file is gone —
// and opens the device after. With several devices of the group open that signal is
// unavailable: the reopen does not wait (see the package documentation).
func (d *Device) openAfterClose() (*os.File, error) {
	if d.keeper == nil || d.iommu != nil && d.iommu.borrowed {
		return d.openFD()
	}
	deadline := time.Now().Add(releaseWait)
	wait := 50 * time.Microsecond
	retry := func(err error) bool {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(wait)
		wait = min(2*wait, 10*time.Millisecond)
		return true
	}
	if d.mode == ModeGroup && d.reg.onlyDevice(d.grp) {
		for {
			err := d.reg.be.rejoin(d.grp)
			if err == nil {
				break
			}
			if !errors.Is(err, unix.EBUSY) || !retry(err) {
				return nil, fmt.Errorf("wait for the kept copy of the old device fd to close: %w", err)
			}
		}
	}
	for {
		f, err := d.openFD()
		if err == nil || d.mode != ModeCdev || !errors.Is(err, unix.EINVAL) || !retry(err) {
			return f, err
		}
	}
}

// Close closes the device fd, which revokes every dma-buf of the device for good, and
// releases the group and container (or iommufd) when this was their last device. It is
// idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return opError("close", d.bdf, d.release(true))
}

// Detach closes this process's fds of the device like Close, but leaves the copies the
// [Keeper] kept: the device stays open, and its dma-bufs live, for the next run of the
// process, which gets them back through Open. Without a Keeper it is Close. It is
// idempotent, and Close after it does nothing.
func (d *Device) Detach() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return opError("detach", d.bdf, d.release(d.keeper == nil))
}

// getDeviceInfo runs VFIO_DEVICE_GET_INFO, growing the buffer once if the capability
// chain does not fit.
func getDeviceInfo(f *os.File) (DeviceInfo, error) {
	ib := newInfoBuffer[deviceInfo](sizeofDeviceInfo)
	for attempt := 0; ; attempt++ {
		ib.hdr.Argsz = uint32(len(ib.buf))
		if _, err := ioctl.Bytes(f, "VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO, ib.buf); err != nil {
			return DeviceInfo{}, err
		}
		need := ib.hdr.Argsz
		if ib.hdr.Flags&VFIO_DEVICE_FLAGS_CAPS == 0 || need <= uint32(len(ib.buf)) || attempt > 0 {
			break
		}
		if need > maxInfoSize {
			return DeviceInfo{}, fmt.Errorf("VFIO_DEVICE_GET_INFO wants a %d-byte buffer", need)
		}
		ib = newInfoBuffer[deviceInfo](need)
	}
	info := DeviceInfo{Flags: ib.hdr.Flags, NumRegions: ib.hdr.NumRegions, NumIRQs: ib.hdr.NumIRQs}
	if ib.hdr.Flags&VFIO_DEVICE_FLAGS_CAPS != 0 {
		caps, err := parseCaps(ib.buf, ib.hdr.CapOffset, sizeofDeviceInfo)
		if err != nil {
			return DeviceInfo{}, fmt.Errorf("VFIO_DEVICE_GET_INFO: %w", err)
		}
		info.Caps = caps
	}
	return info, nil
}

// getRegionInfo runs VFIO_DEVICE_GET_REGION_INFO for index, growing the buffer once if
// the capability chain does not fit (the kernel then sets CAPS, reports the size it needs
// in argsz and leaves cap_offset 0, without failing).
func getRegionInfo(f *os.File, index int) (RegionInfo, error) {
	ib := newInfoBuffer[regionInfo](sizeofRegionInfo)
	for attempt := 0; ; attempt++ {
		ib.hdr.Argsz = uint32(len(ib.buf))
		ib.hdr.Index = uint32(index)
		if _, err := ioctl.Bytes(f, "VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO, ib.buf); err != nil {
			return RegionInfo{}, fmt.Errorf("region %d: %w", index, err)
		}
		need := ib.hdr.Argsz
		if ib.hdr.Flags&VFIO_REGION_INFO_FLAG_CAPS == 0 || need <= uint32(len(ib.buf)) || attempt > 0 {
			break
		}
		if need > maxInfoSize {
			return RegionInfo{}, fmt.Errorf("region %d: VFIO_DEVICE_GET_REGION_INFO wants a %d-byte buffer", index, need)
		}
		ib = newInfoBuffer[regionInfo](need)
	}
	r := RegionInfo{Index: index, Flags: ib.hdr.Flags, Size: ib.hdr.Size, Offset: ib.hdr.Offset}
	if ib.hdr.Flags&VFIO_REGION_INFO_FLAG_CAPS != 0 {
		caps, err := parseCaps(ib.buf, ib.hdr.CapOffset, sizeofRegionInfo)
		if err == nil {
			err = decodeRegionCaps(&r, caps)
		}
		if err != nil {
			return RegionInfo{}, fmt.Errorf("region %d: %w", index, err)
		}
	}
	return r, nil
}
