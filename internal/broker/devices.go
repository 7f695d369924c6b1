package broker

import (
	"errors"
	"fmt"
	"slices"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// SuspendDevice pauses every dma-buf of device bdf for maintenance (memory decode off;
// admins only). The leases stay live; their holders get a suspended event. New leases are
// refused until [Broker.ResumeDevice].
func (b *Broker) SuspendDevice(bdf string, by Actor) (DeviceStatus, error) {
	return b.suspendResume(bdf, by, true)
}

// ResumeDevice ends a [Broker.SuspendDevice]: memory decode on, dma-bufs usable again. The
// holders get a resumed event: importers that dropped their mappings on the suspend
// (iommufd does) must map the fd again.
func (b *Broker) ResumeDevice(bdf string, by Actor) (DeviceStatus, error) {
	return b.suspendResume(bdf, by, false)
}

func (b *Broker) suspendResume(bdf string, by Actor, suspend bool) (DeviceStatus, error) {
	verb := map[bool]string{true: "suspend", false: "resume"}[suspend]
	if !by.Admin {
		return DeviceStatus{}, fmt.Errorf("%s device %s: %s is not an admin: %w", verb, bdf, by, errdefs.ErrPermissionDenied)
	}
	d, err := b.deviceFor(bdf)
	if err != nil {
		return DeviceStatus{}, err
	}
	var st DeviceStatus
	if werr := d.w.run(func() { st, err = b.suspendResumeOn(d, by, suspend) }); werr != nil {
		return DeviceStatus{}, werr
	}
	return st, err
}

// suspendResumeOn is suspendResume's work on d's worker.
func (b *Broker) suspendResumeOn(d *device, by Actor, suspend bool) (_ DeviceStatus, err error) {
	bdf := d.policy.BDF
	verb, done := "resume", "resumed"
	if suspend {
		verb, done = "suspend", "suspended"
	}
	b.mu.Lock()
	dev, state := d.dev, d.suspended
	b.mu.Unlock()
	if dev == nil {
		return DeviceStatus{}, fmt.Errorf("%s device %s: %w: %w", verb, bdf, d.err, errdefs.ErrFailedPrecondition)
	}
	if state == suspend {
		return DeviceStatus{}, fmt.Errorf("%s device %s: it is already %s: %w", verb, bdf, done, errdefs.ErrFailedPrecondition)
	}
	s, ok := dev.(Suspender)
	if !ok {
		return DeviceStatus{}, fmt.Errorf("%s device %s: %w", verb, bdf, errdefs.ErrNotSupported)
	}
	if suspend {
		err = s.Suspend()
	} else {
		err = s.Resume()
	}
	if err != nil {
		return DeviceStatus{}, fmt.Errorf("%s device %s: %w", verb, bdf, err)
	}
	b.mu.Lock()
	d.suspended = suspend
	ev := map[bool]EventType{true: EventSuspended, false: EventResumed}[suspend]
	for _, l := range b.sortedLive(d) {
		b.emitLocked(ev, l, "")
	}
	b.emitDeviceLocked(d, by.String())
	b.log.Info("device "+done, "bdf", bdf, "by", by.String(), "leases", len(d.live))
	st, _ := b.statusLocked(d)
	b.mu.Unlock()
	fillInfo(&st, dev) // on the worker: dev is the device just suspended or resumed
	return st, nil
}

// sortedLive returns d's live leases, oldest first. Called with b.mu held.
func (b *Broker) sortedLive(d *device) []*lease {
	out := make([]*lease, 0, len(d.live))
	for _, l := range d.live {
		out = append(out, l)
	}
	slices.SortFunc(out, func(x, y *lease) int { return x.Created.Compare(y.Created) })
	return out
}

// DeviceLost ends every lease of device bdf (reason device_lost) and closes the device,
// so that a pending driver unbind or hot-unplug can complete. The device stays configured
// and unusable until [Broker.DeviceAvailable].
func (b *Broker) DeviceLost(bdf string, cause error) error {
	d, err := b.deviceFor(bdf)
	if err != nil {
		return err
	}
	werr := d.w.run(func() {
		b.mu.Lock()
		dev := b.loseDeviceLocked(d, cause)
		b.mu.Unlock()
		if dev != nil {
			err = dev.Close()
		}
	})
	if werr != nil {
		return werr
	}
	return err
}

// DeviceAvailable opens device bdf again if it is not open (e.g. it came back bound to
// vfio-pci) and returns its status.
func (b *Broker) DeviceAvailable(bdf string) (DeviceStatus, error) {
	d, err := b.deviceFor(bdf)
	if err != nil {
		return DeviceStatus{}, err
	}
	if werr := d.w.run(func() { b.openDevice(d) }); werr != nil {
		return DeviceStatus{}, werr
	}
	b.mu.Lock()
	st, dev := b.statusLocked(d)
	b.mu.Unlock()
	fillInfo(&st, dev)
	return st, st.Err
}

// loseDeviceLocked ends all of d's leases and detaches its device, which the caller
// closes after unlocking b.mu. Runs on d's worker, with b.mu held.
func (b *Broker) loseDeviceLocked(d *device, cause error) Device {
	for _, o := range b.sortedLive(d) {
		b.endLocked(o, StateRevoked, ReasonDeviceLost, "broker")
		b.setDeadLocked(o) // the device is closed next
		b.emitLocked(EventDeviceLost, o, "")
	}
	b.buryLocked(d, "broker (device lost)")
	dev := d.dev
	d.dev, d.suspended = nil, false
	d.err = fmt.Errorf("device %s: %w", d.policy.BDF, cause)
	if dev != nil { // it was usable
		b.emitDeviceLocked(d, "")
		b.log.Error("device lost", "bdf", d.policy.BDF, "err", cause)
	}
	return dev
}

// watchNotices acts on what the instance dev of device d reports until the channel
// closes (dev closed). Notices still buffered after dev was replaced are stale and ignored.
func (b *Broker) watchNotices(d *device, dev Device, ch <-chan Notice) {
	defer b.watchers.Done()
	for n := range ch {
		switch n.Kind {
		case NoticeRelease:
			b.mu.Lock()
			current := d.dev == dev
			b.mu.Unlock()
			if !current {
				continue
			}
			b.log.Warn("the kernel asks for the device back", "bdf", d.policy.BDF)
			if err := b.DeviceLost(d.policy.BDF, errors.New("the kernel asked for the device back (driver unbind or hot-unplug)")); err != nil {
				b.log.Error("closing a device the kernel asked for failed", "bdf", d.policy.BDF, "err", err)
			}
		case NoticeError:
			b.mu.Lock()
			current := d.dev == dev
			if current {
				// The first error is the device change (Devices shows it as raised
				// errors); a storm of them must not flood the event log and journal.
				if d.errors == 0 {
					b.emitDeviceLocked(d, "")
				}
				d.errors += max(n.Count, 1)
			}
			b.mu.Unlock()
			if current {
				b.log.Warn("device reported an error", "bdf", d.policy.BDF, "count", n.Count)
			}
		}
	}
}

// TSMChanged checks device bdf's TSM state again (its tsm/bound in sysfs) and revokes its
// private leases if the device is no longer bound to a TSM: private MMIO is only for a
// device in TDISP LOCKED/RUN state. Leases granted unattested (policy
// allow_unattested_private) never depended on it and stay. It returns how many leases
// ended. A TSM state that differs from the one last seen is a device change
// ([EventDeviceChanged]); it is read and compared on the device's worker, so that two
// checks at once (a uevent and the periodic resync) cannot record an older state last.
func (b *Broker) TSMChanged(bdf string) (int, error) {
	b.mu.Lock()
	d, ok := b.devices[bdf]
	b.mu.Unlock()
	if !ok {
		return 0, fmt.Errorf("device %s is not configured: %w", bdf, errdefs.ErrNotFound)
	}
	var tsm TSMState
	open := false
	if werr := d.w.run(func() {
		b.mu.Lock()
		dev := d.dev
		b.mu.Unlock()
		if dev == nil {
			return // not open: no live lease
		}
		open, tsm = true, dev.Info().TSM
		b.mu.Lock() // d.dev changes only on d's worker: still dev
		if tsm != d.info.TSM {
			d.info.TSM = tsm
			b.emitDeviceLocked(d, "")
		}
		b.mu.Unlock()
	}); werr != nil {
		return 0, werr
	}
	if !open || tsm.Bound != "" {
		return 0, nil
	}
	b.mu.Lock()
	var private []*lease
	for _, l := range b.sortedLive(d) {
		if l.Kind == KindPrivate && !l.Unattested {
			private = append(private, l)
		}
	}
	b.mu.Unlock()
	var errs []error
	n := 0
	for _, l := range private {
		if _, _, err := b.enforceCount(l, StateRevoked, ReasonTSMUnbound, "broker (tsm unbound)", EventRevoked,
			cycleCause{by: "broker", why: "private lease " + l.ID + " lost its TSM binding"}); err != nil {
			if !errors.Is(err, errdefs.ErrFailedPrecondition) { // ended meanwhile
				errs = append(errs, err)
			}
			continue
		}
		n++
	}
	if n > 0 {
		b.log.Warn("device left the TSM-bound state; its private leases were revoked", "bdf", bdf, "leases", n)
	}
	return n, errors.Join(errs...)
}
