package broker_test

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// memStore is a Store in memory: what a journal would hold.
type memStore struct {
	mu      sync.Mutex
	records map[string]broker.Record
	events  []broker.Event
	last    uint64
	fail    error
	n       int // commits
}

// commits returns how many commits succeeded.
func (s *memStore) commits() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

func newMemStore() *memStore { return &memStore{records: map[string]broker.Record{}} }

func (s *memStore) Commit(evs []broker.Event, recs []broker.Record, drop []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	for _, e := range evs {
		if e.Seq != s.last+1 {
			return errors.New("events out of order")
		}
		s.last = e.Seq
		s.events = append(s.events, e)
	}
	for _, r := range recs {
		if slices.Contains(drop, r.ID) {
			return fmt.Errorf("lease %s both upserted and dropped", r.ID) // as internal/journal
		}
	}
	for _, r := range recs {
		s.records[r.ID] = r
	}
	for _, id := range drop {
		delete(s.records, id)
	}
	s.n++
	return nil
}

func (s *memStore) snapshot() *broker.Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return &broker.Snapshot{Records: slices.Collect(maps.Values(s.records)), Events: slices.Clone(s.events), LastSeq: s.last}
}

// procs is the process table Repin consults.
type procs map[int32]*brokertest.Process

func (p procs) repin(pid int32, start uint64) (broker.Process, error) {
	if pr := p[pid]; pr != nil && pr.Alive() {
		return pr, nil
	}
	return nil, errors.New("no such process")
}

var restartCfg = broker.Config{Devices: []broker.DeviceConfig{{BDF: dev0, UIDs: []uint32{1000, 1001}}}}

func TestRestartKeepsLeases(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	p1, p2 := &brokertest.Process{Pid: 41}, &brokertest.Process{Pid: 42}
	b1, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	l1, tok1, err := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p1}})
	if err != nil {
		t.Fatal(err)
	}
	_, f1, err := b1.Claim(l1.ID, tok1, broker.Peer{UID: 1000, PID: 41})
	if err != nil {
		t.Fatal(err)
	}
	defer f1.Close()
	l2, tok2, err := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{page, page}}, Holder: broker.Holder{UID: 1001, PID: 42, Proc: p2}})
	if err != nil {
		t.Fatal(err)
	}
	lastSeq := st.snapshot().LastSeq
	if lastSeq != 3 {
		t.Fatalf("recorded %d events, want 3 (allocated, claimed, allocated)", lastSeq)
	}
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}

	ps := procs{41: p1, 42: p2}
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: ps.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if dev.Revokes != 0 {
		t.Errorf("restart cycled the device %d times", dev.Revokes)
	}
	got1, err := b2.Get(l1.ID)
	if err != nil || got1.State != broker.StateActive || got1.Generation != 1 || got1.Inode != l1.Inode {
		t.Errorf("claimed lease after restart: %+v, %v; want active generation 1 inode %d", got1, err, l1.Inode)
	}
	// The unclaimed lease's token still works, and hands out the same dma-buf.
	_, f2, err := b2.Claim(l2.ID, tok2, broker.Peer{UID: 1001, PID: 42})
	if err != nil {
		t.Fatalf("claim with the token from before the restart: %v", err)
	}
	defer f2.Close()
	if inode(t, f2) != l2.Inode {
		t.Errorf("claimed inode %d after restart, want %d", inode(t, f2), l2.Inode)
	}
	// Cursors from before the restart resume; numbering continues.
	sub, err := b2.Subscribe(1)
	if err != nil {
		t.Fatalf("Subscribe(1) after restart: %v", err)
	}
	defer sub.Close()
	var seqs []uint64
	for range 3 {
		seqs = append(seqs, (<-sub.Events()).Seq)
	}
	if !slices.Equal(seqs, []uint64{2, 3, 4}) {
		t.Errorf("events after cursor 1: %v, want [2 3 4] (4 = the claim after restart)", seqs)
	}
	// The holder exiting after the restart is still noticed.
	p1.Exit()
	if e := next(t, sub, broker.EventReleased); e.Lease.ID != l1.ID || e.Lease.EndReason != broker.ReasonHolderExited {
		t.Fatalf("after the re-pinned holder exited: %+v", e)
	}
}

func TestRestartHolderGoneAndDeviceNotKept(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	p1, p2 := &brokertest.Process{Pid: 41}, &brokertest.Process{Pid: 42}
	b1, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	l1, tok1, _ := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p1}})
	_, f1, err := b1.Claim(l1.ID, tok1, broker.Peer{UID: 1000, PID: 41})
	if err != nil {
		t.Fatal(err)
	}
	f1.Close()
	l2, _, _ := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{page, page}}, Holder: broker.Holder{UID: 1001, PID: 42, Proc: p2}})
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}

	// Holder 41 died while the broker was down: its lease ends and the device cycles
	// (its fd left the broker); 42's lease is reissued by that cycle.
	ps := procs{42: p2}
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: ps.repin})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := b2.Get(l1.ID); got.State != broker.StateReleased || got.EndReason != broker.ReasonHolderExited {
		t.Errorf("lease of a holder gone across the restart: %s/%s, want released/holder_exited", got.State, got.EndReason)
	}
	if dev.Revokes != 1 {
		t.Errorf("device cycled %d times, want 1", dev.Revokes)
	}
	if got, _ := b2.Get(l2.ID); got.State != broker.StateAllocated || got.Generation != 2 {
		t.Errorf("surviving lease: %s generation %d, want allocated generation 2", got.State, got.Generation)
	}
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}

	// A device that was not kept (a fresh open) killed every dma-buf: leases come back
	// reissued, without a cycle.
	fresh := brokertest.NewDevice(dev0)
	st2 := newMemStore()
	b3, _ := broker.NewWithOptions(restartCfg, brokertest.Opener(fresh), nil, broker.Options{Store: st2})
	l3, tok3, _ := b3.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p1}})
	_, f3, err := b3.Claim(l3.ID, tok3, broker.Peer{UID: 1000, PID: 41})
	if err != nil {
		t.Fatal(err)
	}
	f3.Close()
	if err := b3.Close(); err != nil { // like a restart without the fd store
		t.Fatal(err)
	}
	snap := st2.snapshot()
	for i := range snap.Records { // pretend the close never ended it (a crash)
		r := &snap.Records[i]
		r.State, r.EndReason, r.EndedBy, r.Ended = broker.StateActive, "", "", time.Time{}
	}
	p1b := &brokertest.Process{Pid: 41}
	b4, err := broker.NewWithOptions(restartCfg, brokertest.Opener(fresh), nil, broker.Options{Store: st2, Restore: snap, Repin: procs{41: p1b}.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b4.Close()
	if got, _ := b4.Get(l3.ID); got.State != broker.StateActive || got.Generation != 2 {
		t.Errorf("lease on a device not kept: %s generation %d, want active generation 2 (reissued)", got.State, got.Generation)
	}
	if fresh.Revokes != 0 {
		t.Errorf("a device opened afresh was cycled %d times", fresh.Revokes)
	}
}

func TestCommitClaimClosesTheBrokersCopy(t *testing.T) {
	r := newRig(t, nil)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 7, broker.Range{Offset: 0, Length: page}))
	f := r.claim(t, l, tok)
	if n := len(r.devs[dev0].OpenBuffers()); n != 1 {
		t.Fatalf("%d broker copies open between claim and commit, want 1 (an undelivered claim is undone with it)", n)
	}
	r.b.CommitClaim(l.ID, l.Generation)
	if n := len(r.devs[dev0].OpenBuffers()); n != 0 {
		t.Errorf("%d broker copies open after the claim was committed, want 0", n)
	}
	if inode(t, f) != l.Inode {
		t.Errorf("holder's fd changed")
	}
	// Revoking still works without the copy: the device cycles.
	if _, err := r.b.Revoke(l.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	if c, _ := revokes(r.devs[dev0]); c != 1 {
		t.Errorf("%d device cycles for the revoke, want 1", c)
	}
}

func TestDrain(t *testing.T) {
	r := newRig(t, nil)
	l1, tok := r.allocate(t, req(dev0, 0, 1000, 7, broker.Range{Offset: 0, Length: page}))
	r.claim(t, l1, tok)
	l2, _ := r.allocate(t, req(dev0, 0, 1000, 7, broker.Range{Offset: page, Length: page}))
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, _, err := r.b.Drain(broker.Actor{UID: 1000, PID: 7}); err == nil {
		t.Fatal("a non-admin drained the broker")
	}
	ended, cycled, err := r.b.Drain(admin)
	if err != nil || ended != 2 || cycled != 1 {
		t.Fatalf("Drain = %d ended, %d cycled, %v; want 2, 1 (dev0 had a delivered fd), nil", ended, cycled, err)
	}
	for _, id := range []string{l1.ID, l2.ID} {
		if got, _ := r.b.Get(id); got.State != broker.StateRevoked || got.EndReason != broker.ReasonShutdown {
			t.Errorf("lease %s after drain: %s/%s", id, got.State, got.EndReason)
		}
	}
	// Revoked events come after the cycle: by then the dma-buf is dead.
	for range 2 {
		e := next(t, sub, broker.EventRevoked)
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Errorf("revoked event for %s seen with %d device cycles done", e.Lease.ID, c)
		}
	}
	if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 7, broker.Range{Offset: 0, Length: page})); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Allocate after drain = %v, want FailedPrecondition", err)
	}
}

// startClaimed starts a broker recording in st with one lease on dev0, allocated and
// claimed by process 41 (uid 1000), whose fd the test has closed.
func startClaimed(t *testing.T, dev *brokertest.Device, st broker.Store) (*broker.Broker, *brokertest.Process, broker.Lease, string) {
	t.Helper()
	b, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	p := &brokertest.Process{Pid: 41}
	l, tok, err := b.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p}})
	if err != nil {
		t.Fatal(err)
	}
	_, f, err := b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	return b, p, l, tok
}

// TestRestartMidRevoke: a revoke whose end was recorded but whose device cycle had not
// completed when the broker stopped is finished by the next start (the device cycles
// before anyone uses it), and the lease is then dead.
func TestRestartMidRevoke(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	b1, p, l, _ := startClaimed(t, dev, st)
	var mid *broker.Snapshot
	dev.Locked(func(d *brokertest.Device) { d.RevokeHook = func() { mid = st.snapshot() } })
	if _, err := b1.Revoke(l.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	dev.Locked(func(d *brokertest.Device) { d.RevokeHook = nil })
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}
	var rec broker.Record
	for _, r := range mid.Records {
		if r.ID == l.ID {
			rec = r
		}
	}
	if rec.State != broker.StateRevoked || rec.Dead {
		t.Fatalf("recorded mid-cycle: %s dead=%v, want revoked and not dead yet", rec.State, rec.Dead)
	}
	cycles := dev.Revokes
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: mid, Repin: procs{41: p}.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if dev.Revokes != cycles+1 {
		t.Errorf("restart cycled the device %d times, want once (to finish the revoke)", dev.Revokes-cycles)
	}
	if got, _ := b2.Get(l.ID); !got.Dead || got.State != broker.StateRevoked {
		t.Errorf("lease after the restart: %s dead=%v, want revoked and dead", got.State, got.Dead)
	}
}

// TestRestartClaimInFlight: a claim granted but not committed (the broker stopped before
// it knew whether the fd arrived) can be made again with the same token after a restart.
func TestRestartClaimInFlight(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	b1, p, l, tok := startClaimed(t, dev, st)
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}
	// A claim after the stop is refused cleanly (it used to panic on the closed copy).
	if _, _, err := b1.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41}); err == nil {
		t.Error("claim on a detached broker succeeded")
	}
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: procs{41: p}.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	_, f2, err := b2.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41})
	if err != nil {
		t.Fatalf("claim again after a restart with the claim in flight: %v", err)
	}
	f2.Close()
	b2.CommitClaim(l.ID, l.Generation)
	if _, _, err := b2.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41}); err == nil {
		t.Error("a committed claim's token works again")
	}
}

// TestRestartAfterDeliveredClaim: CommitClaim writes no record, so the journal still has
// the token's digest of a delivered claim; the restarted broker sees that the claim was
// delivered (its copy of the dma-buf was let go), takes the lease back as it is (no cycle,
// no reissue: the holder's fd keeps working) and the token does not work again.
func TestRestartAfterDeliveredClaim(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	b1, p, l, tok := startClaimed(t, dev, st)
	commits := st.commits()
	b1.CommitClaim(l.ID, l.Generation)
	if n := st.commits(); n != commits {
		t.Errorf("CommitClaim committed %d records, want none", n-commits)
	}
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}
	cycles := dev.Revokes
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: procs{41: p}.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if got, err := b2.Get(l.ID); err != nil || got.Generation != 1 || got.State != broker.StateActive {
		t.Errorf("lease after the restart: %+v, %v; want generation 1, active", got, err)
	}
	if dev.Revokes != cycles {
		t.Errorf("the restart cycled the device %d times, want 0", dev.Revokes-cycles)
	}
	if _, _, err := b2.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41}); !errors.Is(err, broker.ErrBadToken) {
		t.Errorf("claim with a delivered claim's token after the restart: %v, want ErrBadToken", err)
	}
}

// TestRestartRepinsEachProcessOnce: a restart pins each holder process once, however many
// leases it holds (100,000 leases of a few VMMs must not cost 100,000 pidfd_open calls),
// and tries a gone one once.
func TestRestartRepinsEachProcessOnce(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := newMemStore()
	b1, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	p41, p42 := &brokertest.Process{Pid: 41}, &brokertest.Process{Pid: 42}
	var ids41, ids42 []string
	for i := range 6 {
		pid, p, ids := int32(41), p41, &ids41
		if i%2 == 1 {
			pid, p, ids = 42, p42, &ids42
		}
		l, tok, err := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{uint64(i) * page, page}},
			Holder: broker.Holder{UID: 1000, PID: pid, Start: uint64(pid) * 100, Proc: p}})
		if err != nil {
			t.Fatal(err)
		}
		if _, f, err := b1.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: pid}); err != nil {
			t.Fatal(err)
		} else {
			f.Close()
		}
		*ids = append(*ids, l.ID)
	}
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}
	calls := map[int32]int{}
	repin := func(pid int32, start uint64) (broker.Process, error) {
		calls[pid]++
		if pid != 41 || start != 4100 {
			return nil, errors.New("no such process")
		}
		return &brokertest.Process{Pid: 41}, nil
	}
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if calls[41] != 1 || calls[42] != 1 {
		t.Errorf("repin calls %v, want one per process", calls)
	}
	for _, id := range ids41 {
		if l, err := b2.Get(id); err != nil || !l.Live() {
			t.Errorf("lease %s of the live holder after the restart: %+v, %v", id, l, err)
		}
	}
	for _, id := range ids42 {
		if l, err := b2.Get(id); err != nil || l.Live() || l.EndReason != broker.ReasonHolderExited {
			t.Errorf("lease %s of the gone holder after the restart: %+v, %v; want ended, holder exited", id, l, err)
		}
	}
}

// TestBuryCommitsOnce: a device cycle that buries many ended-but-live leases records their
// FD_REVOKED events in one commit; and a buried lease that the trim of ended leases forgets
// at once (the oldest of more than the broker keeps visible, here on another device) is
// dropped, not also upserted in the same commit, which the journal refuses.
func TestBuryCommitsOnce(t *testing.T) {
	d0, d1 := brokertest.NewDevice(dev0), brokertest.NewDevice(dev1)
	st := newMemStore()
	cfg := broker.Config{Devices: []broker.DeviceConfig{{BDF: dev0, UIDs: []uint32{1000}}, {BDF: dev1, UIDs: []uint32{1000}}},
		RevokeWithin: time.Hour, Limits: broker.Limits{MaxLeases: 4096, MaxLeasesPerHolder: 4096}}
	b, err := broker.NewWithOptions(cfg, brokertest.Opener(d0, d1), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	p := &brokertest.Process{Pid: 41}
	endLive := func(bdf string, n int) {
		for i := range n {
			l, tok, err := b.Allocate(broker.AllocateRequest{BDF: bdf, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Start: 7, Proc: p}})
			if err != nil {
				t.Fatalf("allocation %d on %s: %v", i, bdf, err)
			}
			_, f, err := b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41})
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
			b.CommitClaim(l.ID, l.Generation)
			if _, err := b.Release(l.ID, broker.Actor{UID: 1000, PID: 41}); err != nil {
				t.Fatal(err)
			}
		}
	}
	endLive(dev1, 50)   // the oldest ended leases
	endLive(dev0, 1000) // 1050 ended but live in all: more than the 1024 kept visible
	for _, c := range []struct {
		bdf  string
		want int
	}{{dev1, 50}, {dev0, 1000}} {
		commits := st.commits()
		_, buried, err := b.CycleDevice(c.bdf, admin)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.commits() - commits; got != 1 || buried != c.want {
			t.Errorf("cycle of %s buried %d leases (want %d) in %d commits (want 1)", c.bdf, buried, c.want, got)
		}
	}
	snap := st.snapshot()
	fdRevoked := 0
	for _, e := range snap.Events {
		if e.Type == broker.EventFdRevoked {
			fdRevoked++
		}
	}
	if fdRevoked != 1050 {
		t.Errorf("%d FD_REVOKED events recorded, want 1050", fdRevoked)
	}
	if len(snap.Events) == 0 || snap.Events[len(snap.Events)-1].Seq != snap.LastSeq {
		t.Errorf("store's last seq %d does not end its events", snap.LastSeq)
	}
	if len(snap.Records) > 1024 {
		t.Errorf("store keeps %d records, want at most the 1024 ended leases kept visible", len(snap.Records))
	}
}

// snapStore records like memStore and takes a snapshot when an event of type at is
// committed (what a crash right after it would leave).
type snapStore struct {
	*memStore
	at   broker.EventType
	snap *broker.Snapshot
}

func (s *snapStore) Commit(evs []broker.Event, recs []broker.Record, drop []string) error {
	if err := s.memStore.Commit(evs, recs, drop); err != nil {
		return err
	}
	for _, e := range evs {
		if e.Type == s.at && s.snap == nil {
			s.snap = s.snapshot()
		}
	}
	return nil
}

// TestRestartMidReissue: a stop after a device cycle reissued some of its surviving
// leases, not all, is finished by the next start: it cycles again and reissues them all.
func TestRestartMidReissue(t *testing.T) {
	dev := brokertest.NewDevice(dev0)
	st := &snapStore{memStore: newMemStore(), at: broker.EventReissued}
	b1, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	p := &brokertest.Process{Pid: 41}
	var ids []string
	for i := range 3 {
		l, tok, err := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{uint64(i) * page, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p}})
		if err != nil {
			t.Fatal(err)
		}
		_, f, err := b1.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41})
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		b1.CommitClaim(l.ID, l.Generation)
		ids = append(ids, l.ID)
	}
	if _, err := b1.Revoke(ids[0], admin, 0); err != nil {
		t.Fatal(err)
	}
	if err := b1.Detach(); err != nil {
		t.Fatal(err)
	}
	reissuing := 0
	for _, r := range st.snap.Records {
		if r.Reissuing {
			reissuing++
		}
	}
	if reissuing != 1 {
		t.Fatalf("snapshot after the first reissue: %d leases marked reissuing, want 1", reissuing)
	}
	cycles := dev.Revokes
	b2, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st.memStore, Restore: st.snap, Repin: procs{41: p}.repin})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if dev.Revokes != cycles+1 {
		t.Errorf("restart cycled the device %d times, want once", dev.Revokes-cycles)
	}
	for _, id := range ids[1:] {
		l, _ := b2.Get(id)
		if !l.Live() || l.Generation < 2 {
			t.Errorf("survivor %s after the restart: %s generation %d, want live and reissued", id, l.State, l.Generation)
		}
	}
}

// TestAdminRevokesReleasedButLiveLease: a lease released by its holder, whose fd left the
// broker, still works until its device cycles; an admin's revoke of it cycles the device
// now (it used to answer FAILED_PRECONDITION and leave the fd working).
func TestAdminRevokesReleasedButLiveLease(t *testing.T) {
	r := newRig(t, deferred)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 7, broker.Range{Length: page}))
	r.claim(t, l, tok)
	other, otok := r.allocate(t, req(dev0, 0, 1000, 7, broker.Range{Offset: page, Length: page}))
	r.claim(t, other, otok)
	if _, err := r.b.Release(l.ID, broker.Actor{UID: 1000}); err != nil {
		t.Fatal(err)
	}
	if got, _ := r.b.Get(l.ID); got.Dead {
		t.Fatal("a released lease whose fd was delivered is reported dead before any cycle")
	}
	got, n, err := r.b.RevokeNow(l.ID, admin)
	if err != nil {
		t.Fatalf("admin revoke of a released but live lease: %v", err)
	}
	if c, _ := revokes(r.devs[dev0]); c != 1 || n != 1 || !got.Dead || got.EndReason != broker.ReasonReleased {
		t.Errorf("after the revoke: %d cycles, %d reissued, dead %v, reason %s; want 1, 1 (the other lease), true, released", c, n, got.Dead, got.EndReason)
	}
	// Dead now: a second revoke is refused as before.
	if _, _, err := r.b.RevokeNow(l.ID, admin); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("revoke of a dead lease = %v, want FailedPrecondition", err)
	}
}

// TestRestartKeepsEndedButLive: an ended-but-live lease survives a restart as such (its fd
// still works, it still counts), and the restarted broker cycles its device at the
// recorded revoke_due, not R after the restart.
func TestRestartKeepsEndedButLive(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := restartCfg
		cfg.RevokeWithin, cfg.Limits.MaxLeasesPerHolder = 30*time.Second, 1
		dev := brokertest.NewDevice(dev0)
		st := newMemStore()
		b1, err := broker.NewWithOptions(cfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
		if err != nil {
			t.Fatal(err)
		}
		p := &brokertest.Process{Pid: 41}
		l, tok, err := b1.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{0, page}}, Holder: broker.Holder{UID: 1000, PID: 41, Proc: p}})
		if err != nil {
			t.Fatal(err)
		}
		_, f, err := b1.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 41})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b1.CommitClaim(l.ID, l.Generation)
		ended, err := b1.Release(l.ID, broker.Actor{UID: 1000, PID: 41})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Second)
		if err := b1.Detach(); err != nil {
			t.Fatal(err)
		}
		b2, err := broker.NewWithOptions(cfg, brokertest.Opener(dev), nil, broker.Options{Store: st, Restore: st.snapshot(), Repin: procs{41: p}.repin})
		if err != nil {
			t.Fatal(err)
		}
		defer b2.Close()
		got, _ := b2.Get(l.ID)
		if got.Dead || !got.RevokeDue.Equal(ended.RevokeDue) || cyc(dev) != 0 {
			t.Fatalf("after the restart: dead %v, revoke due %v (was %v), %d cycles; want ended-but-live as before", got.Dead, got.RevokeDue, ended.RevokeDue, cyc(dev))
		}
		if _, _, err := b2.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0, Ranges: []broker.Range{{page, page}}, Holder: broker.Holder{UID: 1000, PID: 41}}); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("allocation over the limit of 1 with one ended-but-live lease restored: %v", err)
		}
		// The restarted broker has no cycle time of the device yet: it starts the cycle
		// R/2 (15 s) before the recorded revoke_due (end + 30 s), 5 s after the restart.
		time.Sleep(5*time.Second - time.Nanosecond)
		synctest.Wait()
		if cyc(dev) != 0 {
			t.Fatal("cycled earlier than R/2 before the recorded revoke_due")
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if got, _ := b2.Get(l.ID); !got.Dead || cyc(dev) != 1 {
			t.Fatalf("R/2 before revoke_due: dead %v, %d cycles; want dead after one cycle", got.Dead, cyc(dev))
		}
	})
}

// cyc returns how many times dev cycled, read under its lock.
func cyc(dev *brokertest.Device) int {
	c, _ := revokes(dev)
	return c
}
