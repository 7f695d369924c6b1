package broker

import (
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/failpoint"
)

// A device cycle (memory decode off, device fd closed and reopened, decode on) is the only
// way Linux 7.2 kills a dma-buf, and it kills every dma-buf of the device: the device's
// other live leases are reissued. This file decides when a device cycles and who caused
// it, under the two bounds of the revocation model (docs/api.md, "Revocation bounds"):
//
//   - R (Config.RevokeWithin): a lease that its tenant ended (release, holder exit, ttl
//     expiry) while its fd was out is "ended but live" until its device's next cycle,
//     which comes at the latest R after the end. Ends are batched: one cycle buries every
//     ended-but-live lease of the device.
//   - C (Config.TenantCycleInterval): cycles that tenants cause happen at most once per C
//     per device. A tenant's allocation that needs a cycle first (it must not share
//     ranges an ended lease may still use) waits for it: it is refused with UNAVAILABLE
//     and the cycle is scheduled at the earliest time C allows. Each tenant also has a
//     budget of such cycles per hour (Config.TenantCycleBudget).
//
// Admins (RevokeLease, CycleDevice, Drain) and the broker's own security ends (a private
// lease whose device left the TSM-bound state) cycle at once, regardless of C.

// cycleCause says who or what made a device cycle; it is reported in the REISSUED and
// FD_REVOKED events the cycle causes, and logged.
type cycleCause struct {
	by     string // a tenant ID, "admin uid N pid P", or "broker"
	tenant bool   // caused by a tenant: counts for C
	why    string
}

// scheduleLocked (re)arms d's cycle timer for its ended-but-live leases: at the earliest
// of their revoke deadlines (end + R), or sooner if an allocation is waiting for a cycle,
// but never sooner than C after the last cycle a tenant caused. It disarms the timer when
// nothing waits. Called with b.mu held.
func (b *Broker) scheduleLocked(d *device) {
	if len(d.released) == 0 && !d.urgent || b.closed {
		if d.cycleTimer != nil {
			d.cycleTimer.Stop()
			d.cycleTimer = nil
		}
		d.cycleAt, d.urgent = time.Time{}, false
		return
	}
	var due time.Time
	for _, l := range d.released {
		if due.IsZero() || l.RevokeDue.Before(due) {
			due = l.RevokeDue
		}
	}
	if !due.IsZero() {
		// Start early enough that the cycle has completed, and the fds are dead, by the
		// deadline.
		due = due.Add(-b.cycleMargin())
	}
	earliest := d.lastTenantCycle.Add(b.cfg.TenantCycleInterval)
	if d.urgent && (due.IsZero() || earliest.Before(due)) {
		due = earliest
	}
	if due.Before(earliest) {
		due = earliest // does not happen for R-bound ends when C <= R/2; kept as the rule
	}
	if d.cycleTimer != nil && due.Equal(d.cycleAt) {
		return
	}
	if d.cycleTimer != nil {
		d.cycleTimer.Stop()
	}
	d.cycleAt = due
	d.cycleTimer = time.AfterFunc(max(due.Sub(b.now()), 0), func() { b.dueCycle(d) })
}

// cycleMargin is how long before an ended-but-live lease's revoke deadline its
// device's scheduled cycle starts: R/2, so that the cycle has completed, and the fds are
// dead, by the deadline unless one cycle takes longer than R/2. (Recent cycle times are
// no guide: in the VM rig one device's cycles took from 0.17 s to 0.9 s.)
func (b *Broker) cycleMargin() time.Duration { return b.cfg.RevokeWithin / 2 }

// dueCycle runs d's scheduled cycle on its worker, if it is still due.
func (b *Broker) dueCycle(d *device) {
	d.w.run(func() {
		b.mu.Lock()
		if b.closed || d.cycleAt.IsZero() || b.now().Before(d.cycleAt) || len(d.released) == 0 && !d.urgent {
			b.mu.Unlock()
			return // cycled meanwhile, rescheduled, or stopping
		}
		cause := cycleCause{by: "broker", tenant: true, why: "an allocation waits for released ranges"}
		if len(d.released) > 0 {
			first := d.released[0]
			for _, l := range d.released {
				if l.RevokeDue.Before(first.RevokeDue) {
					first = l
				}
			}
			cause = cycleCause{by: first.Holder.Tenant, tenant: true,
				why: fmt.Sprintf("%d ended lease(s) whose fds may still work (first: %s, %s)", len(d.released), first.ID, first.EndReason)}
		}
		b.mu.Unlock()
		if _, err := b.cycleDevice(d, cause, nil); err != nil {
			b.log.Error("scheduled device cycle failed", "bdf", d.policy.BDF, "err", err)
		}
	})
}

// CycleDevice cycles device bdf at once (admins only): every dma-buf it exported dies, its
// ended-but-live leases are dead from then on, and its live leases are reissued. It
// returns how many live leases were reissued and how many ended leases it made dead.
func (b *Broker) CycleDevice(bdf string, by Actor) (reissued, buried int, err error) {
	if !by.Admin {
		return 0, 0, fmt.Errorf("cycle device %s: %s is not an admin: %w", bdf, by, errdefs.ErrPermissionDenied)
	}
	d, err := b.deviceFor(bdf)
	if err != nil {
		return 0, 0, err
	}
	werr := d.w.run(func() {
		b.mu.Lock()
		open := d.dev != nil
		buried = len(d.released)
		b.mu.Unlock()
		if !open {
			err = fmt.Errorf("cycle device %s: %w: %w", bdf, d.err, errdefs.ErrFailedPrecondition)
			return
		}
		reissued, err = b.cycleDevice(d, cycleCause{by: by.String(), why: "admin request"}, nil)
	})
	if werr != nil {
		return 0, 0, werr
	}
	if err != nil {
		return reissued, 0, err
	}
	return reissued, buried, nil
}

// cycleDevice makes every dma-buf d exported so far dead for good (one device cycle),
// buries d's ended-but-live leases and re-exports its live leases as a new generation.
// Runs on d's worker. On failure the device is lost: all its leases end.
//
// dead, if not nil, runs once the old dma-bufs are dead (before the reissue), or when the
// cycle failed and the device is lost.
func (b *Broker) cycleDevice(d *device, cause cycleCause, dead func()) (reissued int, err error) {
	if dead == nil {
		dead = func() {}
	}
	b.mu.Lock()
	dev, suspended := d.dev, d.suspended
	survivors := make([]*lease, 0, len(d.live))
	var marked []*lease
	for _, o := range d.live {
		if !o.pending {
			survivors = append(survivors, o)
			if dev != nil && !o.reissuing {
				o.reissuing = true
				marked = append(marked, o)
			}
		}
	}
	b.persistEachLocked(marked) // one commit; a failure is logged per lease
	b.mu.Unlock()
	if dev == nil {
		dead()
		return 0, nil // closed or lost: every dma-buf it exported is dead already
	}
	start := b.now()
	if err := dev.Revoke(); err != nil {
		b.obs.DeviceCycled(cause.observed(d.policy.BDF, b.now().Sub(start), err))
		b.mu.Lock()
		closeDev := b.loseDeviceLocked(d, fmt.Errorf("revoke: %w", err))
		b.mu.Unlock()
		if closeDev != nil {
			closeDev.Close()
		}
		dead()
		return 0, fmt.Errorf("cycling device %s failed, all its leases ended: %w: %w", d.policy.BDF, err, errdefs.ErrUnavailable)
	}
	b.obs.DeviceCycled(cause.observed(d.policy.BDF, b.now().Sub(start), nil))
	dead()
	if suspended {
		if s, ok := dev.(Suspender); ok {
			if err := s.Suspend(); err != nil {
				b.log.Error("re-suspending the device after a revoke failed", "bdf", d.policy.BDF, "err", err)
			}
		}
	}
	b.mu.Lock()
	b.buryLocked(d, cause.by)
	d.urgent = false
	if cause.tenant {
		d.lastTenantCycle = b.now()
	}
	b.scheduleLocked(d)
	b.mu.Unlock()
	b.log.Info("device cycled", "bdf", d.policy.BDF, "why", cause.why, "caused_by", cause.by,
		"took", b.now().Sub(start).String(), "reissue", len(survivors))
	return b.reissue(d, dev, survivors, cause.by), nil
}

// buryLocked marks the device's ended-but-live leases dead: the device cycled or closed,
// so their fds died with it. Each gets an FD_REVOKED event naming what caused it. Called
// with b.mu held.
func (b *Broker) buryLocked(d *device, causedBy string) {
	dead := make([]*lease, 0, len(d.released))
	for _, l := range d.released {
		if l.Dead {
			continue
		}
		b.setDeadLocked(l)
		dead = append(dead, l)
	}
	d.clearReleased()
	b.emitEachLocked(EventFdRevoked, dead, causedBy)
}

// setDeadLocked records that l's dma-buf is dead: it no longer counts against its
// tenant's limits. Called with b.mu held.
func (b *Broker) setDeadLocked(l *lease) {
	if l.Dead {
		return
	}
	l.Dead = true
	l.RevokeDue = time.Time{}
	b.countLive(l, -1)
	b.trimEndedLocked()
}

// needCycleFor says whether allocating req on d must first cycle the device: the request
// overlaps ranges of ended-but-live leases (their former holders may still use them) and
// may not share them (a private lease, a private ended lease, or another tenant's), or
// too many ended-but-live leases wait for a cycle.
func (b *Broker) needCycleFor(d *device, req AllocateRequest) bool {
	if len(d.released) >= maxReleased {
		return true
	}
	need := false
	d.releasedSpans.overlapping(req.BAR, req.Ranges, func(r *lease) bool {
		need = req.Kind == KindPrivate || r.Kind == KindPrivate || r.Holder.Tenant != req.Holder.Tenant
		return !need
	})
	return need
}

// cycleForAllocation cycles d before req's export, if req needs it (see needCycleFor),
// within the bounds tenants have: at most once per C per device, and the tenant's hourly
// budget. A tenant that must wait gets UNAVAILABLE naming when the device cycles (it is
// scheduled then: retry after it). Admins cycle at once. Runs on d's worker.
func (b *Broker) cycleForAllocation(d *device, req AllocateRequest) error {
	b.mu.Lock()
	if !b.needCycleFor(d, req) {
		b.mu.Unlock()
		return nil
	}
	now := b.now()
	cause := cycleCause{by: req.Holder.Tenant, tenant: true, why: "an allocation must not share ranges of ended leases that may still be in use"}
	if req.Admin {
		cause = cycleCause{by: fmt.Sprintf("uid %d (admin) pid %d", req.Holder.UID, req.Holder.PID), why: cause.why}
	} else {
		if next := d.lastTenantCycle.Add(b.cfg.TenantCycleInterval); now.Before(next) {
			d.urgent = true
			b.scheduleLocked(d)
			at := d.cycleAt
			b.mu.Unlock()
			return fmt.Errorf("device %s: the ranges were released by a lease whose fd may still work, and tenants may cycle the device at most once per %v: it cycles at %s, retry after that (in %v): %w",
				req.BDF, b.cfg.TenantCycleInterval, at.Format(time.RFC3339Nano), at.Sub(now).Round(time.Millisecond), errdefs.ErrUnavailable)
		}
		if err := b.chargeCycleLocked(req.Holder.Tenant, now); err != nil {
			b.mu.Unlock()
			return fmt.Errorf("device %s: %w", req.BDF, err)
		}
	}
	b.mu.Unlock()
	if _, err := b.cycleDevice(d, cause, nil); err != nil {
		return fmt.Errorf("device %s: %w", req.BDF, err)
	}
	return nil
}

// budgetWindow is the window of Config.TenantCycleBudget.
const budgetWindow = time.Hour

// chargeCycleLocked takes one cycle from tenant's hourly budget, or fails with
// RESOURCE_EXHAUSTED if it is spent. Called with b.mu held.
func (b *Broker) chargeCycleLocked(tenant string, now time.Time) error {
	if b.cfg.TenantCycleBudget <= 0 {
		return nil
	}
	// Forget every tenant's cycles older than the window, so the map stays bounded by
	// the tenants that caused cycles within it.
	for t, times := range b.cycles {
		i := 0
		for i < len(times) && now.Sub(times[i]) >= budgetWindow {
			i++
		}
		if i == len(times) {
			delete(b.cycles, t)
		} else {
			b.cycles[t] = times[i:]
		}
	}
	times := b.cycles[tenant]
	if len(times) >= b.cfg.TenantCycleBudget {
		return fmt.Errorf("tenant %s caused %d device cycles in the last %v, its budget; the next one is possible at %s: %w",
			tenant, len(times), budgetWindow, times[0].Add(budgetWindow).Format(time.RFC3339), errdefs.ErrResourceExhausted)
	}
	b.cycles[tenant] = append(times, now)
	return nil
}

// reissue re-exports survivors after their device revoked every dma-buf; their REISSUED
// events name causedBy. Runs on d's worker.
func (b *Broker) reissue(d *device, dev Device, survivors []*lease, causedBy string) (n int) {
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
			b.setDeadLocked(o) // its fd died in the cycle
			b.emitCausedLocked(EventRevoked, o, "", causedBy)
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
		token := ""
		o.deadline, o.ClaimDeadline = time.Time{}, time.Time{}
		switch {
		case o.Delegated():
			// Its claimant's token (in the pod's CDI spec) stays valid, and it still waits
			// without a deadline: nobody has a stream to be told a new one.
		case o.State == StateAllocated:
			// Never claimed: the token the allocation answered stays valid (its holder may
			// be claiming with it right now: a new one would reach it only on an event
			// stream it may not have), and the claim window starts again.
			o.deadline = b.now().Add(b.cfg.ClaimTimeout)
			o.ClaimDeadline = o.deadline
			id, gen := o.ID, o.Generation
			o.timer = time.AfterFunc(b.cfg.ClaimTimeout, func() { b.expire(id, gen) })
		default:
			token = newToken()
			o.digest = tokenDigest(token)
		}
		b.emitCausedLocked(EventReissued, o, token, causedBy)
		failpoint.Hit(failpoint.MidReissue)
		n++
		b.log.Info("lease reissued", "lease_id", o.ID, "generation", o.Generation, "inode", o.Inode, "caused_by", causedBy)
		b.mu.Unlock()
	}
	return n
}
