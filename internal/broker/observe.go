package broker

import (
	"strings"
	"time"
)

// Observer learns what the broker does, for metrics (internal/metrics). Set it with
// [Options.Observer].
//
// Its methods are called synchronously from the broker's own goroutines, most of them
// with the broker's lock held: they must return quickly, must not block, must do no I/O
// and must not call the broker. Counting and observing into histograms is what they are
// for.
type Observer interface {
	// Event is called for every event the broker publishes, in sequence order (lock
	// held). Lease ends, reissues, claims and dead fds of ended leases are all events.
	Event(e Event)
	// DeviceCycled is called once a device cycle made every dma-buf of the device dead,
	// or failed (the device is then lost), before the device's live leases are reissued
	// (lock not held).
	DeviceCycled(c Cycle)
	// Revoked is called when an immediate revocation made the delivered dma-buf of lease
	// l dead (an admin's revoke, an enforced cooperative revoke, a tenant's end with
	// revoke_within 0, a lost TSM binding); took is how long that took from the lease's
	// end, which is when the revocation was asked for (lock held).
	Revoked(l Lease, took time.Duration)
}

// CycleCause classifies who caused a device cycle.
type CycleCause string

// Cycle causes.
const (
	// CauseTenant: a tenant's action (a lease ended after its fd was claimed, an
	// allocation that must not share an ended lease's ranges). These count against the
	// bound C (Config.TenantCycleInterval).
	CauseTenant CycleCause = "tenant"
	// CauseAdmin: an administrator (RevokeLease, CycleDevice, Drain, a cooperative
	// revoke's deadline).
	CauseAdmin CycleCause = "admin"
	// CauseBroker: the broker itself (a lost TSM binding, a revoke interrupted by a
	// restart).
	CauseBroker CycleCause = "broker"
)

// Cycle describes one device cycle, for [Observer.DeviceCycled].
type Cycle struct {
	BDF   string
	Cause CycleCause
	// CausedBy names who caused it, as in [Event.CausedBy].
	CausedBy string
	// Took is how long the device took to revoke (memory decode off, device fd closed
	// and reopened, decode on).
	Took time.Duration
	// Err is why the cycle failed (the device is lost and its leases ended); nil if it
	// succeeded.
	Err error
}

// class returns c's [CycleCause].
func (c cycleCause) class() CycleCause {
	switch {
	case c.tenant:
		return CauseTenant
	case strings.HasPrefix(c.by, "broker"):
		return CauseBroker
	}
	return CauseAdmin
}

// observed returns the [Cycle] of device bdf that c caused, for [Observer.DeviceCycled].
func (c cycleCause) observed(bdf string, took time.Duration, err error) Cycle {
	return Cycle{BDF: bdf, Cause: c.class(), CausedBy: c.by, Took: took, Err: err}
}

// nopObserver is the Observer of a broker without one.
type nopObserver struct{}

func (nopObserver) Event(Event)                  {}
func (nopObserver) DeviceCycled(Cycle)           {}
func (nopObserver) Revoked(Lease, time.Duration) {}

// LeaseGroup is what [Stats.Leases] counts leases by.
type LeaseGroup struct {
	BDF  string
	Kind Kind
	// State is StateAllocated or StateActive for live leases. An ended lease is counted
	// (under the state it ended in) only while it is ended but live: its fd may still
	// work until its device cycles.
	State State
}

// Stats is a snapshot of the broker's counts, for metrics.
type Stats struct {
	// Devices are the configured devices in configuration order. Their Info is as of
	// the device's last open (not re-read: taking Stats never waits for a device).
	Devices []DeviceStatus
	// Leases counts the live and the ended-but-live leases.
	Leases map[LeaseGroup]int
	// NotDead counts the leases that count against Limits.MaxLeases: live (also those
	// being exported) and ended but live.
	NotDead int
	// Limits are the broker's limits, defaults applied.
	Limits Limits
	// Subscribers is how many event subscriptions are open.
	Subscribers int
	// Lagged counts the subscriptions ended with [ErrSubscriberLagged] since start.
	Lagged uint64
}

// Stats returns a snapshot of the broker's counts. It takes the broker's lock once, for a
// time proportional to the number of leases it keeps, and calls no device.
func (b *Broker) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := Stats{
		Devices:     make([]DeviceStatus, 0, len(b.order)),
		Leases:      map[LeaseGroup]int{},
		NotDead:     b.live,
		Limits:      b.cfg.Limits,
		Subscribers: len(b.events.subs),
		Lagged:      b.events.lagged,
	}
	for _, bdf := range b.order {
		ds, _ := b.statusLocked(b.devices[bdf])
		st.Devices = append(st.Devices, ds)
	}
	for _, l := range b.leases {
		if l.pending || l.Dead {
			continue
		}
		st.Leases[LeaseGroup{BDF: l.BDF, Kind: l.Kind, State: l.State}]++
	}
	return st
}
