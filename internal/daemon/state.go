package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/hostdev"
	"github.com/mmiobroker/mmiobroker/internal/journal"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// fdStoreTimeout bounds one FDSTOREREMOVE round trip to the service manager.
const fdStoreTimeout = 10 * time.Second

// fdStore keeps the daemon's VFIO fds and dma-bufs in systemd's fd store
// (vfio.Keeper): what a previous run kept comes back from the fds passed at start.
// Frozen, it forgets nothing: a stop that keeps leases closes the daemon's copies and
// leaves the store as it is for the next run.
type fdStore struct {
	m        *systemd.Manager
	restored *systemd.Restored
	log      *slog.Logger
	frozen   atomic.Bool
}

// Take implements vfio.Keeper.
func (s *fdStore) Take(name string) *os.File { return s.restored.Take(name) }

// TakePrefix implements vfio.Keeper: the first (by name) fd whose name starts with prefix.
// Others with that prefix are stale: dropped from the store and closed.
func (s *fdStore) TakePrefix(prefix string) (string, *os.File) {
	fs := s.restored.TakePrefix(prefix)
	if len(fs) == 0 {
		return "", nil
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range fs {
			if !yield(n) {
				return
			}
		}
	})
	for _, n := range names[1:] {
		s.drop(n, fs[n])
	}
	return names[0], fs[names[0]]
}

// Keep implements vfio.Keeper.
func (s *fdStore) Keep(name string, f *os.File) error {
	return s.m.StoreFD(name, f)
}

// Forget implements vfio.Keeper: it returns once systemd has closed its copy.
func (s *fdStore) Forget(name string) error {
	if s.frozen.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), fdStoreTimeout)
	defer cancel()
	return s.m.RemoveFD(ctx, name)
}

// drop removes a restored fd nobody claimed from the store and closes it.
func (s *fdStore) drop(name string, f *os.File) {
	if err := s.Forget(name); err != nil {
		s.log.Warn("dropping an fd from the fd store failed", "fdname", name, "err", err)
	}
	f.Close()
}

// dropKept drops every restored fd the daemon kept (all but the socket units' control and
// claim) and returns how many.
func (s *fdStore) dropKept() int {
	n := 0
	for _, name := range s.restored.Names() {
		if name == "control" || name == "claim" {
			continue
		}
		if f := s.restored.Take(name); f != nil {
			s.drop(name, f)
			n++
		}
	}
	return n
}

// dropLeftovers drops every restored fd that start-up did not take back: dma-bufs no
// lease needs (claimed ones live on in their holders), and VFIO fds of devices no longer
// configured (closing the last one revokes what they exported). It returns how many
// dma-bufs it dropped.
func (s *fdStore) dropLeftovers() (bufs int) {
	for _, name := range s.restored.Names() {
		f := s.restored.Take(name)
		if f == nil {
			continue
		}
		if strings.HasPrefix(name, hostdev.BufferKeepPrefix) {
			bufs++
		} else {
			s.log.Warn("fd store held an fd no configured device took back; closing it", "fdname", name)
		}
		s.drop(name, f)
	}
	return bufs
}

// journalStore records the broker's transitions in the journal (broker.Store).
type journalStore struct{ j *journal.Journal }

// Commit implements broker.Store.
func (s journalStore) Commit(evs []broker.Event, recs []broker.Record, drop []string) error {
	jevs := make([]journal.Event, len(evs))
	for i, e := range evs {
		jevs[i] = journal.Event{Seq: e.Seq, Time: e.Time, Type: string(e.Type), Token: e.Token, CausedBy: e.CausedBy}
		if e.Type == broker.EventDeviceChanged {
			jevs[i].Lease = journal.Lease{BDF: e.Lease.BDF} // about no lease
		} else {
			jevs[i].Lease = toJournal(broker.Record{Lease: e.Lease})
		}
	}
	jls := make([]journal.Lease, len(recs))
	for i, r := range recs {
		jls[i] = toJournal(r)
	}
	return s.j.Commit(jevs, jls, drop)
}

func toJournal(r broker.Record) journal.Lease {
	l := r.Lease
	jl := journal.Lease{
		ID: l.ID, BDF: l.BDF, BAR: l.BAR, Kind: l.Kind.String(), State: l.State.String(),
		Generation: l.Generation, Inode: l.Inode, Size: l.Size,
		HolderUID: l.Holder.UID, HolderGID: r.HolderGID, HolderPID: l.Holder.PID, HolderStart: r.HolderStart,
		Tenant: l.Holder.Tenant, VMName: l.VMName, Unattested: l.Unattested, TokenDigest: r.TokenDigest,
		Created: l.Created, Claimed: l.Claimed, ClaimDeadline: l.ClaimDeadline, Expires: l.Expires,
		RevokeDeadline: l.RevokeDeadline, Ended: l.Ended, TTL: l.TTL,
		EndReason: string(l.EndReason), EndedBy: l.EndedBy, Dead: l.Dead, RevokeDue: l.RevokeDue, Seq: r.Seq,
		Reissuing: r.Reissuing, Labels: l.Labels, ClaimantPodUID: l.Claimant.PodUID, ClaimantUnit: l.Claimant.Unit,
	}
	for _, rg := range l.Ranges {
		jl.Ranges = append(jl.Ranges, journal.Range{Offset: rg.Offset, Length: rg.Length})
	}
	return jl
}

// fromJournal converts a journal record back; a record the broker cannot understand is
// an error naming it.
func fromJournal(jl journal.Lease) (broker.Record, error) {
	kind, err := broker.ParseKind(jl.Kind)
	if err != nil {
		return broker.Record{}, fmt.Errorf("lease %s: %w", jl.ID, err)
	}
	st, err := broker.ParseState(jl.State)
	if err != nil {
		return broker.Record{}, fmt.Errorf("lease %s: %w", jl.ID, err)
	}
	var r broker.Record
	l := &r.Lease
	l.ID, l.BDF, l.BAR, l.Kind, l.State = jl.ID, jl.BDF, jl.BAR, kind, st
	l.Generation, l.Inode, l.Size = jl.Generation, jl.Inode, jl.Size
	l.Holder.UID, l.Holder.PID, l.Holder.Tenant = jl.HolderUID, jl.HolderPID, broker.TenantOf(jl.HolderUID, jl.Tenant)
	l.VMName, l.Unattested = jl.VMName, jl.Unattested
	l.Created, l.Claimed, l.ClaimDeadline, l.Expires = jl.Created, jl.Claimed, jl.ClaimDeadline, jl.Expires
	l.RevokeDeadline, l.Ended, l.TTL = jl.RevokeDeadline, jl.Ended, jl.TTL
	l.EndReason, l.EndedBy, l.Dead, l.RevokeDue = broker.Reason(jl.EndReason), jl.EndedBy, jl.Dead, jl.RevokeDue
	l.Labels, l.Claimant = jl.Labels, broker.Claimant{PodUID: jl.ClaimantPodUID, Unit: jl.ClaimantUnit}
	for _, rg := range jl.Ranges {
		l.Ranges = append(l.Ranges, broker.Range{Offset: rg.Offset, Length: rg.Length})
	}
	r.HolderGID, r.HolderStart, r.TokenDigest, r.Seq, r.Reissuing = jl.HolderGID, jl.HolderStart, jl.TokenDigest, jl.Seq, jl.Reissuing
	return r, nil
}

// snapshot loads what the journal holds as the broker's restore state. Records it cannot
// read are reported and skipped: their leases are not taken back, and whatever fds they
// had are dropped as leftovers.
func snapshot(j *journal.Journal, log *slog.Logger) (*broker.Snapshot, error) {
	st, err := j.Load()
	if err != nil {
		return nil, err
	}
	snap := &broker.Snapshot{LastSeq: st.LastSeq, Records: make([]broker.Record, 0, len(st.Leases)),
		Events: make([]broker.Event, 0, len(st.Events))}
	var bad []error
	for _, jl := range st.Leases {
		r, err := fromJournal(jl)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		snap.Records = append(snap.Records, r)
	}
	for _, je := range st.Events {
		if t := broker.EventType(je.Type); t == broker.EventDeviceChanged {
			snap.Events = append(snap.Events, broker.Event{Seq: je.Seq, Time: je.Time, Type: t, Lease: broker.Lease{BDF: je.Lease.BDF}, CausedBy: je.CausedBy})
			continue
		}
		r, err := fromJournal(je.Lease)
		if err != nil {
			bad = append(bad, fmt.Errorf("event %d: %w", je.Seq, err))
			continue
		}
		snap.Events = append(snap.Events, broker.Event{Seq: je.Seq, Time: je.Time, Type: broker.EventType(je.Type), Lease: r.Lease, Token: je.Token, CausedBy: je.CausedBy})
	}
	if len(bad) > 0 {
		log.Error("journal records the daemon cannot read were skipped", "err", errors.Join(bad...))
	}
	return snap, nil
}

// repin is the broker's Options.Repin: peercred.Repin as a broker.Process.
func repin(pid int32, stamp uint64) (broker.Process, error) {
	p, err := peercred.Repin(pid, stamp)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// state is what lets the daemon restart without revoking: the fd store and the journal.
// Both or neither are used: device fds kept without a journal would bring back dma-bufs
// no lease accounts for, and a journal without the fd store would describe leases whose
// dma-bufs died with the previous run.
type state struct {
	sd    *systemd.Manager
	store *fdStore // nil: no fd store
	j     *journal.Journal
	snap  *broker.Snapshot
	log   *slog.Logger
	// observer is the broker's Observer (the daemon's metrics); nil for none.
	observer broker.Observer
}

func openState(sd *systemd.Manager, d config.Daemon, res *config.Resolved, log *slog.Logger) (*state, error) {
	s := &state{sd: sd, log: log}
	switch {
	case !sd.Managed():
		log.Warn("not started by systemd (no NOTIFY_SOCKET): a restart of the daemon will end every lease and revoke its dma-buf")
		return s, nil
	case sd.FDStoreMax() == 0:
		log.Warn("the systemd fd store is off (FileDescriptorStoreMax=0): a restart of the daemon will end every lease and revoke its dma-buf")
		return s, nil
	case d.Journal == "":
		log.Warn("the lease journal is off ([daemon] journal = \"\"): a restart of the daemon will end every lease and revoke its dma-buf")
		return s, nil
	}
	j, err := journal.Open(d.Journal, journal.Options{EventBacklog: res.Broker.EventBacklog, Log: log})
	if err != nil {
		return nil, fmt.Errorf("lease journal: %w", err)
	}
	fresh, why := j.Fresh()
	if fresh {
		log.Info("lease journal starts empty", "journal", d.Journal, "why", why)
	}
	snap, err := snapshot(j, log)
	if err != nil {
		j.Close()
		return nil, fmt.Errorf("lease journal: %w", err)
	}
	s.j, s.snap = j, snap
	s.store = &fdStore{m: sd, restored: sd.Restored(), log: log}
	if fresh {
		// Kept fds with no journal to account for them (it was lost, or is from another
		// schema): their dma-bufs may be in use by holders no lease knows. Closing the
		// device fds is their last close, which revokes every one of them.
		if n := s.store.dropKept(); n > 0 {
			log.Warn("the fd store held fds the lease journal does not account for; dropped them, which revokes their dma-bufs", "fds", n)
		}
	}
	log.Info("leases are kept across restarts", "journal", d.Journal, "fd_store_max", sd.FDStoreMax(),
		"restored_fds", len(sd.Restored().Names()), "journal_leases", len(snap.Records), "last_seq", snap.LastSeq)
	return s, nil
}

// keeps reports whether leases survive a restart.
func (s *state) keeps() bool { return s.store != nil }

func (s *state) keeper() vfio.Keeper {
	if s.store == nil {
		return nil
	}
	return s.store
}

func (s *state) brokerOptions() broker.Options {
	if s.j == nil {
		return broker.Options{Observer: s.observer}
	}
	return broker.Options{Store: journalStore{s.j}, Restore: s.snap, Repin: repin, Observer: s.observer}
}

// started drops what the fd store held that start-up did not take back. Called once the
// broker and the sockets took theirs.
func (s *state) started() {
	if s.store == nil {
		// Nothing restored is used: closing device fds revokes their dma-bufs, which no
		// lease accounts for.
		for _, name := range s.sd.Restored().Names() {
			if f := s.sd.Restored().Take(name); f != nil {
				s.log.Warn("closing an fd passed at start that is not used without the fd store", "fdname", name)
				f.Close()
			}
		}
		return
	}
	if n := s.store.dropLeftovers(); n > 0 {
		s.log.Info("dropped kept dma-bufs no lease needs (claimed ones live on in their holders)", "count", n)
	}
}

// freeze makes closing the daemon's fds leave the fd store as it is (a stop that keeps
// leases).
func (s *state) freeze() {
	if s.store != nil {
		s.store.frozen.Store(true)
	}
}

func (s *state) close() {
	if s.j != nil {
		s.j.Close()
	}
}

// activated returns the listener systemd passed under name (socket activation), or
// listens with fallback.
func activated(r *systemd.Restored, name string, fallback func() (net.Listener, error)) (net.Listener, error) {
	l, err := r.TakeListener(name)
	if err != nil {
		return nil, fmt.Errorf("socket %q passed by systemd: %w", name, err)
	}
	if l != nil {
		return l, nil
	}
	return fallback()
}

// watchdog sends WATCHDOG=1 every half interval while the broker answers a liveness
// check (its lock is free within that time, no device operation hangs); if it does not,
// systemd's watchdog kills and restarts the daemon, which keeps every lease.
func watchdog(ctx context.Context, b *broker.Broker, notify func(string) error, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, interval/2)
		err := b.Ping(pctx)
		cancel()
		if err != nil {
			log.Error("liveness check failed; not petting the watchdog", "err", err)
			continue
		}
		notifyLog(log, notify, "WATCHDOG=1")
	}
}

// extendInterval is how often extendWhile asks systemd for more time.
const extendInterval = 5 * time.Second

// extendWhile runs fn, telling systemd every few seconds that a start or stop in progress
// needs more time (EXTEND_TIMEOUT_USEC): device cycles at start (restored leases of a
// device not kept) and at a draining stop can take long.
func extendWhile(notify func(string) error, fn func() error) error {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(extendInterval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				notify(fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", (3 * extendInterval).Microseconds()))
			}
		}
	}()
	defer close(done)
	return fn()
}
