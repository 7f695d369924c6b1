package hostdev

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/failpoint"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
	"golang.org/x/sys/unix"
)

// Options configures [Open].
type Options struct {
	// Mode is the VFIO access path: "auto" (or ""), "group" or "cdev" (see vfio.Mode).
	Mode string
	// Sysfs locates the device; its zero value is the real /sys.
	Sysfs pci.Sysfs
	// DevRoot is where the vfio and iommu device nodes live; "" means "/dev".
	DevRoot string
	// ManagedBind binds the device to vfio-pci before opening it (driver_override), and
	// restores its previous driver on Close. Off by default: the operator binds devices.
	ManagedBind bool
	// Log receives one line per device event (opened, revoked, closed, kernel notices);
	// nil discards.
	Log *slog.Logger
	// NoticeBuffer is the capacity of the [Device.Notices] channel; 0 means 16.
	NoticeBuffer int
	// Keeper, when set, keeps the device's VFIO fds and its exported dma-bufs outside the
	// process (the systemd fd store), and Open takes back what a previous run kept: see
	// vfio.Keeper, [Device.Restored], [Device.AdoptBuffer] and [Device.Detach].
	Keeper vfio.Keeper
}

// vfioDevice is the part of *vfio.Device that Device uses; tests substitute a fake.
type vfioDevice interface {
	Mode() vfio.Mode
	DMABufSupported() error
	ExportDMABuf(bar int, ranges []vfio.DMARange, openFlags int) (*os.File, error)
	SetMemoryEnable(on bool) error
	SetIRQEventfd(index uint32, ev *os.File) error
	DMABufRevokeSupported() error
	RevokeDMABuf(buf *os.File) error
	Reopen() error
	Close() error
	Detach() error
	Restored() bool
}

// Device is an opened host PCI device, usable by the broker. It implements broker.Device.
// All methods are safe for concurrent use; Export, Revoke and Close are serialized, so no
// buffer is exported while a revoke is in progress.
type Device struct {
	addr pci.Address
	bdf  string
	opt  Options
	log  *slog.Logger

	mu       sync.Mutex
	dev      vfioDevice // guarded by mu
	snapshot pci.Device // guarded by mu; the last sysfs snapshot that could be read
	bound    bool       // guarded by mu; Open moved the device to vfio-pci
	previous string     // guarded by mu; its driver before that
	closed   bool       // guarded by mu

	// Kernel notifiers (notice.go). watchers is filled by Open; each watcher's err is
	// guarded by mu.
	watchers [len(noticeKinds)]*watcher
	notices  chan Notice // buffered; closed by Close after the readers have ended
	dropped  atomic.Uint64
	wg       sync.WaitGroup // the watcher goroutines
}

// Open opens the device at bdf through VFIO (see [Options]), enables its memory decode
// and registers the kernel notifiers whose signals [Device.Notices] delivers. Errors name
// the device; a device not bound to a VFIO driver (without ManagedBind) is
// errdefs.ErrFailedPrecondition.
func Open(bdf pci.Address, opt Options) (*Device, error) {
	return open(bdf, opt, func(a pci.Address, o vfio.OpenOptions) (vfioDevice, pci.Device, error) {
		o.Keeper = opt.Keeper
		d, err := vfio.Open(a, o)
		if err != nil {
			return nil, pci.Device{}, err
		}
		return d, d.PCI(), nil
	})
}

type openFunc func(pci.Address, vfio.OpenOptions) (vfioDevice, pci.Device, error)

func open(addr pci.Address, opt Options, openVFIO openFunc) (_ *Device, err error) {
	d := &Device{addr: addr, bdf: addr.String(), opt: opt, log: opt.Log}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if opt.NoticeBuffer < 0 {
		return nil, fmt.Errorf("device %s: notice buffer %d: %w", d.bdf, opt.NoticeBuffer, errdefs.ErrInvalidArgument)
	}
	nb := opt.NoticeBuffer
	if nb == 0 {
		nb = defaultNoticeBuffer
	}
	d.notices = make(chan Notice, nb)
	if opt.ManagedBind {
		prev, err := opt.Sysfs.BindVFIO(addr)
		if err != nil {
			return nil, err
		}
		if prev != pci.VFIODriver {
			d.bound, d.previous = true, prev
			d.log.Info("bound device to vfio-pci", "bdf", d.bdf, "previous_driver", prev)
		}
	}
	defer func() {
		if err != nil && d.bound {
			err = errors.Join(err, d.restore())
		}
	}()
	dev, snap, err := openVFIO(addr, vfio.OpenOptions{Mode: opt.Mode, Sysfs: opt.Sysfs, DevRoot: opt.DevRoot})
	if err != nil {
		return nil, err
	}
	if err := dev.SetMemoryEnable(true); err != nil {
		return nil, errors.Join(err, dev.Close())
	}
	d.dev, d.snapshot = dev, snap
	if err := d.startNotifiers(); err != nil {
		// Close the device first: the kernel drops its eventfd references with the fd.
		return nil, errors.Join(err, dev.Close(), d.stopNotifiers())
	}
	d.log.Info("opened device", "bdf", d.bdf, "mode", string(dev.Mode()), "driver", snap.Driver)
	return d, nil
}

// restore puts the device back on the driver it had before Open bound it to vfio-pci.
func (d *Device) restore() error {
	if err := d.opt.Sysfs.RestoreDriver(d.addr, d.previous); err != nil {
		d.log.Warn("restoring the previous driver failed", "bdf", d.bdf, "previous_driver", d.previous, "err", err)
		return err
	}
	d.log.Info("restored previous driver", "bdf", d.bdf, "previous_driver", d.previous)
	d.bound = false
	return nil
}

// Info returns a fresh snapshot of the device: sysfs is read again (driver, TSM state); if
// that fails, the last snapshot is used. DMABuf says whether the device can export.
func (d *Device) Info() broker.DeviceInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p, err := d.opt.Sysfs.Device(d.addr); err == nil {
		d.snapshot = p
	} else {
		d.log.Warn("reading the device from sysfs failed; reporting the last snapshot", "bdf", d.bdf, "err", err)
	}
	p := d.snapshot
	info := broker.DeviceInfo{
		BDF:        d.bdf,
		Vendor:     p.Vendor,
		DeviceID:   p.DeviceID,
		Class:      p.Class,
		Driver:     p.Driver,
		IOMMUGroup: p.IOMMUGroup,
		TSM:        broker.TSMState{Present: p.TSM.Present, Connect: p.TSM.Connect, Bound: p.TSM.Bound},
	}
	for _, b := range p.BARs {
		if b.Size > 0 && (b.Mem || b.IO) {
			info.BARs = append(info.BARs, broker.BAR{Index: b.Index, Size: b.Size, Mem: b.Mem, Prefetch: b.Prefetch, Is64: b.Is64})
		}
	}
	info.Mode = string(d.dev.Mode())
	if d.closed {
		info.DMABuf = fmt.Errorf("device %s is closed: %w", d.bdf, errdefs.ErrUnavailable)
	} else {
		info.DMABuf = d.dev.DMABufSupported()
	}
	return info
}

// Export exports ranges of BAR bar as a new dma-buf (read-write, close-on-exec) and names
// it name (DMA_BUF_SET_NAME, at most 31 bytes; "" leaves it unnamed). The buffer is the
// caller's; see vfio.Device.ExportDMABuf for the checks and errors.
func (d *Device) Export(bar int, ranges []broker.Range, name string) (broker.Buffer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("device %s: export: device is closed: %w", d.bdf, os.ErrClosed)
	}
	vr := make([]vfio.DMARange, len(ranges))
	for i, r := range ranges {
		vr[i] = vfio.DMARange{Offset: r.Offset, Length: r.Length}
	}
	f, err := d.dev.ExportDMABuf(bar, vr, unix.O_RDWR)
	if err != nil {
		return nil, err
	}
	buf, err := dmabuf.New(f) // closes f on error
	if err != nil {
		return nil, fmt.Errorf("device %s bar %d: export: %w", d.bdf, bar, err)
	}
	if name != "" {
		if err := buf.SetName(name); err != nil {
			return nil, errors.Join(fmt.Errorf("device %s bar %d: export: %w", d.bdf, bar, err), buf.Close())
		}
	}
	if d.opt.Keeper == nil {
		return buf, nil
	}
	kb := &keptBuffer{Buffer: buf, keeper: d.opt.Keeper, name: BufferKeepName(buf.Inode())}
	if err := d.opt.Keeper.Keep(kb.name, buf.File()); err != nil {
		return nil, errors.Join(fmt.Errorf("device %s bar %d: export: keep the dma-buf: %w", d.bdf, bar, err), buf.Close())
	}
	return kb, nil
}

// BufferKeepPrefix starts the names under which exported dma-bufs are kept.
const BufferKeepPrefix = "dmabuf."

// BufferKeepName is the name under which the dma-buf with inode ino is kept: inodes are
// unique per boot, so a reissued lease's new buffer never shares its old one's name.
func BufferKeepName(ino uint64) string { return BufferKeepPrefix + strconv.FormatUint(ino, 10) }

// keptBuffer is an exported dma-buf whose copy the Keeper holds; Close drops that too.
type keptBuffer struct {
	*dmabuf.Buffer
	keeper vfio.Keeper
	name   string
	once   sync.Once
}

// Close drops the kept copy, then closes the buffer. It revokes nothing.
func (b *keptBuffer) Close() error {
	var err error
	b.once.Do(func() { err = errors.Join(b.keeper.Forget(b.name), b.Buffer.Close()) })
	return err
}

// AdoptBuffer takes back the dma-buf with inode ino that a previous run of the process
// exported from this device and kept (see [Options.Keeper]). It is live only if the
// device was restored too ([Device.Restored]).
func (d *Device) AdoptBuffer(ino uint64) (broker.Buffer, error) {
	if d.opt.Keeper == nil {
		return nil, fmt.Errorf("device %s: adopt dma-buf ino %d: nothing is kept: %w", d.bdf, ino, errdefs.ErrNotFound)
	}
	name := BufferKeepName(ino)
	f := d.opt.Keeper.Take(name)
	if f == nil {
		return nil, fmt.Errorf("device %s: adopt dma-buf ino %d: not kept: %w", d.bdf, ino, errdefs.ErrNotFound)
	}
	buf, err := dmabuf.New(f) // closes f on error
	if err != nil {
		return nil, fmt.Errorf("device %s: adopt dma-buf ino %d: %w", d.bdf, ino, err)
	}
	if buf.Inode() != ino {
		return nil, errors.Join(fmt.Errorf("device %s: adopt dma-buf: kept as ino %d but is ino %d: %w", d.bdf, ino, buf.Inode(), errdefs.ErrFailedPrecondition), buf.Close())
	}
	return &keptBuffer{Buffer: buf, keeper: d.opt.Keeper, name: name}, nil
}

// Restored reports whether the device fd came back from the Keeper: the previous run's
// dma-bufs are still live, and nothing was revoked by the restart.
func (d *Device) Restored() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dev.Restored()
}

// Revoke makes every dma-buf exported so far dead for good: memory decode off, device fd
// closed and reopened, memory decode on. Buffers exported afterwards are live. It goes on
// through the steps when one fails (the reopen is what makes the revoke permanent) and
// returns every error.
func (d *Device) Revoke() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("device %s: revoke: device is closed: %w", d.bdf, os.ErrClosed)
	}
	errOff := d.dev.SetMemoryEnable(false)
	failpoint.Hit(failpoint.MidCycle)
	errReopen := d.dev.Reopen()
	var errOn error
	if errReopen == nil {
		// The old fd took the kernel notifiers with it.
		d.reregisterLocked()
		errOn = d.dev.SetMemoryEnable(true)
	} else {
		d.unregisteredLocked(errReopen)
	}
	err := errors.Join(errOff, errReopen, errOn)
	if err != nil {
		d.log.Error("revoking the device's dma-bufs failed", "bdf", d.bdf, "err", err)
		return err
	}
	d.log.Info("revoked all dma-bufs of the device", "bdf", d.bdf)
	return nil
}

// Close closes the device (revoking every dma-buf exported from it for good) and, with
// managed binding, restores its previous driver. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	// The device fd first: its close drops the kernel's eventfd references and lets a
	// pending unbind complete; then the eventfds, which ends the notice readers.
	err := d.dev.Close()
	if d.bound {
		err = errors.Join(err, d.restore())
	}
	err = errors.Join(err, d.stopNotifiers())
	d.log.Info("closed device", "bdf", d.bdf)
	return err
}

// Detach lets go of the device without revoking anything: this process's fds are closed,
// the kept copies stay (see [Options.Keeper]), the previous driver is not restored, and
// the notifiers stop. The next run of the process takes the device back with Open.
// Without a Keeper it is Close. Close after Detach does nothing.
func (d *Device) Detach() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := errors.Join(d.dev.Detach(), d.stopNotifiers())
	d.log.Info("detached device (kept open for the next run)", "bdf", d.bdf)
	return err
}

// RevokeBuffers revokes the given buffers (as returned by [Device.Export], usually
// *dmabuf.Buffer), for good, leaving
// the device's other buffers live: the per-buffer revoke
// (vfio.Device.RevokeDMABuf, the proposed VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE). Whether
// the kernel has it is probed once per device. Where it does not (Linux 7.2 and every
// released kernel) RevokeBuffers does nothing and returns a *vfio.FeatureError matching
// errdefs.ErrNotSupported: the caller then falls back to [Device.Revoke], which kills
// every buffer of the device. Each buffer is duplicated for the call, so a concurrent
// Close of a buffer is safe; an already closed buffer is an error (os.ErrClosed) and the
// others are still revoked. It returns every error.
func (d *Device) RevokeBuffers(bufs ...broker.Buffer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("device %s: revoke buffers: device is closed: %w", d.bdf, os.ErrClosed)
	}
	if err := d.dev.DMABufRevokeSupported(); err != nil {
		return err
	}
	var errs []error
	for _, b := range bufs {
		f, err := b.Dup()
		if err != nil {
			errs = append(errs, fmt.Errorf("device %s: revoke buffer: %w", d.bdf, err))
			continue
		}
		err = d.dev.RevokeDMABuf(f)
		f.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("device %s: revoke buffer ino %d: %w", d.bdf, b.Inode(), err))
			continue
		}
		d.log.Info("revoked dma-buf", "bdf", d.bdf, "inode", b.Inode())
	}
	return errors.Join(errs...)
}

// CanRevokeBuffers implements broker.BufferRevoker: whether the kernel revokes one
// dma-buf at a time (VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE; not in Linux 7.2).
func (d *Device) CanRevokeBuffers() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return !d.closed && d.dev.DMABufRevokeSupported() == nil
}

// RevokeBuffer implements broker.BufferRevoker.
func (d *Device) RevokeBuffer(buf broker.Buffer) error { return d.RevokeBuffers(buf) }

// Suspend implements broker.Suspender: memory decode off, so every dma-buf of the device
// is revoked until [Device.Resume] (importers such as iommufd drop their mappings for good
// and must map again).
func (d *Device) Suspend() error { return d.setMemory(false, "suspend") }

// Resume implements broker.Suspender: memory decode on again.
func (d *Device) Resume() error { return d.setMemory(true, "resume") }

func (d *Device) setMemory(on bool, op string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("device %s: %s: device is closed: %w", d.bdf, op, os.ErrClosed)
	}
	if err := d.dev.SetMemoryEnable(on); err != nil {
		return fmt.Errorf("device %s: %s: %w", d.bdf, op, err)
	}
	d.log.Info("device "+op+"d", "bdf", d.bdf)
	return nil
}
