package broker

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/failpoint"
)

// Broker owns the configured devices and their leases. Its methods are safe for
// concurrent use.
type Broker struct {
	cfg  Config
	open Opener
	log  *slog.Logger
	now  func() time.Time

	mu        sync.Mutex // guards everything below, and every device's state and leases
	closed    bool
	draining  bool                   // Drain ran: new leases are refused
	detached  bool                   // Detach ran: devices are kept open outside the process, not closed
	devices   map[string]*device     // by BDF
	order     []string               // BDFs in configuration order
	leases    map[string]*lease      // every lease ever granted, live or ended (ended ones bounded)
	byAge     []*lease               // the leases that are not pending, oldest first (list.go)
	holders   map[string]*holderProc // live leases' holder processes, by holderKey
	ended     []string               // ended lease IDs, oldest first, for bounded retention
	live      int                    // leases not dead: live, pending, or ended but live
	perTenant map[string]int         // leases not dead, by holder tenant
	cycles    map[string][]time.Time // device cycles each tenant caused within the budget window
	events    *eventLog
	store     Store    // nil: nothing recorded
	dropped   []string // ended leases forgotten since the last commit
	repin     func(pid int32, start uint64) (Process, error)
	obs       Observer // never nil

	watchers sync.WaitGroup // holder and notice watchers
}

// device is a configured device. Its worker runs its kernel operations (open, export,
// cycle, suspend, close) one at a time, so that validation, export and commit of one
// allocation, and the steps of one revocation, are atomic with respect to each other.
// Its fields are guarded by Broker.mu; dev changes only on the worker.
type device struct {
	w      *worker
	policy DeviceConfig
	dev    Device // nil if not open
	info   DeviceInfo
	err    error             // why dev is nil
	live   map[string]*lease // allocated and active leases (addLive, removeLive)
	spans  spanIndex         // the ranges of live

	pending   []*revokeReq // revocations waiting for the next device cycle
	suspended bool         // memory decode off for maintenance
	errors    uint64       // error notices (AER) since open
	// released are the ended-but-live leases: they ended without a revoke after their fd
	// was delivered, and their holders may still use those ranges until the next device
	// cycle (due at the latest at each one's RevokeDue). An allocation that must not share
	// them cycles the device first. Changed only through addReleased and clearReleased.
	released      []*lease
	releasedSpans spanIndex // the ranges of released
	// cycleAt is when the scheduled cycle (cycleTimer) runs; zero if none is scheduled.
	cycleAt    time.Time
	cycleTimer *time.Timer
	// urgent is set while an allocation waits for a cycle that C delays.
	urgent bool
	// lastTenantCycle is when a tenant's action last made the device cycle (C counts
	// from it).
	lastTenantCycle time.Time
}

// maxReleased bounds device.released: at it, the next allocation cycles the device.
const maxReleased = 1024

// lease is a lease record; guarded by Broker.mu.
type lease struct {
	Lease
	holder   Holder
	buf      Buffer
	digest   []byte // sha256 of the current unclaimed claim token; nil once claimed
	deadline time.Time
	timer    *time.Timer // claim expiry
	ttl      *time.Timer // time to live
	grace    *time.Timer // cooperative revoke deadline
	hp       *holderProc // the holder process, shared with its other live leases (holderproc.go)
	pending  bool        // being exported: invisible to Get, List and Claim
	// reissuing is set (and recorded) while a device cycle kills this live lease's fd and
	// before the lease is reissued: a broker restarted in between cycles the device again.
	reissuing bool
	// before is the lease as it was before the last claim, for Unclaim.
	before struct {
		state     State
		digest    []byte
		deadline  time.Time
		delegated bool // the claim made the claiming process the holder of a delegated lease
	}
}

// ErrBadToken is the class of claims whose token is wrong, already used, or from an older
// generation. It is also errdefs.ErrPermissionDenied.
var ErrBadToken = fmt.Errorf("claim token is wrong or already used: %w", errdefs.ErrPermissionDenied)

// maxEndedLeases bounds how many ended leases stay visible to Get and List.
const maxEndedLeases = 1024

// New returns a broker for cfg that opens devices with open. It opens every configured
// device now; a device that fails to open stays listed with its error and is retried when
// someone asks to lease it.
func New(cfg Config, open Opener, log *slog.Logger) (*Broker, error) {
	return NewWithOptions(cfg, open, log, Options{})
}

// NewWithOptions is [New] with a [Store] that records every lease transition and, with
// Options.Restore, the state a previous run recorded: see [Options].
func NewWithOptions(cfg Config, open Opener, log *slog.Logger, opt Options) (*Broker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("broker config: %w", err)
	}
	cfg = cfg.WithDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Broker{
		cfg:       cfg,
		open:      open,
		log:       log,
		now:       time.Now,
		devices:   map[string]*device{},
		leases:    map[string]*lease{},
		holders:   map[string]*holderProc{},
		perTenant: map[string]int{},
		cycles:    map[string][]time.Time{},
		events:    newEventLog(cfg.EventBacklog),
		store:     opt.Store,
		repin:     opt.Repin,
		obs:       opt.Observer,
	}
	if b.obs == nil {
		b.obs = nopObserver{}
	}
	if opt.Restore != nil {
		b.events.restore(opt.Restore.Events, opt.Restore.LastSeq)
	}
	for _, dc := range cfg.Devices {
		d := &device{w: newWorker(b.now), policy: dc, live: map[string]*lease{}, info: DeviceInfo{BDF: dc.BDF, IOMMUGroup: -1}}
		b.devices[dc.BDF] = d
		b.order = append(b.order, dc.BDF)
		d.w.run(func() { b.openDevice(d) })
	}
	if opt.Restore != nil {
		b.restore(opt.Restore.Records)
	}
	return b, nil
}

// openDevice opens d if it is not open. Runs on d's worker.
func (b *Broker) openDevice(d *device) {
	b.mu.Lock()
	skip := d.dev != nil || b.closed
	b.mu.Unlock()
	if skip {
		return
	}
	dev, err := b.open(d.policy.BDF)
	var info DeviceInfo
	if err == nil {
		info = dev.Info()
		info.BDF = d.policy.BDF
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		d.err = fmt.Errorf("device %s: open: %w", d.policy.BDF, err)
		b.log.Warn("device unusable", "bdf", d.policy.BDF, "err", err)
		return
	}
	if b.closed { // closed while opening
		dev.Close()
		return
	}
	wasUnusable := d.err != nil // lost, or failed to open (at start, the device is neither)
	d.dev, d.info, d.err, d.suspended, d.errors = dev, info, nil, false, 0
	b.buryLocked(d, "broker (device reopened)") // the device was closed since they ended
	if wasUnusable {
		b.emitDeviceLocked(d, "")
	}
	if n, ok := dev.(Notifier); ok {
		b.watchers.Add(1)
		go b.watchNotices(d, dev, n.Notices())
	}
	b.log.Info("device opened", "bdf", info.BDF, "mode", info.Mode, "driver", info.Driver,
		"iommu_group", info.IOMMUGroup, "dma_buf", errString(info.DMABuf, "supported"))
}

func errString(err error, ok string) string {
	if err == nil {
		return ok
	}
	return err.Error()
}

// Available returns an error classified ErrUnavailable once the broker is closed or
// detached (a stopping daemon): its devices then all read as closed, which says nothing
// about the devices themselves, so callers that publish device state must not act on it.
func (b *Broker) Available() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return fmt.Errorf("broker is shutting down: %w", errdefs.ErrUnavailable)
	}
	return nil
}

// Devices returns every configured device in configuration order.
func (b *Broker) Devices() []DeviceStatus {
	b.mu.Lock()
	out := make([]DeviceStatus, 0, len(b.order))
	devs := make([]Device, 0, len(b.order))
	for _, bdf := range b.order {
		st, dev := b.statusLocked(b.devices[bdf])
		out, devs = append(out, st), append(devs, dev)
	}
	b.mu.Unlock()
	for i, dev := range devs {
		fillInfo(&out[i], dev)
	}
	return out
}

// Device returns the configured device bdf.
func (b *Broker) Device(bdf string) (DeviceStatus, error) {
	b.mu.Lock()
	d, ok := b.devices[bdf]
	if !ok {
		b.mu.Unlock()
		return DeviceStatus{}, fmt.Errorf("device %s is not configured: %w", bdf, errdefs.ErrNotFound)
	}
	st, dev := b.statusLocked(d)
	b.mu.Unlock()
	fillInfo(&st, dev)
	return st, nil
}

// statusLocked returns d's status and its open device, whose fresh Info the caller adds
// with fillInfo after unlocking: a device's Info may wait for a device cycle in progress,
// which must not stall the whole broker.
func (b *Broker) statusLocked(d *device) (DeviceStatus, Device) {
	return DeviceStatus{Info: d.info, Policy: d.policy, Err: d.err, LiveLeases: len(d.live),
		Suspended: d.suspended, Errors: d.errors, EndedLive: len(d.released), CycleAt: d.cycleAt,
		LastTenantCycle: d.lastTenantCycle}, d.dev
}

func fillInfo(st *DeviceStatus, dev Device) {
	if dev != nil {
		st.Info = dev.Info()
		st.Info.BDF = st.Policy.BDF
	}
}

// Allocate exports the requested ranges as a dma-buf and returns the new lease and its
// claim token. It takes ownership of req.Holder.Proc. Nothing changes if it fails.
func (b *Broker) Allocate(req AllocateRequest) (_ Lease, token string, err error) {
	defer func() {
		if err != nil && req.Holder.Proc != nil {
			req.Holder.Proc.Close()
		}
	}()
	d, err := b.deviceFor(req.BDF)
	if err != nil {
		return Lease{}, "", err
	}
	if req.Kind == 0 {
		req.Kind = KindShared
	}
	if !mayLease(d.policy, req.Holder, req.Admin) {
		return Lease{}, "", fmt.Errorf("device %s: uid %d may not lease it: %w", req.BDF, req.Holder.UID, errdefs.ErrPermissionDenied)
	}
	if err := b.checkTTL(req.TTL, req.Admin); err != nil {
		return Lease{}, "", fmt.Errorf("device %s: %w", req.BDF, err)
	}
	if !req.Claimant.IsZero() {
		if err := b.delegate(&req); err != nil {
			return Lease{}, "", fmt.Errorf("device %s: %w", req.BDF, err)
		}
	} else {
		req.Holder.Tenant = TenantOf(req.Holder.UID, req.Holder.Tenant)
	}
	var l Lease
	if werr := d.w.run(func() { l, token, err = b.allocateOn(d, req) }); werr != nil {
		return Lease{}, "", fmt.Errorf("device %s: %w", req.BDF, werr)
	}
	return l, token, err
}

// allocateOn is Allocate's work on d's worker.
func (b *Broker) allocateOn(d *device, req AllocateRequest) (_ Lease, token string, err error) {
	b.openDevice(d) // retry a device that failed to open
	b.mu.Lock()
	if d.dev == nil {
		err := d.err
		b.mu.Unlock()
		return Lease{}, "", fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
	}
	dev, suspended := d.dev, d.suspended
	b.mu.Unlock()
	if suspended {
		return Lease{}, "", fmt.Errorf("device %s is suspended for maintenance: %w", req.BDF, errdefs.ErrFailedPrecondition)
	}
	info := dev.Info() // fresh TSM state
	info.BDF = req.BDF

	l, err := b.reserve(d, info, req)
	if err != nil {
		return Lease{}, "", err
	}
	if err := b.cycleForAllocation(d, req); err != nil {
		b.mu.Lock()
		d.removeLive(l)
		delete(b.leases, l.ID)
		b.countLive(l, -1)
		b.mu.Unlock()
		return Lease{}, "", err
	}
	buf, err := dev.Export(req.BAR, req.Ranges, bufferName(l.ID))
	if err == nil {
		failpoint.Hit(failpoint.AfterExport)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err == nil && b.closed {
		buf.Close()
		err = fmt.Errorf("broker is shutting down: %w", errdefs.ErrUnavailable)
	}
	if err != nil {
		d.removeLive(l)
		delete(b.leases, l.ID)
		b.countLive(l, -1)
		return Lease{}, "", fmt.Errorf("device %s: bar %d: export %v: %w", req.BDF, req.BAR, req.Ranges, err)
	}
	now := b.now()
	l.pending = false
	l.buf = buf
	l.Inode, l.Size = buf.Inode(), buf.Size()
	l.Created = now
	b.indexLocked(l)
	token = newToken()
	l.digest = tokenDigest(token)
	id, gen := l.ID, l.Generation
	if !l.Delegated() { // a delegated lease waits for its claimant's VMM, however long it takes to start
		l.deadline = now.Add(b.cfg.ClaimTimeout)
		l.ClaimDeadline = l.deadline
		l.timer = time.AfterFunc(b.cfg.ClaimTimeout, func() { b.expire(id, gen) })
	}
	if req.TTL > 0 {
		l.TTL, l.Expires = req.TTL, now.Add(req.TTL)
		l.ttl = time.AfterFunc(req.TTL, func() { b.expireTTL(id) })
	}
	b.watchHolder(l)
	if err := b.emitLocked(EventAllocated, l, ""); err != nil {
		// Not recorded, so not granted: a restart would not know it.
		b.endLocked(l, StateReleased, ReasonJournalFailed, "broker")
		b.forgetLocked(l)
		b.ended = slices.DeleteFunc(b.ended, func(id string) bool { return id == l.ID })
		return Lease{}, "", fmt.Errorf("device %s: %w", req.BDF, err)
	}
	failpoint.Hit(failpoint.AfterJournal)
	b.log.Info("lease allocated", "lease_id", l.ID, "bdf", l.BDF, "bar", l.BAR, "ranges", fmt.Sprint(l.Ranges),
		"kind", l.Kind.String(), "uid", l.Holder.UID, "client_pid", l.Holder.PID, "inode", l.Inode, "unattested", l.Unattested)
	return l.Lease, token, nil
}

func (b *Broker) deviceFor(bdf string) (*device, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("broker is shutting down: %w", errdefs.ErrUnavailable)
	}
	if b.draining {
		return nil, fmt.Errorf("the daemon was drained for a stop and grants no leases until it restarts: %w", errdefs.ErrFailedPrecondition)
	}
	d, ok := b.devices[bdf]
	if !ok {
		return nil, fmt.Errorf("device %s is not configured: %w", bdf, errdefs.ErrNotFound)
	}
	return d, nil
}

// reserve validates req and records a pending lease. Runs on d's worker.
func (b *Broker) reserve(d *device, info DeviceInfo, req AllocateRequest) (*lease, error) {
	if info.DMABuf != nil {
		return nil, fmt.Errorf("device %s: %w: %w", req.BDF, info.DMABuf, errdefs.ErrFailedPrecondition)
	}
	if !slices.Contains(d.policy.Kinds, req.Kind) {
		return nil, fmt.Errorf("device %s: %s leases are not allowed by policy: %w", req.BDF, req.Kind, errdefs.ErrPermissionDenied)
	}
	if err := validateRanges(info, d.policy, req.BAR, req.Ranges, b.cfg.PageSize, b.cfg.Limits.MaxRangesPerLease); err != nil {
		return nil, err
	}
	unattested := false
	if req.Kind == KindPrivate && info.TSM.Bound == "" {
		if !d.policy.AllowUnattestedPrivate {
			return nil, fmt.Errorf("device %s: private lease needs the device bound to a TSM (tsm/bound is empty): %w", req.BDF, errdefs.ErrFailedPrecondition)
		}
		unattested = true
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("broker is shutting down: %w", errdefs.ErrUnavailable)
	}
	var conflict error
	d.spans.overlapping(req.BAR, req.Ranges, func(o *lease) bool {
		switch {
		case req.Kind == KindPrivate || o.Kind == KindPrivate:
			conflict = fmt.Errorf("device %s: bar %d: ranges %v overlap %s lease %s %v; private ranges are exclusive: %w",
				req.BDF, req.BAR, req.Ranges, o.Kind, o.ID, o.Ranges, errdefs.ErrFailedPrecondition)
		case o.Holder.Tenant != req.Holder.Tenant:
			conflict = fmt.Errorf("device %s: bar %d: ranges %v overlap lease %s %v of another tenant (%s): %w",
				req.BDF, req.BAR, req.Ranges, o.ID, o.Ranges, o.Holder.Tenant, errdefs.ErrFailedPrecondition)
		}
		return conflict == nil
	})
	if conflict != nil {
		return nil, conflict
	}
	total, mine := b.live, b.perTenant[req.Holder.Tenant]
	if mine >= b.cfg.Limits.MaxLeasesPerHolder {
		return nil, fmt.Errorf("tenant %s holds %d leases (ended leases whose fds still work included), the limit: %w", req.Holder.Tenant, mine, errdefs.ErrResourceExhausted)
	}
	if total >= b.cfg.Limits.MaxLeases {
		return nil, fmt.Errorf("the broker holds %d leases, the limit: %w", total, errdefs.ErrResourceExhausted)
	}
	l := &lease{holder: req.Holder, pending: true}
	l.ID = newLeaseID()
	l.BDF, l.BAR, l.Ranges, l.Kind = req.BDF, req.BAR, slices.Clone(req.Ranges), req.Kind
	l.State, l.Generation = StateAllocated, 1
	l.Holder.UID, l.Holder.PID, l.Holder.Tenant = req.Holder.UID, req.Holder.PID, req.Holder.Tenant
	l.VMName, l.Unattested = req.VMName, unattested
	l.Claimant, l.Labels = req.Claimant, maps.Clone(req.Labels)
	b.leases[l.ID] = l
	d.addLive(l)
	b.countLive(l, +1)
	return l, nil
}

// Claim hands the holder of lease id a new fd of its current dma-buf, in exchange for the
// lease's claim token. The caller sends and closes the fd. The token is single-use.
func (b *Broker) Claim(id, token string, peer Peer) (Lease, *os.File, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || l.pending {
		return Lease{}, nil, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	if !l.Live() {
		return Lease{}, nil, fmt.Errorf("lease %s has ended (%s): %w", id, l.EndReason, errdefs.ErrFailedPrecondition)
	}
	if l.digest == nil || subtle.ConstantTimeCompare(l.digest, tokenDigest(token)) != 1 {
		return Lease{}, nil, fmt.Errorf("lease %s: %w", id, ErrBadToken)
	}
	if l.State == StateAllocated && !l.deadline.IsZero() && !b.now().Before(l.deadline) {
		return Lease{}, nil, fmt.Errorf("lease %s: claim token expired at %s: %w", id, l.deadline.Format(time.RFC3339), errdefs.ErrDeadlineExceeded)
	}
	delegated := l.Delegated()
	switch {
	case delegated:
		if err := b.claimDelegatedLocked(l, peer); err != nil {
			return Lease{}, nil, err
		}
	case peer.UID != l.Holder.UID || peer.PID != l.Holder.PID:
		return Lease{}, nil, fmt.Errorf("lease %s: claim from uid %d pid %d, but the lease was allocated by uid %d pid %d: %w",
			id, peer.UID, peer.PID, l.Holder.UID, l.Holder.PID, errdefs.ErrPermissionDenied)
	}
	undelegate := func() {
		if delegated {
			b.undelegateLocked(l)
		}
	}
	if !l.holderAlive() {
		undelegate()
		return Lease{}, nil, fmt.Errorf("lease %s: the allocating process %d has exited (pid reused?): %w", id, l.Holder.PID, errdefs.ErrPermissionDenied)
	}
	if b.closed || l.buf == nil {
		undelegate()
		return Lease{}, nil, fmt.Errorf("lease %s: the broker is stopping: %w", id, errdefs.ErrUnavailable)
	}
	f, err := l.buf.Dup()
	if err != nil {
		undelegate()
		return Lease{}, nil, fmt.Errorf("lease %s: duplicate dma-buf fd: %w", id, err)
	}
	l.before.state, l.before.digest, l.before.deadline, l.before.delegated = l.State, l.digest, l.deadline, delegated
	l.digest = nil
	l.ClaimDeadline = time.Time{}
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	l.State = StateActive
	l.Claimed = b.now()
	if err := b.emitLocked(EventClaimed, l, ""); err != nil {
		// Not recorded: a restart would hand the token out again. Undo the claim.
		f.Close()
		l.State, l.digest, l.Claimed = l.before.state, l.before.digest, time.Time{}
		l.before.digest = nil
		undelegate()
		if l.State == StateAllocated && !l.before.deadline.IsZero() { // a delegated lease has none
			l.deadline, l.ClaimDeadline = l.before.deadline, l.before.deadline
			gen := l.Generation
			l.timer = time.AfterFunc(max(l.deadline.Sub(b.now()), 0), func() { b.expire(id, gen) })
		}
		return Lease{}, nil, fmt.Errorf("lease %s: %w", id, err)
	}
	failpoint.Hit(failpoint.AfterJournal)
	// Debug: the claim server logs the outcome ("claim delivered" or why not).
	b.log.Debug("lease claimed", "lease_id", id, "generation", l.Generation, "client_pid", peer.PID, "inode", l.Inode)
	return l.Lease, f, nil
}

// CommitClaim completes the claim of generation gen of lease id once its fd reached the
// holder: the broker closes its own copy of the dma-buf, so that the holder's close frees
// it, unless the device revokes dma-bufs one by one ([BufferRevoker]), which needs the
// copy. It does nothing if the lease ended or moved on meanwhile.
func (b *Broker) CommitClaim(id string, gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || !l.Live() || l.Generation != gen || l.digest != nil || l.Claimed.IsZero() {
		return
	}
	// The record keeps the token's digest until the lease's next commit: no commit of its
	// own here (one of four per lease round trip). A restart in between finds the claim
	// either still in flight (the broker's copy is still kept: the holder may claim once
	// more with the same token, getting the same generation) or delivered (the copy was let
	// go below, which only a delivered claim does: restore clears the digest).
	l.before.digest = nil
	if l.buf == nil {
		return
	}
	if d := b.devices[l.BDF]; d != nil {
		if br, ok := d.dev.(BufferRevoker); ok && br.CanRevokeBuffers() {
			return
		}
	}
	l.buf.Close()
	l.buf = nil
}

// Unclaim undoes the claim of generation gen of lease id whose fd could not be delivered
// (the claim socket's sendmsg failed or the peer went away first): the token is valid
// again, and an allocated lease's claim deadline is what it was. It does nothing if the
// lease ended or moved on meanwhile.
func (b *Broker) Unclaim(id string, gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || !l.Live() || l.Generation != gen || l.digest != nil || l.Claimed.IsZero() || l.before.digest == nil {
		return
	}
	l.State, l.digest, l.Claimed = l.before.state, l.before.digest, time.Time{}
	l.before.digest = nil
	if l.before.delegated {
		b.undelegateLocked(l)
	}
	if l.State == StateAllocated && !l.before.deadline.IsZero() { // a delegated lease has none
		l.deadline, l.ClaimDeadline = l.before.deadline, l.before.deadline
		l.timer = time.AfterFunc(max(l.deadline.Sub(b.now()), 0), func() { b.expire(id, gen) })
	}
	if err := b.persistLocked(l); err != nil {
		b.log.Error("recording an undone claim failed", "lease_id", id, "err", err)
	}
	b.log.Warn("claim undone: the fd was not delivered", "lease_id", id, "generation", gen)
}

// Get returns lease id.
func (b *Broker) Get(id string) (Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || l.pending {
		return Lease{}, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	return l.Lease, nil
}

// GetAs returns lease id if by may see it (its holder's tenant, or an admin): callers
// learn nothing about other tenants' leases beyond that they exist.
func (b *Broker) GetAs(id string, by Actor) (Lease, error) {
	l, err := b.Get(id)
	if err != nil {
		return Lease{}, err
	}
	if !MayView(by, l) {
		return Lease{}, fmt.Errorf("lease %s is held by another tenant than %s (%s): %w", id, by.tenant(), by, errdefs.ErrPermissionDenied)
	}
	return l, nil
}

// Release ends lease id on behalf of its holder's tenant or an admin. It does not revoke
// at once: the holder's fd keeps working until its device's next cycle, which comes at
// the latest Config.RevokeWithin later (the lease is ended-but-live until then; see
// [Broker.endByTenant]). If a cooperative revoke is pending, the release completes it:
// the lease's fd is revoked at once.
func (b *Broker) Release(id string, by Actor) (Lease, error) {
	b.mu.Lock()
	l, ok := b.leases[id]
	if !ok || l.pending {
		b.mu.Unlock()
		return Lease{}, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	if err := mayChange(by, l, "release"); err != nil {
		b.mu.Unlock()
		return Lease{}, err
	}
	if !l.Live() {
		b.mu.Unlock()
		return Lease{}, fmt.Errorf("lease %s has already ended (%s): %w", id, l.EndReason, errdefs.ErrFailedPrecondition)
	}
	pendingRevoke := !l.RevokeDeadline.IsZero()
	b.mu.Unlock()
	if pendingRevoke {
		snap, _, err := b.enforceCount(l, StateReleased, ReasonReleased, by.String(), EventReleased,
			cycleCause{by: "admin (cooperative revoke of lease " + id + ")", why: "release during a cooperative revoke"})
		return snap, err
	}
	return b.endByTenant(id, StateReleased, ReasonReleased, by.String(), EventReleased)
}

// endLocked moves l to a final state and frees what it holds.
func (b *Broker) endLocked(l *lease, st State, why Reason, by string) {
	l.State, l.EndReason, l.EndedBy, l.Ended = st, why, by, b.now()
	l.digest = nil
	l.ClaimDeadline, l.RevokeDeadline = time.Time{}, time.Time{}
	for _, t := range []**time.Timer{&l.timer, &l.ttl, &l.grace} {
		if *t != nil {
			(*t).Stop()
			*t = nil
		}
	}
	b.unwatchHolder(l)
	if l.buf != nil {
		l.buf.Close()
		l.buf = nil
	}
	if l.holder.Proc != nil {
		l.holder.Proc.Close()
		l.holder.Proc = nil
	}
	if d := b.devices[l.BDF]; d != nil {
		d.removeLive(l)
	}
	b.ended = append(b.ended, l.ID)
	if l.Claimed.IsZero() { // an fd of it never left the broker
		b.setDeadLocked(l)
	}
	b.trimEndedLocked()
}

// trimEndedLocked forgets the oldest ended leases beyond maxEndedLeases. An ended lease
// whose fd may still work is kept until it is dead (those count against their tenants'
// limits, which bounds them). Called with b.mu held.
func (b *Broker) trimEndedLocked() {
	for len(b.ended) > maxEndedLeases {
		l := b.leases[b.ended[0]]
		if l != nil && !l.Dead {
			return
		}
		if l != nil {
			b.forgetLocked(l)
		}
		b.dropped = append(b.dropped, b.ended[0])
		b.ended = b.ended[1:]
	}
}

// Close ends every live lease (reason broker_shutdown), closes every device and ends all
// subscriptions. Closing the devices revokes every dma-buf they exported.
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	for _, l := range b.leases {
		if l.Live() && !l.pending {
			b.endLocked(l, StateReleased, ReasonShutdown, "broker")
			b.emitLocked(EventReleased, l, "")
		}
	}
	for s := range b.events.subs {
		s.end(errBrokerClosed)
	}
	clear(b.events.subs)
	b.mu.Unlock()

	err := b.letGoDevices("closed", func(d *device, dev Device) error { return dev.Close() })
	b.mu.Lock()
	for _, d := range b.devices {
		for _, l := range d.released {
			b.setDeadLocked(l) // closing the device killed them
		}
		d.clearReleased()
	}
	b.mu.Unlock()
	b.watchers.Wait()
	return err
}

// letGoDevices takes every device away from the broker (for a Close or a Detach, named
// by verb) and hands each open one to letGo. Called once the broker is marked closed.
func (b *Broker) letGoDevices(verb string, letGo func(*device, Device) error) error {
	b.mu.Lock()
	devs := make([]*device, 0, len(b.devices))
	for _, d := range b.devices {
		devs = append(devs, d)
	}
	b.mu.Unlock()
	var errs []error
	for _, d := range devs {
		d.w.run(func() {
			b.mu.Lock()
			dev := d.dev
			d.dev = nil
			d.err = fmt.Errorf("device %s: broker %s: %w", d.policy.BDF, verb, errdefs.ErrUnavailable)
			if d.cycleTimer != nil {
				d.cycleTimer.Stop()
				d.cycleTimer = nil
			}
			b.mu.Unlock()
			if dev != nil {
				if err := letGo(d, dev); err != nil {
					errs = append(errs, fmt.Errorf("device %s: %s: %w", d.policy.BDF, verb, err))
				}
			}
		})
		d.w.stop()
	}
	return errors.Join(errs...)
}

// Drain ends every live lease (reason broker_shutdown) and revokes their dma-bufs, device
// by device (one cycle for a device whose ended leases had delivered fds), and refuses new
// leases from then on (admins only). Each ended lease's revoked event follows its device
// cycle. It returns how many leases ended and how many devices cycled.
func (b *Broker) Drain(by Actor) (ended, cycled int, err error) {
	if !by.Admin {
		return 0, 0, fmt.Errorf("drain: %s is not an admin: %w", by, errdefs.ErrPermissionDenied)
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return 0, 0, fmt.Errorf("drain: broker is shutting down: %w", errdefs.ErrUnavailable)
	}
	b.draining = true
	b.mu.Unlock()
	var errs []error
	for _, bdf := range b.order {
		d := b.devices[bdf]
		var done []*lease
		var delivered bool
		werr := d.w.run(func() {
			b.mu.Lock()
			delivered = len(d.released) > 0
			for _, l := range b.sortedLive(d) {
				delivered = delivered || !l.Claimed.IsZero()
				b.endLocked(l, StateRevoked, ReasonShutdown, by.String())
				if err := b.persistLocked(l); err != nil {
					b.log.Error("recording a lease's end failed", "lease_id", l.ID, "err", err)
				}
				done = append(done, l)
			}
			b.mu.Unlock()
			if delivered {
				if _, err := b.cycleDevice(d, cycleCause{by: by.String(), why: "drain"}, nil); err != nil {
					errs = append(errs, err)
				}
			}
			b.mu.Lock()
			for _, l := range done {
				if !l.Claimed.IsZero() {
					b.setDeadLocked(l)
				}
				b.emitCausedLocked(EventRevoked, l, "", by.String())
			}
			b.mu.Unlock()
		})
		if werr != nil {
			errs = append(errs, fmt.Errorf("device %s: %w", bdf, werr))
			continue
		}
		if delivered {
			cycled++
		}
		ended += len(done)
		if len(done) > 0 {
			b.log.Info("device drained", "bdf", bdf, "leases", len(done), "cycled", delivered, "by", by.String())
		}
	}
	return ended, cycled, errors.Join(errs...)
}

// Detach stops the broker without ending any lease, for a restart that must revoke
// nothing: timers and holder watches stop, subscriptions end, the broker's copies of
// dma-bufs are closed and devices are detached ([Detacher]: kept open outside the
// process) — devices that cannot be detached are closed, which revokes their dma-bufs.
// Nothing is recorded: the [Store] already has the state the next run restores. The
// caller makes sure closing the dma-buf copies does not drop what the fd store keeps.
func (b *Broker) Detach() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed, b.detached = true, true
	b.unwatchAllLocked()
	var bufs []Buffer
	for _, l := range b.leases {
		for _, t := range []**time.Timer{&l.timer, &l.ttl, &l.grace} {
			if *t != nil {
				(*t).Stop()
				*t = nil
			}
		}
		if l.buf != nil {
			bufs = append(bufs, l.buf) // closed once the devices are detached
			l.buf = nil
		}
		if l.holder.Proc != nil {
			l.holder.Proc.Close()
			l.holder.Proc = nil
		}
	}
	for s := range b.events.subs {
		s.end(errBrokerRestarting)
	}
	clear(b.events.subs)
	b.mu.Unlock()

	err := b.letGoDevices("detached", func(d *device, dev Device) error {
		if dt, ok := dev.(Detacher); ok {
			return dt.Detach()
		}
		b.log.Warn("device cannot be kept across a restart; closing it revokes its dma-bufs", "bdf", d.policy.BDF)
		return dev.Close()
	})
	for _, buf := range bufs {
		buf.Close()
	}
	b.watchers.Wait()
	return err
}

// countLive adjusts the counters of leases that are not dead by delta for l.
func (b *Broker) countLive(l *lease, delta int) {
	b.live += delta
	if n := b.perTenant[l.Holder.Tenant] + delta; n > 0 {
		b.perTenant[l.Holder.Tenant] = n
	} else {
		delete(b.perTenant, l.Holder.Tenant)
	}
}

// bufferName names a lease's dma-buf (DMA_BUF_SET_NAME allows 31 bytes).
func bufferName(id string) string { return "mmb-" + id }

// newLeaseID returns 96 random bits as 24 hex digits.
func newLeaseID() string { return randomHex(12) }

// newToken returns a 128-bit random claim token as 32 hex digits.
func newToken() string { return randomHex(16) }

func randomHex(n int) string {
	buf := make([]byte, n)
	rand.Read(buf) // never fails (crypto/rand, Go 1.24+)
	return hex.EncodeToString(buf)
}
