// Package brokertest provides an in-memory [broker.Device] for tests and benchmarks of the
// broker and everything above it. Its buffers are real file descriptors (memfds), so they
// can be passed over unix sockets like dma-bufs, but nothing touches VFIO.
package brokertest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// Device is a fake VFIO device. Every buffer it exports records its generation: a
// [Device.Revoke] kills all buffers exported before it, which [Buffer.Revoked] reports.
type Device struct {
	mu         sync.Mutex
	info       broker.DeviceInfo
	generation int // incremented by Revoke
	open       []*Buffer
	closed     bool
	// ExportErr, if set, makes the next Export fail with it (once).
	ExportErr error
	// RevokeErr, if set, makes Revoke fail with it.
	RevokeErr error
	// Revokes counts Revoke calls.
	Revokes int
	// PerBuffer makes the device a broker.BufferRevoker whose buffers die one by one.
	PerBuffer bool
	// BufferRevokes counts RevokeBuffer calls.
	BufferRevokes int
	// Suspended reports the memory decode state set by Suspend and Resume.
	Suspended bool
	// RevokeHook, if set, runs inside Revoke (e.g. to block it while a test queues more
	// revocations).
	RevokeHook func()

	notices chan broker.Notice

	// The fd store: a copy of every exported buffer until the broker closes its own while
	// the device is attached. Detach leaves the device open "outside the process"; the
	// next Opener call then restores it.
	store    map[uint64]*Buffer
	detached bool
	restored bool
}

// NewDevice returns a fake device with one 1 MiB memory BAR 0, one 256-byte memory BAR 1,
// an I/O BAR 2 and a 16 MiB prefetchable 64-bit BAR 4.
func NewDevice(bdf string) *Device {
	return &Device{info: broker.DeviceInfo{
		BDF: bdf, Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00, Driver: "vfio-pci",
		IOMMUGroup: 3, Mode: "group",
		BARs: []broker.BAR{
			{Index: 0, Size: 1 << 20, Mem: true},
			{Index: 1, Size: 256, Mem: true},
			{Index: 2, Size: 32},
			{Index: 4, Size: 16 << 20, Mem: true, Prefetch: true, Is64: true},
		},
	}}
}

// SetInfo replaces the device's description (e.g. to change TSM state).
func (d *Device) SetInfo(f func(*broker.DeviceInfo)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f(&d.info)
}

// Info implements broker.Device.
func (d *Device) Info() broker.DeviceInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.info
}

// Export implements broker.Device with a memfd of the ranges' total size.
func (d *Device) Export(bar int, ranges []broker.Range, name string) (broker.Buffer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("fake device %s: export: %w", d.info.BDF, unix.ENODEV)
	}
	if err := d.ExportErr; err != nil {
		d.ExportErr = nil
		return nil, err
	}
	f, ino, size, err := Memfd(name, ranges)
	if err != nil {
		return nil, err
	}
	b := &Buffer{f: f, inode: ino, size: size, dev: d, gen: d.generation, Name: name, BAR: bar}
	d.open = append(d.open, b)
	if d.store == nil {
		d.store = map[uint64]*Buffer{}
	}
	d.store[b.inode] = b
	return b, nil
}

// Memfd is a fake device's export: a memfd named name of the ranges' total size, opened as
// "/dmabuf:"+name (the file owns the fd), and its inode.
func Memfd(name string, ranges []broker.Range) (f *os.File, ino, size uint64, err error) {
	for _, r := range ranges {
		size += r.Length
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, 0, 0, os.NewSyscallError("memfd_create", err)
	}
	f = os.NewFile(uintptr(fd), "/dmabuf:"+name)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, 0, 0, os.NewSyscallError("ftruncate", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, 0, 0, os.NewSyscallError("fstat", err)
	}
	return f, st.Ino, size, nil
}

// Revoke implements broker.Device.
func (d *Device) Revoke() error {
	d.mu.Lock()
	hook := d.RevokeHook
	d.mu.Unlock()
	if hook != nil {
		hook()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.Revokes++
	if d.RevokeErr != nil {
		return d.RevokeErr
	}
	d.generation++
	return nil
}

// Detach implements broker.Detacher: the device stays open (its buffers live) for the
// next broker, which gets it back as restored.
func (d *Device) Detach() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed, d.detached = true, true
	if d.notices != nil {
		close(d.notices)
		d.notices = nil
	}
	return nil
}

// Restored implements broker.Restorer.
func (d *Device) Restored() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.restored
}

// AdoptBuffer implements broker.Restorer: a buffer exported before a Detach whose copy
// the broker never closed while attached.
func (d *Device) AdoptBuffer(ino uint64) (broker.Buffer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	old := d.store[ino]
	if old == nil || !d.restored {
		return nil, fmt.Errorf("fake device %s: no kept buffer ino %d: %w", d.info.BDF, ino, os.ErrNotExist)
	}
	nb := &Buffer{f: old.f, inode: old.inode, size: old.size, dev: d, gen: old.gen, Name: old.Name, BAR: old.BAR}
	old.handedOn = true
	d.store[ino] = nb
	d.open = append(d.open, nb)
	return nb, nil
}

// Kept returns the inodes of the buffers the fake fd store holds.
func (d *Device) Kept() []uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []uint64
	for ino := range d.store {
		out = append(out, ino)
	}
	slices.Sort(out)
	return out
}

// Close implements broker.Device: every buffer exported so far counts as revoked.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	clear(d.store)
	d.generation++
	if d.notices != nil {
		close(d.notices)
		d.notices = nil
	}
	return nil
}

// CanRevokeBuffers implements broker.BufferRevoker.
func (d *Device) CanRevokeBuffers() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.PerBuffer
}

// RevokeBuffer implements broker.BufferRevoker.
func (d *Device) RevokeBuffer(buf broker.Buffer) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	b, ok := buf.(*Buffer)
	if !ok || b.dev != d {
		return fmt.Errorf("fake device %s: revoke of a foreign buffer: %w", d.info.BDF, unix.EINVAL)
	}
	d.BufferRevokes++
	b.revoked = true
	return nil
}

// Suspend implements broker.Suspender.
func (d *Device) Suspend() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.Suspended = true
	return nil
}

// Resume implements broker.Suspender.
func (d *Device) Resume() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.Suspended = false
	return nil
}

// Notices implements broker.Notifier: the channel [Device.Notify] sends on, closed by
// Close.
func (d *Device) Notices() <-chan broker.Notice {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.notices == nil {
		d.notices = make(chan broker.Notice, 16)
	}
	return d.notices
}

// Notify raises a notice as the kernel would (e.g. a release request on unbind). It
// reports false if the device is closed.
func (d *Device) Notify(kind broker.NoticeKind) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.notices == nil {
		return false
	}
	d.notices <- broker.Notice{Kind: kind, Count: 1}
	return true
}

// Locked runs f with the device's lock held, for race-free access to its exported
// counters and knobs.
func (d *Device) Locked(f func(d *Device)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f(d)
}

// OpenBuffers returns the buffers the broker has not closed.
func (d *Device) OpenBuffers() []*Buffer {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*Buffer
	for _, b := range d.open {
		if !b.closed {
			out = append(out, b)
		}
	}
	return out
}

// Buffer is a fake dma-buf backed by a memfd.
type Buffer struct {
	f        *os.File
	inode    uint64
	size     uint64
	dev      *Device
	gen      int
	closed   bool // guarded by dev.mu
	revoked  bool // by RevokeBuffer; guarded by dev.mu
	handedOn bool // its file went to an adopted Buffer; guarded by dev.mu
	// Name and BAR are what the buffer was exported with.
	Name string
	BAR  int
}

// Inode implements broker.Buffer.
func (b *Buffer) Inode() uint64 { return b.inode }

// Size implements broker.Buffer.
func (b *Buffer) Size() uint64 { return b.size }

// Dup implements broker.Buffer.
func (b *Buffer) Dup() (*os.File, error) {
	b.dev.mu.Lock()
	closed := b.closed
	b.dev.mu.Unlock()
	if closed {
		return nil, fmt.Errorf("dup: %w", os.ErrClosed)
	}
	var nfd int
	var err error
	cerr := rawControl(b.f, func(fd uintptr) {
		nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err = errors.Join(cerr, err); err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return os.NewFile(uintptr(nfd), b.f.Name()), nil
}

// Revoked reports whether a device revoke or close happened after this buffer's export.
func (b *Buffer) Revoked() bool {
	b.dev.mu.Lock()
	defer b.dev.mu.Unlock()
	return b.revoked || b.gen != b.dev.generation
}

// Close implements broker.Buffer.
func (b *Buffer) Close() error {
	b.dev.mu.Lock()
	if b.closed {
		b.dev.mu.Unlock()
		return nil
	}
	b.closed = true
	keep := b.dev.detached || b.handedOn
	if !keep && b.dev.store[b.inode] == b {
		delete(b.dev.store, b.inode)
	}
	b.dev.mu.Unlock()
	if keep {
		return nil // the fd store's copy stays open
	}
	return b.f.Close()
}

func rawControl(f *os.File, fn func(fd uintptr)) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(fn)
}

// Opener returns a broker.Opener serving the given fake devices by BDF; any other address
// fails with ENODEV.
func Opener(devs ...*Device) broker.Opener {
	return func(bdf string) (broker.Device, error) {
		for _, d := range devs {
			if d.info.BDF == bdf {
				d.mu.Lock()
				d.restored = d.detached
				d.closed, d.detached = false, false
				if !d.restored {
					clear(d.store)
				}
				d.mu.Unlock()
				return d, nil
			}
		}
		return nil, fmt.Errorf("no such fake device %s: %w", bdf, syscall.ENODEV)
	}
}

// Process is a fake holder process for tests.
type Process struct {
	Pid    int32
	mu     sync.Mutex
	dead   bool
	closed bool
	exit   chan struct{} // closed by Exit
}

func (p *Process) exitCh() chan struct{} {
	if p.exit == nil {
		p.exit = make(chan struct{})
	}
	return p.exit
}

// Wait implements broker.Process.
func (p *Process) Wait(ctx context.Context) error {
	p.mu.Lock()
	ch := p.exitCh()
	p.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// PID implements broker.Process.
func (p *Process) PID() int32 { return p.Pid }

// Alive implements broker.Process.
func (p *Process) Alive() bool { p.mu.Lock(); defer p.mu.Unlock(); return !p.dead }

// Exit marks the process dead and wakes its waiters.
func (p *Process) Exit() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.dead {
		p.dead = true
		close(p.exitCh())
	}
}

// Close implements broker.Process.
func (p *Process) Close() error { p.mu.Lock(); p.closed = true; p.mu.Unlock(); return nil }

// Closed reports whether the broker closed the process handle.
func (p *Process) Closed() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.closed }
