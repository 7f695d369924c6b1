package bench

import (
	"fmt"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// keptDevicePrefix starts the fd store name of a kept device's marker.
const keptDevicePrefix = "bench-device."

// keptName is the fd store name of the marker of the fake device bdf (fd names may not
// hold a ':').
func keptName(bdf string) string { return keptDevicePrefix + strings.ReplaceAll(bdf, ":", "-") }

// keptDevice is a fake device for the scale scenario, whose daemon restarts as a new
// process. Its dma-bufs are memfds, as brokertest's, but it keeps nothing per buffer (the
// broker's copy is its only reference), so that the daemon's memory per lease is the
// daemon's alone; and it survives a restart of the daemon process the way a real device
// does: hostdev keeps the VFIO device fd in systemd's fd store, this device keeps a marker
// memfd there (through the daemon's vfio.Keeper), and a daemon that finds the marker at
// start knows the device was kept open (broker.Restorer), so that it takes the leases back
// as they were instead of reissuing them.
//
// A restored device cannot give back the broker's copy of an unclaimed lease's dma-buf
// (AdoptBuffer fails: buffers are not kept in the fd store, as real ones are), so such a
// lease is reissued at restart, with a warning in the daemon's log; the scale scenario
// restarts with every lease claimed, whose dma-bufs live in their holders only.
type keptDevice struct {
	info   broker.DeviceInfo
	keeper vfio.Keeper // nil: no fd store
	name   string      // the marker's fd store name

	mu       sync.Mutex
	restored bool // guarded by mu
	kept     bool // guarded by mu; the marker is in the fd store
	closed   bool // guarded by mu
	detached bool // guarded by mu; let go by Detach, its buffers live
}

// keptOpener returns the opener of the kept devices with the addresses bdfs, keeping
// their markers with keeper (nil: no fd store, so nothing is kept). A device's first open
// in the process takes its marker back if a previous run kept it, which makes it restored.
func keptOpener(keeper vfio.Keeper, bdfs []string) broker.Opener {
	devs := map[string]*keptDevice{}
	for _, bdf := range bdfs {
		devs[bdf] = &keptDevice{info: brokertest.NewDevice(bdf).Info(), keeper: keeper, name: keptName(bdf)}
	}
	return func(bdf string) (broker.Device, error) {
		d := devs[bdf]
		if d == nil {
			return nil, fmt.Errorf("no such fake device %s: %w", bdf, unix.ENODEV)
		}
		if err := d.open(); err != nil {
			return nil, fmt.Errorf("fake device %s: %w", bdf, err)
		}
		return d, nil
	}
}

// open (re)opens the device: restored if its marker came back from the fd store, else
// with a new marker kept there.
func (d *keptDevice) open() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed, d.restored = false, d.detached
	d.detached = false
	if d.keeper == nil || d.kept {
		return nil
	}
	if f := d.keeper.Take(d.name); f != nil {
		// The fd store keeps its copy; this one is not needed.
		f.Close()
		d.restored, d.kept = true, true
		return nil
	}
	fd, err := unix.MemfdCreate(d.name, unix.MFD_CLOEXEC)
	if err != nil {
		return os.NewSyscallError("memfd_create", err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+d.name)
	defer f.Close()
	if err := d.keeper.Keep(d.name, f); err != nil {
		return fmt.Errorf("keep %s in the fd store: %w", d.name, err)
	}
	d.kept = true
	return nil
}

// Info implements broker.Device.
func (d *keptDevice) Info() broker.DeviceInfo { return d.info }

// Export implements broker.Device with a memfd of the ranges' total size.
func (d *keptDevice) Export(bar int, ranges []broker.Range, name string) (broker.Buffer, error) {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("fake device %s: export: %w", d.info.BDF, unix.ENODEV)
	}
	f, ino, size, err := brokertest.Memfd(name, ranges)
	if err != nil {
		return nil, err
	}
	return &memBuffer{f: f, inode: ino, size: size}, nil
}

// Revoke implements broker.Device. A memfd cannot be revoked: the fake's cycle does
// nothing (brokertest's counts a generation, which nobody reads here).
func (d *keptDevice) Revoke() error { return nil }

// Close implements broker.Device: the device is closed for good (a draining stop), so its
// marker leaves the fd store and the next start opens it afresh.
func (d *keptDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if !d.kept {
		return nil
	}
	d.kept = false
	if err := d.keeper.Forget(d.name); err != nil {
		return fmt.Errorf("fake device %s: forget %s: %w", d.info.BDF, d.name, err)
	}
	return nil
}

// Detach implements broker.Detacher: the marker stays in the fd store for the next run.
func (d *keptDevice) Detach() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed, d.detached = true, true
	return nil
}

// Restored implements broker.Restorer.
func (d *keptDevice) Restored() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.restored
}

// errNotKept is AdoptBuffer's answer. One error for every call: a restart asks for the
// buffer of every lease whose record still has a claim token's digest, and the fake's
// cost should not count as the daemon's.
var errNotKept = fmt.Errorf("fake device: buffers are not kept across restarts: %w", os.ErrNotExist)

// AdoptBuffer implements broker.Restorer: buffers are not kept (see keptDevice).
func (d *keptDevice) AdoptBuffer(uint64) (broker.Buffer, error) { return nil, errNotKept }

// memBuffer is a keptDevice's dma-buf: a memfd.
type memBuffer struct {
	f     *os.File
	inode uint64
	size  uint64
}

// Inode implements broker.Buffer.
func (b *memBuffer) Inode() uint64 { return b.inode }

// Size implements broker.Buffer.
func (b *memBuffer) Size() uint64 { return b.size }

// Dup implements broker.Buffer.
func (b *memBuffer) Dup() (*os.File, error) {
	rc, err := b.f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	var nfd int
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	return os.NewFile(uintptr(nfd), b.f.Name()), nil
}

// Close implements broker.Buffer.
func (b *memBuffer) Close() error { return b.f.Close() }
