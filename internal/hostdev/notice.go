package hostdev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// NoticeKind says what the kernel signalled about a device (the broker's type, so that a
// Device is a broker.Notifier).
type NoticeKind = broker.NoticeKind

// Notice kinds.
const (
	// NoticeRelease: the kernel asks for the device back: a driver unbind or a hot-unplug
	// is pending and waits until the device is closed (VFIO_PCI_REQ_IRQ_INDEX). The kernel
	// asks again every 10 s while the device stays open.
	NoticeRelease = broker.NoticeRelease
	// NoticeError: the device reported an uncorrectable PCI Express error (AER, through
	// VFIO_PCI_ERR_IRQ_INDEX). Only PCI Express devices have this notifier.
	NoticeError = broker.NoticeError
)

// irqIndex is the VFIO IRQ index behind k.
func irqIndex(k NoticeKind) uint32 {
	if k == NoticeError {
		return vfio.VFIO_PCI_ERR_IRQ_INDEX
	}
	return vfio.VFIO_PCI_REQ_IRQ_INDEX
}

// Notice is one signal from the kernel about the device: its Count is how many times the
// kernel signalled since the previous notice of this kind (the eventfd counter), at
// least 1; its Time is when the notice was read.
type Notice = broker.Notice

// defaultNoticeBuffer is the capacity of the Notices channel when Options.NoticeBuffer
// is 0.
const defaultNoticeBuffer = 16

// noticeKinds lists the notifiers every Device registers, in order.
var noticeKinds = [...]NoticeKind{NoticeRelease, NoticeError}

// watcher is one kernel notifier: an eventfd registered for an IRQ index, and the
// goroutine that turns its signals into Notices.
type watcher struct {
	kind NoticeKind
	// ev is the eventfd (EFD_CLOEXEC|EFD_NONBLOCK, read through the runtime poller). The
	// Device owns it from Open to Close: Close closes it, which ends the goroutine. nil if
	// the device has no such notifier.
	ev *os.File
	// err is why the notifier is not registered with the kernel, nil while it is. Guarded
	// by Device.mu.
	err error
}

// newEventfd returns a new eventfd counter, close-on-exec and non-blocking, as an
// *os.File that the runtime poller serves: a Read parks the goroutine, not an OS thread.
func newEventfd(name string) (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("eventfd", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// startNotifiers creates and registers an eventfd for each notice kind and starts their
// readers. A device without a notifier (errdefs.ErrNotSupported, e.g. the AER notifier
// of a conventional PCI device) goes without it; any other failure fails Open. Called
// by open before the Device is shared.
func (d *Device) startNotifiers() error {
	for i, kind := range noticeKinds {
		w := &watcher{kind: kind}
		d.watchers[i] = w
		ev, err := newEventfd(fmt.Sprintf("eventfd:%s/%s", d.bdf, kind))
		if err != nil {
			return fmt.Errorf("device %s: %s notifier: %w", d.bdf, kind, err)
		}
		if err := d.dev.SetIRQEventfd(irqIndex(kind), ev); err != nil {
			ev.Close()
			if errors.Is(err, errdefs.ErrNotSupported) {
				w.err = err
				d.log.Info("device has no kernel notifier of this kind", "bdf", d.bdf, "notice", kind.String(), "reason", err)
				continue
			}
			return fmt.Errorf("device %s: %s notifier: %w", d.bdf, kind, err)
		}
		w.ev = ev
		d.wg.Add(1)
		go d.watch(w)
	}
	return nil
}

// reregisterLocked registers the eventfds again after the device fd was reopened (the
// kernel drops them with the fd). A failure is logged and kept in the watcher's err, not
// returned: the revoke it follows has succeeded. d.mu is held.
func (d *Device) reregisterLocked() {
	for _, w := range d.watchers {
		if w == nil || w.ev == nil {
			continue
		}
		w.err = d.dev.SetIRQEventfd(irqIndex(w.kind), w.ev)
		if w.err != nil {
			d.log.Error("re-registering the kernel notifier after reopen failed: notices of this kind are lost",
				"bdf", d.bdf, "notice", w.kind.String(), "err", w.err)
		}
	}
}

// unregisteredLocked marks every registered notifier as gone with the device fd, after a
// failed reopen. d.mu is held.
func (d *Device) unregisteredLocked(why error) {
	for _, w := range d.watchers {
		if w != nil && w.ev != nil {
			w.err = fmt.Errorf("device %s: %s notifier: no device fd: %w", d.bdf, w.kind, why)
		}
	}
}

// watch reads w's eventfd until it is closed and delivers one Notice per read.
func (d *Device) watch(w *watcher) {
	defer d.wg.Done()
	var b [8]byte
	for {
		n, err := w.ev.Read(b[:])
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				d.log.Error("reading the kernel notifier failed; no more notices of this kind",
					"bdf", d.bdf, "notice", w.kind.String(), "err", err)
			}
			return
		}
		if n != len(b) {
			continue // an eventfd read is always 8 bytes
		}
		nt := Notice{Kind: w.kind, Count: binary.NativeEndian.Uint64(b[:]), Time: time.Now()}
		switch w.kind {
		case NoticeRelease:
			d.log.Warn("the kernel asks for the device back (driver unbind or hot-unplug pending)", "bdf", d.bdf, "count", nt.Count)
		case NoticeError:
			d.log.Warn("the device reported an AER error", "bdf", d.bdf, "count", nt.Count)
		}
		d.deliver(nt)
	}
}

// deliver queues nt on the Notices channel without ever blocking: when the channel is
// full the notice is dropped and counted ([Device.DroppedNotices]). For NoticeRelease
// the kernel asks again every 10 s, so a dropped request comes back.
func (d *Device) deliver(nt Notice) {
	select {
	case d.notices <- nt:
	default:
		n := d.dropped.Add(1)
		d.log.Warn("notice channel full; notice dropped", "bdf", d.bdf, "notice", nt.Kind.String(), "dropped_total", n)
	}
}

// stopNotifiers closes the eventfds, waits for the readers to end and closes the Notices
// channel. Called once, by Close or by a failed open.
func (d *Device) stopNotifiers() error {
	var errs []error
	for _, w := range d.watchers {
		if w != nil && w.ev != nil {
			errs = append(errs, w.ev.Close())
		}
	}
	d.wg.Wait()
	close(d.notices)
	return errors.Join(errs...)
}

// Notices returns the channel on which the Device delivers what the kernel signals about
// it: [NoticeRelease] when an unbind or hot-unplug waits for the device (the receiver
// should end the device's leases and Close it promptly: the kernel's unbind blocks until
// then), and [NoticeError] for AER errors. The channel is buffered (Options.NoticeBuffer);
// when it is full, notices are dropped and counted, never blocking the reader. It is
// closed by [Device.Close], after the last notice.
func (d *Device) Notices() <-chan Notice { return d.notices }

// DroppedNotices returns how many notices were dropped because the Notices channel was
// full.
func (d *Device) DroppedNotices() uint64 { return d.dropped.Load() }

// Notifier reports whether the kernel notifier behind kind is registered: nil if it is,
// otherwise why not: errdefs.ErrNotSupported when the device has none (a conventional PCI
// device has no AER notifier), or the error of registering it again after a revoke.
func (d *Device) Notifier(kind NoticeKind) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.watchers {
		if w != nil && w.kind == kind {
			if d.closed {
				return fmt.Errorf("device %s: %s notifier: device is closed: %w", d.bdf, kind, os.ErrClosed)
			}
			return w.err
		}
	}
	return fmt.Errorf("device %s: no notifier of kind %s: %w", d.bdf, kind, errdefs.ErrInvalidArgument)
}
