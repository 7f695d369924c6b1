package broker

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// revokeReq is one revocation waiting for its device's next revoke pass.
type revokeReq struct {
	reissued int    // how many other leases the revoke's device cycle reissued
	buf      Buffer // the broker's copy of the dead lease's dma-buf; nil if none
	l        *lease // the ended lease; its event (ev) is sent once its dma-buf is dead
	ev       EventType
	cause    cycleCause // who caused the revocation, for the cycle's events
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
			// Ended by its tenant (released, expired, holder exited) but its fd may
			// still work until its device cycles: an admin's revoke cycles it now.
			b.mu.Unlock()
			return b.killEnded(ended, by)
		}
	}
	b.mu.Unlock()
	if err != nil {
		return Lease{}, 0, err
	}
	return b.enforceCount(l, StateRevoked, ReasonRevoked, by.String(), EventRevoked, cycleCause{by: by.String(), why: "admin revoke of lease " + id})
}

// killEnded cycles the device of an ended-but-live lease at once, so that its dma-buf is
// dead when it returns. The lease keeps its end reason; its FD_REVOKED event names by.
func (b *Broker) killEnded(l *lease, by Actor) (Lease, int, error) {
	d, err := b.deviceFor(l.BDF)
	if err != nil {
		return Lease{}, 0, fmt.Errorf("lease %s: %w", l.ID, err)
	}
	var n int
	werr := d.w.run(func() {
		b.mu.Lock()
		dead := l.Dead // a cycle got there first
		b.mu.Unlock()
		if dead {
			return
		}
		b.log.Info("admin revoke of an ended lease whose fd may still be in use: cycling its device", "lease_id", l.ID, "bdf", l.BDF, "by", by.String())
		n, err = b.cycleDevice(d, cycleCause{by: by.String(), why: "admin revoke of an ended lease"}, nil)
	})
	if werr != nil {
		err = werr
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		return l.Lease, n, fmt.Errorf("lease %s: %w", l.ID, err)
	}
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
	l.grace = time.AfterFunc(grace, func() { b.revokeAtDeadline(id, who) })
	b.emitLocked(EventRevokeRequested, l, "")
	b.log.Info("lease revoke requested", "lease_id", id, "bdf", l.BDF, "by", who, "deadline", deadline.Format(time.RFC3339Nano))
	return l.Lease, nil
}

// enforceID makes lease id end at once, its dma-buf dead before it returns, if the lease
// is still live (the deadline of an admin's cooperative revoke, a TSM unbind).
func (b *Broker) enforceID(id string, st State, why Reason, by string, ev EventType, cause cycleCause) {
	b.mu.Lock()
	l, err := b.liveLocked(id)
	b.mu.Unlock()
	if err != nil {
		return
	}
	if _, _, err := b.enforceCount(l, st, why, by, ev, cause); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
		b.log.Error("enforcing the end of a lease failed", "lease_id", id, "reason", string(why), "err", err)
	}
}

// endByTenant ends lease id for a reason its tenant caused (a release, its holder
// exiting, its ttl running out), if it is still live. The tenant's right ends at once;
// if its fd left the broker, the lease is ended-but-live until its device's next cycle,
// which comes at the latest Config.RevokeWithin (R) later, and still counts against the
// tenant's limits until then. With R = 0 the device cycles at once, as for an admin's
// revoke.
func (b *Broker) endByTenant(id string, st State, why Reason, by string, ev EventType) (Lease, error) {
	b.mu.Lock()
	l, err := b.liveLocked(id)
	if err != nil {
		b.mu.Unlock()
		return Lease{}, err
	}
	if b.closed {
		b.mu.Unlock()
		return Lease{}, fmt.Errorf("lease %s: the broker is stopping: %w", id, errdefs.ErrUnavailable)
	}
	cause := cycleCause{by: l.Holder.Tenant, tenant: true, why: fmt.Sprintf("lease %s ended (%s)", id, why)}
	if b.cfg.RevokeWithin == 0 || l.Claimed.IsZero() {
		b.mu.Unlock()
		snap, _, err := b.enforceCount(l, st, why, by, ev, cause)
		return snap, err
	}
	defer b.mu.Unlock()
	d := b.devices[l.BDF]
	b.endLocked(l, st, why, by)
	l.RevokeDue = l.Ended.Add(b.cfg.RevokeWithin)
	d.addReleased(l)
	b.scheduleLocked(d)
	b.emitLocked(ev, l, "")
	b.log.Info("lease ended; its fd works until its device's next cycle", "lease_id", id, "bdf", l.BDF,
		"reason", string(why), "by", by, "revoke_due", l.RevokeDue.Format(time.RFC3339Nano))
	return l.Lease, nil
}

// enforceCount ends l at once and makes its dma-buf dead in every process before
// returning; it returns how many other leases its device cycle reissued. The lease's
// event is sent once the kernel revoked the dma-buf.
func (b *Broker) enforceCount(l *lease, st State, why Reason, by string, ev EventType, cause cycleCause) (Lease, int, error) {
	b.mu.Lock()
	if !l.Live() {
		b.mu.Unlock()
		return Lease{}, 0, fmt.Errorf("lease %s has already ended (%s): %w", l.ID, l.EndReason, errdefs.ErrFailedPrecondition)
	}
	if b.closed {
		b.mu.Unlock()
		return Lease{}, 0, fmt.Errorf("lease %s: the broker is stopping: %w", l.ID, errdefs.ErrUnavailable)
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
		// Its dma-buf never left the broker: closing the broker's copy frees it, before
		// anyone hears of the end.
		if buf != nil {
			buf.Close()
		}
		b.emitLocked(ev, l, "")
		b.mu.Unlock()
		return snapshot, 0, nil
	}
	// The event follows the kernel: it is sent once the device revoked the dma-buf. The
	// end is recorded now (not dead yet), so that a broker restarted before the cycle
	// completes still revokes it.
	if err := b.persistLocked(l); err != nil {
		b.log.Error("recording a lease's end failed", "lease_id", l.ID, "err", err)
	}
	req := &revokeReq{buf: buf, l: l, ev: ev, cause: cause, done: make(chan struct{})}
	d.pending = append(d.pending, req)
	b.mu.Unlock()

	// Revocations that arrive while the worker is busy join the pending batch: the
	// first runRevokes to run takes them all.
	if err := d.w.run(func() { b.runRevokes(d) }); err != nil {
		b.mu.Lock()
		if i := slices.Index(d.pending, req); i >= 0 { // never taken by a pass
			d.pending = slices.Delete(d.pending, i, i+1)
			b.mu.Unlock()
			if buf != nil {
				buf.Close()
			}
			return snapshot, 0, fmt.Errorf("lease %s: %w", l.ID, err)
		}
		b.mu.Unlock()
	}
	<-req.done
	if req.err != nil {
		return snapshot, req.reissued, fmt.Errorf("lease %s: %w", l.ID, req.err)
	}
	return snapshot, req.reissued, nil
}

// runRevokes makes the dma-bufs of every pending revocation of d dead, in one device
// cycle, then reissues the device's surviving leases. Runs on d's worker.
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
				b.setDeadLocked(r.l)
				b.emitCausedLocked(r.ev, r.l, "", r.cause.by)
				b.obs.Revoked(r.l.Lease, b.now().Sub(r.l.Ended))
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
	cause := batch[0].cause
	for _, r := range batch[1:] {
		cause.tenant = cause.tenant && r.cause.tenant // an admin's revoke in the batch: not a tenant's cycle
	}
	cause.why = fmt.Sprintf("%d revocation(s), first: %s", len(batch), cause.why)
	n, err := b.cycleDevice(d, cause, dead)
	for _, r := range batch {
		r.reissued = n
	}
	finish(err)
}
