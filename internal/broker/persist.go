package broker

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Record is a lease as the broker records it in its [Store] and takes it back after a
// restart: the public [Lease] plus what only the broker knows.
type Record struct {
	Lease
	// HolderGID is the holder's gid; HolderStart its start time (see [Holder]).
	HolderGID   uint32
	HolderStart uint64
	// TokenDigest is the SHA-256 of the current unclaimed claim token; nil once claimed.
	// Tokens themselves are not recorded with the lease.
	TokenDigest []byte
	// Seq is the sequence number of the event this record was written with (0: none).
	Seq uint64
	// Reissuing marks a live lease whose device was being cycled (its fd killed) and which
	// was not reissued yet: a restart cycles the device again and reissues it.
	Reissuing bool
}

// Store records lease transitions durably (internal/journal). Commit is called with the
// broker's lock held, before anyone hears of the transitions it records: a restarted
// broker knows at least everything its clients were told.
type Store interface {
	// Commit records events (ascending, contiguous sequence numbers), the records of the
	// leases they changed, and forgets the leases in drop, in one atomic step.
	Commit(events []Event, records []Record, drop []string) error
}

// Snapshot is what a Store recorded, for [Options.Restore].
type Snapshot struct {
	Records []Record
	Events  []Event // retained events, oldest first
	LastSeq uint64
}

// Options are the optional parts of a [Broker]; see [NewWithOptions].
type Options struct {
	// Store records every lease transition; nil records nothing (a restart ends every
	// lease).
	Store Store
	// Restore is the state a previous run recorded (the broker may reorder its Records).
	// The broker takes its leases back:
	// devices the [Opener] restored ([Restorer]) keep their leases and dma-bufs as they
	// were; on a device opened afresh the previous run's dma-bufs died with it, so its
	// leases are reissued (event reissued). Event sequence numbers continue after
	// LastSeq. Holders are pinned again with Repin; one that is gone (or whose pid now
	// names another process) ends its leases (holder_exited). Deadlines are re-armed.
	Restore *Snapshot
	// Repin pins the holder process pid that started at start (clock ticks since boot);
	// it fails if pid is gone or names another process. Nil: holders are not re-pinned
	// (tests), and restored leases have no holder watch.
	Repin func(pid int32, start uint64) (Process, error)
	// Observer, if set, learns of every event, device cycle and immediate revocation (for
	// metrics); see [Observer] for what its methods may do.
	Observer Observer
}

func tokenDigest(token string) []byte {
	d := sha256.Sum256([]byte(token))
	return d[:]
}

// record returns l's Record. A claim granted but not yet committed (its fd may or may not
// have reached the holder) keeps its token's digest in the record: a broker restarted in
// between lets the holder claim again with the same token. The record of a committed claim
// keeps it too until the lease's next commit (CommitClaim writes none); restore tells the
// two apart by whether the broker's copy of the dma-buf was still kept.
func (l *lease) record() Record {
	digest := l.digest
	if digest == nil && l.Live() && !l.Claimed.IsZero() {
		digest = l.before.digest
	}
	return Record{Lease: l.Lease, HolderGID: l.holder.GID, HolderStart: l.holder.Start, TokenDigest: slices.Clone(digest), Reissuing: l.reissuing}
}

// emitLocked records and publishes the transition t of l. token is the new claim token
// of a reissued lease (only its holder may see it). An error means the transition could
// not be recorded; it is still published (it happened), and callers that grant
// something undo it instead of reporting it.
func (b *Broker) emitLocked(t EventType, l *lease, token string) error {
	return b.emitCausedLocked(t, l, token, "")
}

// emitCausedLocked is emitLocked for an event a device cycle caused: causedBy names who
// caused it (Event.CausedBy).
func (b *Broker) emitCausedLocked(t EventType, l *lease, token, causedBy string) error {
	e := Event{Seq: b.events.next, Time: b.now(), Type: t, Lease: l.Lease, Token: token, CausedBy: causedBy}
	err := b.commitLocked([]Event{e}, l)
	b.events.append(e)
	b.obs.Event(e)
	return err
}

// emitDeviceLocked records and publishes an [EventDeviceChanged] of d; by names who
// caused it, if anyone did. Like a lease event it takes a sequence number, so it is
// recorded too: a restarted broker must not number another event with it.
func (b *Broker) emitDeviceLocked(d *device, by string) {
	e := Event{Seq: b.events.next, Time: b.now(), Type: EventDeviceChanged, Lease: Lease{BDF: d.policy.BDF}, CausedBy: by}
	if err := b.recordLocked([]Event{e}, nil); err != nil {
		b.log.Error("recording a device change failed", "bdf", d.policy.BDF, "err", err)
	}
	b.events.append(e)
	b.obs.Event(e)
}

// persistLocked records l without an event (a change no client was told of).
func (b *Broker) persistLocked(l *lease) error { return b.commitLocked(nil, l) }

// recordLocked commits evs, recs and the leases the broker forgot (b.dropped) to the
// store in one step, if there is a store; the forgotten leases are then recorded.
func (b *Broker) recordLocked(evs []Event, recs []Record) error {
	if b.store != nil {
		if err := b.store.Commit(evs, recs, b.dropped); err != nil {
			return err
		}
	}
	b.dropped = b.dropped[:0]
	return nil
}

func (b *Broker) commitLocked(evs []Event, l *lease) error {
	var recs []Record
	if b.store != nil && !slices.Contains(b.dropped, l.ID) { // else forgotten by the transition itself (the oldest ended lease died)
		rec := l.record()
		if len(evs) > 0 {
			rec.Seq = evs[len(evs)-1].Seq
		}
		recs = []Record{rec}
	}
	if err := b.recordLocked(evs, recs); err != nil {
		b.log.Error("recording a lease transition failed: a restart would not know it", "lease_id", l.ID, "err", err)
		return fmt.Errorf("record lease %s: %w: %w", l.ID, err, errdefs.ErrUnavailable)
	}
	return nil
}

// persistEachLocked records the leases of ls (distinct) without events, in one commit.
func (b *Broker) persistEachLocked(ls []*lease) error {
	return b.emitEachLocked("", ls, "")
}

// emitEachLocked records and publishes the transition t of every lease of ls (distinct
// leases) in one commit: a device cycle that buries a thousand ended-but-live leases
// writes one journal transaction, not a thousand. causedBy is as for emitCausedLocked.
// An error means the transitions could not be recorded; they are still published.
func (b *Broker) emitEachLocked(t EventType, ls []*lease, causedBy string) error {
	if len(ls) == 0 {
		return nil
	}
	var evs []Event // none for persistEachLocked (t == "")
	if t != "" {
		now := b.now()
		evs = make([]Event, len(ls))
		for i, l := range ls {
			evs[i] = Event{Seq: b.events.next + uint64(i), Time: now, Type: t, Lease: l.Lease, CausedBy: causedBy}
		}
	}
	var recs []Record
	if b.store != nil {
		dropped := make(map[string]bool, len(b.dropped))
		for _, id := range b.dropped {
			dropped[id] = true
		}
		recs = make([]Record, 0, len(ls))
		for i, l := range ls {
			if dropped[l.ID] {
				continue // forgotten already: dropped by this commit
			}
			r := l.record()
			if evs != nil {
				r.Seq = evs[i].Seq
			}
			recs = append(recs, r)
		}
	}
	err := b.recordLocked(evs, recs)
	if err != nil {
		b.log.Error("recording lease transitions failed: a restart would not know them", "event", string(t), "leases", len(ls), "err", err)
		for _, l := range ls {
			b.log.Error("lease transition not recorded", "lease_id", l.ID)
		}
		err = fmt.Errorf("record %d leases: %w: %w", len(ls), err, errdefs.ErrUnavailable)
	}
	for _, e := range evs {
		b.events.append(e)
		b.obs.Event(e)
	}
	return err
}

// restore takes back the leases a previous run recorded (see [Options.Restore]). Called
// from NewWithOptions after the devices were opened, before the broker is shared.
func (b *Broker) restore(recs []Record) {
	slices.SortFunc(recs, func(x, y Record) int {
		if c := x.Created.Compare(y.Created); c != 0 {
			return c
		}
		return cmpString(x.ID, y.ID)
	})
	type exited struct {
		id  string
		pid int32
	}
	var gone []exited
	repinFailed := map[string]error{} // by holderKey
	reissue := map[*device][]*lease{}
	cycle := map[*device]bool{}
	now := b.now()
	b.mu.Lock()
	if len(b.leases) == 0 {
		b.leases = make(map[string]*lease, len(recs))
	}
	for _, r := range recs {
		if _, dup := b.leases[r.ID]; dup || r.ID == "" {
			continue
		}
		l := &lease{Lease: r.Lease, digest: slices.Clone(r.TokenDigest)}
		l.Holder.Tenant = TenantOf(l.Holder.UID, l.Holder.Tenant)
		l.holder = Holder{UID: r.Holder.UID, GID: r.HolderGID, PID: r.Holder.PID, Start: r.HolderStart, Tenant: l.Holder.Tenant}
		d := b.devices[r.BDF]
		if !l.Live() {
			b.leases[l.ID] = l
			b.indexLocked(l)
			b.ended = append(b.ended, l.ID)
			if l.Dead {
				continue
			}
			b.countLive(l, +1) // counts until dead
			switch {
			case d == nil || !restoredDevice(d.dev):
				// Its fd died with the previous run's device fd.
				b.setDeadLocked(l)
				b.persistLocked(l)
			case l.RevokeDue.IsZero():
				// Revoked at once, but the run that revoked it stopped before the device
				// cycle completed: cycle now, before anyone can use the device.
				cycle[d] = true
				d.addReleased(l) // marked dead by that cycle
			default:
				// Ended by its tenant: its fd may still be in use until the device's
				// next cycle, due at l.RevokeDue (scheduled below).
				d.addReleased(l)
			}
			continue
		}
		b.leases[l.ID] = l
		b.indexLocked(l)
		if d == nil || d.dev == nil {
			why := "the device is no longer configured"
			if d != nil {
				why = fmt.Sprint(d.err)
			}
			b.countLive(l, +1)
			if d != nil {
				d.addLive(l)
			}
			b.endLocked(l, StateRevoked, ReasonRestoreFailed, "broker (restart)")
			b.emitLocked(EventRevoked, l, "")
			b.log.Warn("lease ended at restart: its device is unusable", "lease_id", l.ID, "bdf", l.BDF, "why", why)
			continue
		}
		d.addLive(l)
		b.countLive(l, +1)
		switch {
		case r.Reissuing && restoredDevice(d.dev):
			// A cycle killed (or was about to kill) its fd, and the run stopped before
			// the reissue: cycle again, which reissues it.
			cycle[d] = true
		case !restoredDevice(d.dev):
			// The previous run's dma-bufs died with its device fd: a new generation.
			reissue[d] = append(reissue[d], l)
		case l.digest != nil:
			// A token is outstanding: the broker needs its copy of the dma-buf to hand out.
			buf, err := d.dev.(Restorer).AdoptBuffer(l.Inode)
			if err != nil && l.State == StateActive && !l.Claimed.IsZero() {
				// Claimed, and the copy let go: the claim's fd was delivered (CommitClaim
				// records nothing; only a delivered claim lets the copy go, and every
				// exported copy is kept until then). Nothing to hand out again.
				l.digest = nil
				break
			}
			if err != nil {
				b.log.Warn("a lease's dma-buf was not kept; reissuing it", "lease_id", l.ID, "inode", l.Inode, "err", err)
				reissue[d] = append(reissue[d], l)
				break
			}
			l.buf = buf
		}
		if b.repin != nil && !l.Delegated() {
			// One pin per holder process, however many leases it holds (and one failed
			// repin per process that is gone).
			key := holderKey(l)
			// Pinned by this restore (b.mu is held throughout): if it has exited since,
			// its watcher ends every lease joined here once restore lets go of the lock.
			if h := b.holders[key]; h != nil {
				h.leases[l.ID] = l
				l.hp = h
				b.rearmLocked(l, now)
				continue
			}
			err, failed := repinFailed[key]
			var p Process
			if !failed {
				if p, err = b.repin(l.Holder.PID, l.holder.Start); err != nil {
					repinFailed[key] = err
				}
			}
			if err != nil {
				gone = append(gone, exited{l.ID, l.Holder.PID})
				b.log.Info("lease holder gone across the restart", "lease_id", l.ID, "client_pid", l.Holder.PID, "err", err)
			} else {
				l.holder.Proc = p
				b.watchHolder(l)
			}
		}
		b.rearmLocked(l, now)
	}
	for _, d := range b.devices {
		b.scheduleLocked(d)
	}
	b.mu.Unlock()
	b.log.Info("leases restored", "leases", len(recs), "live", b.live, "reissue", len(reissue), "holders_gone", len(gone),
		"last_seq", b.events.next-1)

	for d := range cycle {
		d.w.run(func() {
			b.log.Warn("a revoke was recorded but its device cycle did not complete before the restart; cycling the device now", "bdf", d.policy.BDF)
			if _, err := b.cycleDevice(d, cycleCause{by: "broker (restart)", why: "revoke interrupted by a restart"}, nil); err != nil {
				b.log.Error("cycling a device at restart failed", "bdf", d.policy.BDF, "err", err)
			}
		})
	}
	for d, ls := range reissue {
		if cycle[d] {
			continue // the cycle above reissued them
		}
		d.w.run(func() {
			b.log.Warn("device was not kept open across the restart: its dma-bufs died with the previous run; reissuing its leases",
				"bdf", d.policy.BDF, "leases", len(ls))
			b.reissue(d, d.dev, ls, "broker (restart)")
		})
	}
	for _, g := range gone {
		if _, err := b.endByTenant(g.id, StateReleased, ReasonHolderExited, fmt.Sprintf("pid %d exited", g.pid), EventReleased); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
			b.log.Error("ending the lease of a holder gone across the restart failed", "lease_id", g.id, "err", err)
		}
	}
}

// rearmLocked starts l's timers again from its recorded deadlines: those already past fire
// at once.
func (b *Broker) rearmLocked(l *lease, now time.Time) {
	id, gen := l.ID, l.Generation
	if l.State == StateAllocated && l.digest != nil && !l.ClaimDeadline.IsZero() {
		l.deadline = l.ClaimDeadline
		l.timer = time.AfterFunc(max(l.deadline.Sub(now), 0), func() { b.expire(id, gen) })
	}
	if !l.Expires.IsZero() {
		l.ttl = time.AfterFunc(max(l.Expires.Sub(now), 0), func() { b.expireTTL(id) })
	}
	if !l.RevokeDeadline.IsZero() {
		who := "broker (revoke deadline)"
		l.grace = time.AfterFunc(max(l.RevokeDeadline.Sub(now), 0), func() { b.revokeAtDeadline(id, who) })
	}
}

func restoredDevice(dev Device) bool {
	r, ok := dev.(Restorer)
	return ok && r.Restored()
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
