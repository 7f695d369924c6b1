package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/failpoint"
)

// revokeReq is one revocation waiting for its device's next revoke pass.
type revokeReq struct {
	reissued int    // how many other leases the revoke's device cycle reissued
	buf      Buffer // the broker's copy of the dead lease's dma-buf; nil if none
	l        *lease // the ended lease; its event (ev) is sent once its dma-buf is dead
	ev       EventType
	done     chan struct{}
	err      error
}

// Revoke ends lease id for good (admins only).
//
// With grace 0 the revocation is immediate: when Revoke returns, the lease's dma-buf is
// dead in every process that holds it. Linux 7.2 cannot revoke one dma-buf, so this revokes
// every dma-buf of the lease's device (one device cycle, shared by every revocation of the
// device that is waiting meanwhile) and re-exports the device's other live leases as a new
// generation (event reissued, with a new claim token for their holders). On kernels with a
// per-buffer revoke ([BufferRevoker]) the other leases are untouched.
//
// With grace > 0 the revocation is cooperative: the holder gets a revoke_requested event
// with the deadline and may release the lease; at the deadline the broker revokes it.
func (b *Broker) Revoke(id string, by Actor, grace time.Duration) (Lease, error) {
	if !by.Admin {
		return Lease{}, fmt.Errorf("revoke lease %s: %s is not an admin: %w", id, by, errdefs.ErrPermissionDenied)
	}
	if grace < 0 {
		return Lease{}, fmt.Errorf("revoke lease %s: grace period %v is negative: %w", id, grace, errdefs.ErrInvalidArgument)
	}
	if grace > 0 {
		return b.requestRevoke(id, by, grace)
	}
	l, _, err := b.RevokeNow(id, by)
	return l, err
}

// RevokeNow is [Broker.Revoke] with grace 0 that also says how many other leases of the
// device its cycle reissued (0 when the kernel revoked the one dma-buf, or when no fd of
// the lease had left the broker).
func (b *Broker) RevokeNow(id string, by Actor) (Lease, int, error) {
	if !by.Admin {
		return Lease{}, 0, fmt.Errorf("revoke lease %s: %s is not an admin: %w", id, by, errdefs.ErrPermissionDenied)
	}
	b.mu.Lock()
	l, err := b.liveLocked(id)
	if err != nil {
		if ended, ok := b.leases[id]; ok && !ended.pending && !ended.Live() && !ended.Dead {
			// Ended (released, expired, holder exited) but its fd may still work until
			// its device cycles: an admin's revoke cycles it now.
			b.mu.Unlock()
			return b.killEnded(ended, by)
		}
	}
	b.mu.Unlock()
	if err != nil {
		return Lease{}, 0, err
	}
	return b.enforceCount(l, StateRevoked, ReasonRevoked, by.String(), EventRevoked)
}

// killEnded cycles the device of an ended lease whose dma-buf may still be in use (not
// Dead), so that it is dead when it returns. The lease keeps its end reason.
func (b *Broker) killEnded(l *lease, by Actor) (Lease, int, error) {
	b.mu.Lock()
	d := b.devices[l.BDF]
	b.mu.Unlock()
	if d == nil {
		return Lease{}, 0, fmt.Errorf("lease %s: device %s is not configured: %w", l.ID, l.BDF, errdefs.ErrNotFound)
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	b.mu.Lock()
	if l.Dead { // a cycle got there first
		snap := l.Lease
		b.mu.Unlock()
		return snap, 0, nil
	}
	if !slices.ContainsFunc(d.released, func(r Lease) bool { return r.ID == l.ID }) {
		d.released = append(d.released, l.Lease) // buried by the cycle below
	}
	b.mu.Unlock()
	b.log.Info("admin revoke of an ended lease whose fd may still be in use: cycling its device", "lease_id", l.ID, "bdf", l.BDF, "by", by.String())
	n, err := b.cycleDevice(d, "admin revoke of an ended lease", nil)
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		return l.Lease, n, fmt.Errorf("lease %s: %w", l.ID, err)
	}
	l.Dead = true // the cycle buried it; set for a device lost meanwhile too
	return l.Lease, n, nil
}

// liveLocked returns lease id if it exists and has not ended.
func (b *Broker) liveLocked(id string) (*lease, error) {
	l, ok := b.leases[id]
	if !ok || l.pending {
		return nil, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	if !l.Live() {
		return nil, fmt.Errorf("lease %s has already ended (%s): %w", id, l.EndReason, errdefs.ErrFailedPrecondition)
	}
	return l, nil
}

func (b *Broker) requestRevoke(id string, by Actor, grace time.Duration) (Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, err := b.liveLocked(id)
	if err != nil {
		return Lease{}, err
	}
	deadline := b.now().Add(grace)
	if !l.RevokeDeadline.IsZero() && !deadline.Before(l.RevokeDeadline) {
		return l.Lease, nil // an earlier deadline stands
	}
	if l.grace != nil {
		l.grace.Stop()
	}
	l.RevokeDeadline = deadline
	who := by.String()
	l.grace = time.AfterFunc(grace, func() { b.enforceID(id, StateRevoked, ReasonRevoked, who, EventRevoked) })
	b.emitLocked(EventRevokeRequested, l, "")
	b.log.Info("lease revoke requested", "lease_id", id, "bdf", l.BDF, "by", who, "deadline", deadline.Format(time.RFC3339Nano))
	return l.Lease, nil
}

// enforceID enforces the end of lease id if it is still live (timer and watcher entry).
func (b *Broker) enforceID(id string, st State, why Reason, by string, ev EventType) {
	b.mu.Lock()
	l, err := b.liveLocked(id)
	b.mu.Unlock()
	if err != nil {
		return
	}
	if _, err := b.enforce(l, st, why, by, ev); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
		b.log.Error("enforcing the end of a lease failed", "lease_id", id, "reason", string(why), "err", err)
	}
}

// enforce ends l and makes its dma-buf dead in every process before returning.
func (b *Broker) enforce(l *lease, st State, why Reason, by string, ev EventType) (Lease, error) {
	snap, _, err := b.enforceCount(l, st, why, by, ev)
	return snap, err
}

// enforceCount is enforce that also returns how many other leases its cycle reissued.
func (b *Broker) enforceCount(l *lease, st State, why Reason, by string, ev EventType) (Lease, int, error) {
	b.mu.Lock()
	if !l.Live() {
		b.mu.Unlock()
		return Lease{}, 0, fmt.Errorf("lease %s has already ended (%s): %w", l.ID, l.EndReason, errdefs.ErrFailedPrecondition)
	}
	d := b.devices[l.BDF]
	// An fd left the broker only if the current generation was claimed; older
	// generations died in the device cycle that reissued this one.
	delivered := !l.Claimed.IsZero()
	buf := l.buf
	l.buf = nil
	b.endLocked(l, st, why, by)
	snapshot := l.Lease
	b.log.Info("lease ended", "lease_id", l.ID, "bdf", l.BDF, "reason", string(why), "by", by, "revoke", delivered)
	if !delivered {
		b.emitLocked(ev, l, "") // its dma-buf never left the broker
		b.mu.Unlock()
		if buf != nil {
			buf.Close()
		}
		return snapshot, 0, nil
	}
	// The event follows the kernel: it is sent once the device revoked the dma-buf. The
	// end is recorded now (not dead yet), so that a broker restarted before the cycle
	// completes still revokes it.
	if err := b.persistLocked(l); err != nil {
		b.log.Error("recording a lease's end failed", "lease_id", l.ID, "err", err)
	}
	req := &revokeReq{buf: buf, l: l, ev: ev, done: make(chan struct{})}
	d.pending = append(d.pending, req)
	b.mu.Unlock()

	if w := b.cfg.RevokeCoalesceWindow; w > 0 {
		// Let revocations arriving within the window join the pending batch: the first
		// caller to take the device runs them all.
		time.Sleep(w)
	}
	d.opMu.Lock()
	b.runRevokes(d)
	d.opMu.Unlock()
	<-req.done
	if req.err != nil {
		return snapshot, req.reissued, fmt.Errorf("lease %s: %w", l.ID, req.err)
	}
	return snapshot, req.reissued, nil
}

// runRevokes makes the dma-bufs of every pending revocation of d dead, in one device
// cycle, then reissues the device's surviving leases. Called with d.opMu held.
func (b *Broker) runRevokes(d *device) {
	b.mu.Lock()
	batch := d.pending
	d.pending = nil
	dev := d.dev
	b.mu.Unlock()
	if len(batch) == 0 {
		return // another caller's pass took ours
	}
	// dead sends the ended leases' events: their dma-bufs are dead (revoked, or their
	// device closed or lost).
	sent := false
	dead := func() {
		if sent {
			return
		}
		sent = true
		b.mu.Lock()
		for _, r := range batch {
			if r.l != nil {
				r.l.Dead = true
				b.emitLocked(r.ev, r.l, "")
			}
		}
		b.mu.Unlock()
	}
	finish := func(err error) {
		dead()
		for _, r := range batch {
			if r.buf != nil {
				r.buf.Close()
			}
			r.err = err
			close(r.done)
		}
	}
	if dev == nil {
		b.mu.Lock()
		detached := b.detached
		b.mu.Unlock()
		if detached {
			// Kept open for the next run, not closed: nothing died. The ends stay
			// recorded as not dead, and the next run cycles the device.
			for _, r := range batch {
				if r.buf != nil {
					r.buf.Close() // the broker's copy; the fd store keeps its own
				}
				r.err = fmt.Errorf("the broker stopped for a restart before the device cycled; the next start revokes it: %w", errdefs.ErrUnavailable)
				close(r.done)
			}
			return
		}
		finish(nil) // closed or lost: every dma-buf it exported is dead already
		return
	}
	start := b.now()
	if br, ok := dev.(BufferRevoker); ok && br.CanRevokeBuffers() {
		var errs []error
		for _, r := range batch {
			if r.buf != nil {
				errs = append(errs, br.RevokeBuffer(r.buf))
			}
		}
		err := errors.Join(errs...)
		if err == nil {
			b.log.Info("dma-bufs revoked one by one", "bdf", d.policy.BDF, "count", len(batch), "took", b.now().Sub(start).String())
			finish(nil)
			return
		}
		b.log.Warn("per-buffer revoke failed; cycling the device", "bdf", d.policy.BDF, "err", err)
	}
	n, err := b.cycleDevice(d, fmt.Sprintf("%d revocation(s)", len(batch)), dead)
	for _, r := range batch {
		r.reissued = n
	}
	finish(err)
}

// cycleDevice makes every dma-buf d exported so far dead for good (one device cycle) and
// re-exports its live leases as a new generation. Called with d.opMu held. On failure the
// device is lost: all its leases end.
//
// dead, if not nil, runs once the old dma-bufs are dead (before the reissue), or when the
// cycle failed and the device is lost.
func (b *Broker) cycleDevice(d *device, why string, dead func()) (reissued int, err error) {
	if dead == nil {
		dead = func() {}
	}
	b.mu.Lock()
	dev, suspended := d.dev, d.suspended
	survivors := make([]*lease, 0, len(d.live))
	for _, o := range d.live {
		if !o.pending {
			survivors = append(survivors, o)
			if dev != nil && !o.reissuing {
				o.reissuing = true
				if err := b.persistLocked(o); err != nil {
					b.log.Error("recording a lease about to be reissued failed", "lease_id", o.ID, "err", err)
				}
			}
		}
	}
	b.mu.Unlock()
	if dev == nil {
		dead()
		return 0, nil // closed or lost: every dma-buf it exported is dead already
	}
	start := b.now()
	if err := dev.Revoke(); err != nil {
		b.mu.Lock()
		closeDev := b.loseDeviceLocked(d, fmt.Errorf("revoke: %w", err))
		b.mu.Unlock()
		if closeDev != nil {
			closeDev.Close()
		}
		dead()
		return 0, fmt.Errorf("cycling device %s failed, all its leases ended: %w: %w", d.policy.BDF, err, errdefs.ErrUnavailable)
	}
	dead()
	if suspended {
		if s, ok := dev.(Suspender); ok {
			if err := s.Suspend(); err != nil {
				b.log.Error("re-suspending the device after a revoke failed", "bdf", d.policy.BDF, "err", err)
			}
		}
	}
	b.mu.Lock()
	b.buryLocked(d)
	b.mu.Unlock()
	b.log.Info("device cycled", "bdf", d.policy.BDF, "why", why,
		"took", b.now().Sub(start).String(), "reissue", len(survivors))
	return b.reissue(d, dev, survivors), nil
}

// mustCycleFor reports whether allocating req on d must first cycle the device: the
// request overlaps released ranges that their former holder may still be using, and may
// not share them (a private lease, a private released lease, or another uid's), or too
// many released leases are waiting for a cycle.
func (b *Broker) mustCycleFor(d *device, req AllocateRequest) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(d.released) > maxReleased {
		return true
	}
	for _, r := range d.released {
		if r.BAR == req.BAR && overlaps(r.Ranges, req.Ranges) &&
			(req.Kind == KindPrivate || r.Kind == KindPrivate || r.Holder.UID != req.Holder.UID) {
			return true
		}
	}
	return false
}

// reissue re-exports survivors after their device revoked every dma-buf. Called with
// d.opMu held.
func (b *Broker) reissue(d *device, dev Device, survivors []*lease) (n int) {
	slices.SortFunc(survivors, func(x, y *lease) int { return x.Created.Compare(y.Created) })
	for _, o := range survivors {
		buf, err := dev.Export(o.BAR, o.Ranges, bufferName(o.ID))
		b.mu.Lock()
		if !o.Live() { // ended meanwhile (e.g. released)
			b.mu.Unlock()
			if buf != nil {
				buf.Close()
			}
			continue
		}
		if err != nil {
			b.endLocked(o, StateRevoked, ReasonReissueFailed, "broker")
			b.emitLocked(EventRevoked, o, "")
			b.log.Error("reissue failed", "lease_id", o.ID, "bdf", o.BDF, "err", err)
			b.mu.Unlock()
			continue
		}
		if o.buf != nil {
			o.buf.Close()
		}
		if o.timer != nil {
			o.timer.Stop()
			o.timer = nil
		}
		o.buf = buf
		o.reissuing = false
		o.Generation++
		o.Inode, o.Size = buf.Inode(), buf.Size()
		o.Claimed = time.Time{}
		token := newToken()
		o.digest = tokenDigest(token)
		o.deadline, o.ClaimDeadline = time.Time{}, time.Time{}
		if o.State == StateAllocated { // never claimed: the claim window starts again
			o.deadline = b.now().Add(b.cfg.ClaimTimeout)
			o.ClaimDeadline = o.deadline
			id, gen := o.ID, o.Generation
			o.timer = time.AfterFunc(b.cfg.ClaimTimeout, func() { b.expire(id, gen) })
		}
		b.emitLocked(EventReissued, o, token)
		failpoint.Hit(failpoint.MidReissue)
		n++
		b.log.Info("lease reissued", "lease_id", o.ID, "generation", o.Generation, "inode", o.Inode)
		b.mu.Unlock()
	}
	return n
}

// watchHolder ends l when its holder process exits. Called with b.mu held.
func (b *Broker) watchHolder(l *lease) {
	p := l.holder.Proc
	if p == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.unwatch = cancel
	id, pid := l.ID, l.Holder.PID
	b.watchers.Add(1)
	go func() {
		defer b.watchers.Done()
		if p.Wait(ctx) != nil {
			return // the lease ended first
		}
		b.log.Info("lease holder exited", "lease_id", id, "client_pid", pid)
		b.enforceID(id, StateReleased, ReasonHolderExited, fmt.Sprintf("pid %d exited", pid), EventReleased)
	}()
}

// Renew extends the time to live of lease id to ttl from now (0: the lease's own TTL),
// on behalf of its holder uid or an admin.
func (b *Broker) Renew(id string, by Actor, ttl time.Duration) (Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, err := b.liveLocked(id)
	if err != nil {
		return Lease{}, err
	}
	if !by.Admin && by.UID != l.Holder.UID {
		return Lease{}, fmt.Errorf("lease %s is held by uid %d, not %s: %w", id, l.Holder.UID, by, errdefs.ErrPermissionDenied)
	}
	if ttl < 0 {
		return Lease{}, fmt.Errorf("lease %s: ttl %v is negative: %w", id, ttl, errdefs.ErrInvalidArgument)
	}
	if ttl == 0 {
		ttl = l.TTL
	}
	if ttl == 0 {
		return Lease{}, fmt.Errorf("lease %s has no time to live; give one to renew it: %w", id, errdefs.ErrInvalidArgument)
	}
	if l.ttl != nil {
		l.ttl.Stop()
	}
	l.TTL, l.Expires = ttl, b.now().Add(ttl)
	l.ttl = time.AfterFunc(ttl, func() { b.enforceID(id, StateRevoked, ReasonExpired, "broker (ttl)", EventExpired) })
	b.emitLocked(EventRenewed, l, "")
	return l.Lease, nil
}

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
	verb, done := "resume", "resumed"
	if suspend {
		verb, done = "suspend", "suspended"
	}
	if !by.Admin {
		return DeviceStatus{}, fmt.Errorf("%s device %s: %s is not an admin: %w", verb, bdf, by, errdefs.ErrPermissionDenied)
	}
	d, err := b.deviceFor(bdf)
	if err != nil {
		return DeviceStatus{}, err
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
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
	b.log.Info("device "+done, "bdf", bdf, "by", by.String(), "leases", len(d.live))
	st, _ := b.statusLocked(d)
	b.mu.Unlock()
	fillInfo(&st, dev) // with opMu still held: dev is the device just suspended or resumed
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
	d.opMu.Lock()
	defer d.opMu.Unlock()
	b.mu.Lock()
	dev := b.loseDeviceLocked(d, cause)
	b.mu.Unlock()
	if dev != nil {
		return dev.Close()
	}
	return nil
}

// DeviceAvailable opens device bdf again if it is not open (e.g. it came back bound to
// vfio-pci) and returns its status.
func (b *Broker) DeviceAvailable(bdf string) (DeviceStatus, error) {
	d, err := b.deviceFor(bdf)
	if err != nil {
		return DeviceStatus{}, err
	}
	d.opMu.Lock()
	b.openDevice(d)
	d.opMu.Unlock()
	b.mu.Lock()
	st, dev := b.statusLocked(d)
	b.mu.Unlock()
	fillInfo(&st, dev)
	return st, st.Err
}

// loseDeviceLocked ends all of d's leases and detaches its device, which the caller
// closes after unlocking b.mu. Called with d.opMu and b.mu held.
func (b *Broker) loseDeviceLocked(d *device, cause error) Device {
	for _, o := range b.sortedLive(d) {
		b.endLocked(o, StateRevoked, ReasonDeviceLost, "broker")
		o.Dead = true // the device is closed next
		b.emitLocked(EventDeviceLost, o, "")
	}
	b.buryLocked(d)
	dev := d.dev
	d.dev, d.suspended = nil, false
	d.err = fmt.Errorf("device %s: %w", d.policy.BDF, cause)
	if dev != nil {
		b.log.Error("device lost", "bdf", d.policy.BDF, "err", cause)
	}
	return dev
}

// watchNotices acts on what the instance dev of device d reports until the channel
// closes (dev closed). Notices still buffered after dev was replaced are stale and ignored.
func (b *Broker) watchNotices(d *device, dev Device, ch <-chan Notice) {
	defer b.watchers.Done()
	for n := range ch {
		b.mu.Lock()
		current := d.dev == dev
		b.mu.Unlock()
		if !current {
			continue
		}
		switch n.Kind {
		case NoticeRelease:
			b.log.Warn("the kernel asks for the device back", "bdf", d.policy.BDF)
			if err := b.DeviceLost(d.policy.BDF, errors.New("the kernel asked for the device back (driver unbind or hot-unplug)")); err != nil {
				b.log.Error("closing a device the kernel asked for failed", "bdf", d.policy.BDF, "err", err)
			}
		case NoticeError:
			b.mu.Lock()
			d.errors += max(n.Count, 1)
			b.mu.Unlock()
			b.log.Warn("device reported an error", "bdf", d.policy.BDF, "count", n.Count)
		}
	}
}

// buryLocked marks the device's released leases dead: the device cycled or closed, so
// their fds died with it. Called with b.mu held.
func (b *Broker) buryLocked(d *device) {
	for _, r := range d.released {
		if l := b.leases[r.ID]; l != nil && !l.Dead {
			l.Dead = true
			if err := b.persistLocked(l); err != nil {
				b.log.Error("recording a dead lease failed", "lease_id", l.ID, "err", err)
			}
		}
	}
	d.released = nil
}

// TSMChanged checks device bdf's TSM state again (its tsm/bound in sysfs) and revokes its
// private leases if the device is no longer bound to a TSM: private MMIO is only for a
// device in TDISP LOCKED/RUN state. Leases granted unattested (policy
// allow_unattested_private) never depended on it and stay. It returns how many leases
// ended.
func (b *Broker) TSMChanged(bdf string) (int, error) {
	b.mu.Lock()
	d, ok := b.devices[bdf]
	if !ok {
		b.mu.Unlock()
		return 0, fmt.Errorf("device %s is not configured: %w", bdf, errdefs.ErrNotFound)
	}
	dev := d.dev
	b.mu.Unlock()
	if dev == nil {
		return 0, nil // not open: no live lease
	}
	if dev.Info().TSM.Bound != "" {
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
		if _, err := b.enforce(l, StateRevoked, ReasonTSMUnbound, "broker (tsm unbound)", EventRevoked); err != nil {
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
