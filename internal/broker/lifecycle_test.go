package broker_test

import (
	"errors"
	"runtime"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// next returns the next event of type typ (skipping others), failing after a generous
// bound on how long the broker may take (a bound on failure, not a timing assertion).
func next(t *testing.T, sub *broker.Subscription, typ broker.EventType) broker.Event {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case e, ok := <-sub.Events():
			if !ok {
				t.Fatalf("subscription ended (%v) waiting for %s", sub.Err(), typ)
			}
			if e.Type == typ {
				return *e
			}
		case <-timeout:
			t.Fatalf("no %s event", typ)
		}
	}
}

func subscribe(t *testing.T, b *broker.Broker) *broker.Subscription {
	t.Helper()
	sub, err := b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	return sub
}

func revokes(d *brokertest.Device) (cycles, buffers int) {
	d.Locked(func(d *brokertest.Device) { cycles, buffers = d.Revokes, d.BufferRevokes })
	return
}

func TestHolderExitRevokes(t *testing.T) {
	r := newRig(t, nil)
	sub := subscribe(t, r.b)
	rq := req(dev0, 0, 1000, 7, broker.Range{Length: page})
	proc := rq.Holder.Proc.(*brokertest.Process)
	l, tok := r.allocate(t, rq)
	r.claim(t, l, tok)
	other, otok := r.allocate(t, req(dev0, 0, 1001, 8, broker.Range{Offset: page, Length: page}))
	r.claim(t, other, otok)
	buf := r.devs[dev0].OpenBuffers()[0]

	proc.Exit()
	e := next(t, sub, broker.EventReleased)
	if e.Lease.ID != l.ID || e.Lease.EndReason != broker.ReasonHolderExited || e.Lease.EndedBy != "pid 7 exited" {
		t.Fatalf("event after the holder exited: %+v", e)
	}
	re := next(t, sub, broker.EventReissued) // the survivor, once the device cycled
	if re.Lease.ID != other.ID || re.Lease.Generation != 2 {
		t.Fatalf("reissue after holder exit: %+v", re)
	}
	if c, _ := revokes(r.devs[dev0]); c != 1 || !buf.Revoked() {
		t.Fatalf("device cycles %d, holder's buffer revoked %v; want 1 and true", c, buf.Revoked())
	}
	if !proc.Closed() {
		t.Fatal("holder's pidfd not closed")
	}
}

func TestHolderExitBeforeClaimNeedsNoCycle(t *testing.T) {
	r := newRig(t, nil)
	sub := subscribe(t, r.b)
	rq := req(dev0, 0, 1000, 7, broker.Range{Length: page})
	l, _ := r.allocate(t, rq)
	rq.Holder.Proc.(*brokertest.Process).Exit()
	if e := next(t, sub, broker.EventReleased); e.Lease.ID != l.ID || e.Lease.EndReason != broker.ReasonHolderExited {
		t.Fatalf("event: %+v", e)
	}
	if c, _ := revokes(r.devs[dev0]); c != 0 {
		t.Fatalf("%d device cycles for a lease whose fd never left the broker", c)
	}
	if n := len(r.devs[dev0].OpenBuffers()); n != 0 {
		t.Fatalf("%d buffers still open", n)
	}
}

func TestCooperativeRevoke(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		sub := subscribe(t, r.b)
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
		r.claim(t, l, tok)
		got, err := r.b.Revoke(l.ID, admin, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got.State != broker.StateActive || !got.RevokeDeadline.Equal(time.Now().Add(5*time.Second)) {
			t.Fatalf("after a cooperative revoke request: %+v", got)
		}
		if e := next(t, sub, broker.EventRevokeRequested); !e.Lease.RevokeDeadline.Equal(got.RevokeDeadline) {
			t.Fatalf("revoke_requested event %+v", e)
		}
		// a later, longer request does not push the deadline out
		if again, _ := r.b.Revoke(l.ID, admin, time.Hour); !again.RevokeDeadline.Equal(got.RevokeDeadline) {
			t.Fatalf("deadline moved to %v", again.RevokeDeadline)
		}
		time.Sleep(5*time.Second - time.Nanosecond)
		synctest.Wait()
		if now, _ := r.b.Get(l.ID); !now.Live() {
			t.Fatalf("revoked before the deadline: %+v", now)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		now, _ := r.b.Get(l.ID)
		if now.State != broker.StateRevoked || now.EndReason != broker.ReasonRevoked || now.EndedBy != admin.String() {
			t.Fatalf("at the deadline: %+v", now)
		}
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Fatalf("%d device cycles, want 1", c)
		}
	})
}

// TestCooperativeRevokeReleasedInTime: a holder that releases before the deadline ends
// the lease as released, and the release completes the revoke at once — the fd it had is
// dead, so the admin's revoke holds — with no second cycle at the deadline.
func TestCooperativeRevokeReleasedInTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
		r.claim(t, l, tok)
		buf := r.devs[dev0].OpenBuffers()[0]
		if _, err := r.b.Revoke(l.ID, admin, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if _, err := r.b.Release(l.ID, broker.Actor{UID: 1000, PID: 1}); err != nil {
			t.Fatal(err)
		}
		if !buf.Revoked() {
			t.Fatal("the released lease's fd is still alive although a revoke was requested")
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		now, _ := r.b.Get(l.ID)
		if now.State != broker.StateReleased || now.EndReason != broker.ReasonReleased {
			t.Fatalf("released before the deadline: %+v", now)
		}
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Fatalf("%d device cycles, want the one the release triggered", c)
		}
	})
}

// TestReleasedRangesAreNotHandedOver: a released lease's holder may keep using its fd
// until the next device cycle, so a lease that must not share those ranges — private, or
// another uid's — cycles the device before it is exported; the same uid's shared lease
// does not.
func TestReleasedRangesAreNotHandedOver(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { deferred(c); c.Devices[0].AllowUnattestedPrivate = true })
	rel := func(uid uint32, off uint64) *brokertest.Buffer {
		l, tok := r.allocate(t, req(dev0, 0, uid, 1, broker.Range{Offset: off, Length: page}))
		r.claim(t, l, tok)
		var buf *brokertest.Buffer
		for _, b := range r.devs[dev0].OpenBuffers() {
			if b.Inode() == l.Inode {
				buf = b
			}
		}
		if _, err := r.b.Release(l.ID, broker.Actor{UID: uid}); err != nil {
			t.Fatal(err)
		}
		return buf
	}
	old := rel(1000, 0)
	// same uid, shared: no cycle needed
	r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: 0, Length: page}))
	if c, _ := revokes(r.devs[dev0]); c != 0 || old.Revoked() {
		t.Fatalf("%d cycles for a same-uid shared lease over released ranges", c)
	}
	// another uid: cycle first
	r.allocate(t, req(dev0, 0, 1001, 2, broker.Range{Offset: 2 * page, Length: page}))
	if c, _ := revokes(r.devs[dev0]); c != 0 {
		t.Fatalf("%d cycles for a disjoint lease", c)
	}
	old2 := rel(1000, 4*page)
	r.allocate(t, req(dev0, 0, 1001, 2, broker.Range{Offset: 4 * page, Length: page}))
	if c, _ := revokes(r.devs[dev0]); c != 1 || !old.Revoked() || !old2.Revoked() {
		t.Fatalf("another uid over released ranges: %d cycles, old fds revoked %v %v", c, old.Revoked(), old2.Revoked())
	}
	// private over a released range of the same uid: cycle first
	rel(1000, 8*page)
	p := req(dev0, 0, 1000, 1, broker.Range{Offset: 8 * page, Length: page})
	p.Kind = broker.KindPrivate
	r.allocate(t, p)
	if c, _ := revokes(r.devs[dev0]); c != 2 {
		t.Fatalf("private over released ranges: %d cycles, want 2", c)
	}
	// a rejected request cycles nothing
	rel(1000, 12*page)
	bad := req(dev0, 0, 1001, 2, broker.Range{Offset: 12 * page, Length: 100})
	if _, _, err := r.b.Allocate(bad); err == nil {
		t.Fatal("unaligned request accepted")
	}
	if c, _ := revokes(r.devs[dev0]); c != 2 {
		t.Fatalf("a rejected request cycled the device (%d cycles)", c)
	}
}

func TestTTLAndRenew(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		sub := subscribe(t, r.b)
		rq := req(dev0, 0, 1000, 1, broker.Range{Length: page})
		rq.TTL = 10 * time.Second
		l, tok := r.allocate(t, rq)
		r.claim(t, l, tok)
		if !l.Expires.Equal(time.Now().Add(10 * time.Second)) {
			t.Fatalf("expires %v", l.Expires)
		}
		time.Sleep(8 * time.Second)
		if _, err := r.b.Renew(l.ID, broker.Actor{UID: 1001}, 0); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Fatalf("renew by a stranger: %v", err)
		}
		renewed, err := r.b.Renew(l.ID, broker.Actor{UID: 1000}, 0)
		if err != nil || !renewed.Expires.Equal(time.Now().Add(10*time.Second)) {
			t.Fatalf("renew: %+v, %v", renewed, err)
		}
		next(t, sub, broker.EventRenewed)
		time.Sleep(9 * time.Second) // 17 s after allocation: alive thanks to the renewal
		synctest.Wait()
		if now, _ := r.b.Get(l.ID); !now.Live() {
			t.Fatalf("expired despite the renewal: %+v", now)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		now, _ := r.b.Get(l.ID)
		if now.State != broker.StateRevoked || now.EndReason != broker.ReasonExpired {
			t.Fatalf("after the ttl: %+v", now)
		}
		if e := next(t, sub, broker.EventExpired); e.Lease.ID != l.ID {
			t.Fatalf("expired event %+v", e)
		}
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Fatalf("%d device cycles, want 1", c)
		}
		if _, err := r.b.Renew(l.ID, broker.Actor{UID: 1000}, 0); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Fatalf("renew after expiry: %v", err)
		}
		noTTL, _ := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page}))
		if _, err := r.b.Renew(noTTL.ID, broker.Actor{UID: 1000}, 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("renew of a lease without ttl: %v", err)
		}
	})
}

// TestRevocationsCoalesce: revocations that arrive while a device cycle runs share the
// next cycle.
func TestRevocationsCoalesce(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.Limits.MaxLeasesPerHolder = 10 })
	sub := subscribe(t, r.b)
	var leases []broker.Lease
	for i := range 5 {
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
		r.claim(t, l, tok)
		leases = append(leases, l)
	}
	gate := make(chan struct{})
	entered := make(chan struct{}, 1)
	r.devs[dev0].Locked(func(d *brokertest.Device) {
		d.RevokeHook = func() {
			select {
			case entered <- struct{}{}:
				<-gate // hold only the first cycle
			default:
			}
		}
	})
	var wg sync.WaitGroup
	revoke := func(id string) {
		defer wg.Done()
		if _, err := r.b.Revoke(id, admin, 0); err != nil {
			t.Errorf("revoke %s: %v", id, err)
		}
	}
	wg.Add(1)
	go revoke(leases[0].ID)
	<-entered // the first cycle runs
	for _, l := range leases[1:4] {
		wg.Add(1)
		go revoke(l.ID)
	}
	// A lease ends and joins the device's pending batch in one step: once all three show
	// ended, all three are queued behind the running cycle. (Their revoked events come
	// only after the cycle that kills their dma-bufs.)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		queued := 0
		for _, l := range leases[1:4] {
			if got, _ := r.b.Get(l.ID); !got.Live() {
				queued++
			}
		}
		if queued == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of 3 revocations queued", queued)
		}
	}
	close(gate)
	wg.Wait()
	for range 4 {
		next(t, sub, broker.EventRevoked)
	}
	if c, _ := revokes(r.devs[dev0]); c != 2 {
		t.Fatalf("%d device cycles for 4 revocations, want 2 (one for the first, one shared)", c)
	}
	if l, _ := r.b.Get(leases[4].ID); !l.Live() || l.Generation < 2 {
		t.Fatalf("survivor %+v", l)
	}
}

func TestPerBufferRevoke(t *testing.T) {
	r := newRig(t, nil)
	r.devs[dev0].Locked(func(d *brokertest.Device) { d.PerBuffer = true })
	a, atok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, a, atok)
	b, btok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page}))
	r.claim(t, b, btok)
	bufs := r.devs[dev0].OpenBuffers()
	if _, err := r.b.Revoke(a.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	if c, n := revokes(r.devs[dev0]); c != 0 || n != 1 {
		t.Fatalf("device cycles %d, buffer revokes %d; want 0 and 1", c, n)
	}
	if !bufs[0].Revoked() || bufs[1].Revoked() {
		t.Fatalf("revoked: victim %v, survivor %v", bufs[0].Revoked(), bufs[1].Revoked())
	}
	if l, _ := r.b.Get(b.ID); l.Generation != 1 || l.State != broker.StateActive {
		t.Fatalf("survivor disturbed: %+v", l)
	}
}

func TestSuspendResume(t *testing.T) {
	r := newRig(t, nil)
	sub := subscribe(t, r.b)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, l, tok)
	if _, err := r.b.SuspendDevice(dev0, broker.Actor{UID: 1000}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("suspend by a holder: %v", err)
	}
	st, err := r.b.SuspendDevice(dev0, admin)
	if err != nil || !st.Suspended {
		t.Fatalf("suspend: %+v, %v", st, err)
	}
	if e := next(t, sub, broker.EventSuspended); e.Lease.ID != l.ID || !e.Lease.Live() {
		t.Fatalf("suspended event %+v", e)
	}
	var fake bool
	r.devs[dev0].Locked(func(d *brokertest.Device) { fake = d.Suspended })
	if !fake {
		t.Fatal("device memory decode still on")
	}
	if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page})); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("allocate on a suspended device: %v", err)
	}
	if _, err := r.b.SuspendDevice(dev0, admin); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second suspend: %v", err)
	}
	// a revoke while suspended keeps the device suspended
	if _, err := r.b.Revoke(l.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	r.devs[dev0].Locked(func(d *brokertest.Device) { fake = d.Suspended })
	if !fake {
		t.Fatal("revoke resumed a suspended device")
	}
	st, err = r.b.ResumeDevice(dev0, admin)
	if err != nil || st.Suspended {
		t.Fatalf("resume: %+v, %v", st, err)
	}
	r.devs[dev0].Locked(func(d *brokertest.Device) { fake = d.Suspended })
	if fake {
		t.Fatal("device memory decode still off after resume")
	}
	r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page}))
}

func TestDeviceReleaseNotice(t *testing.T) {
	r := newRig(t, nil)
	sub := subscribe(t, r.b)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, l, tok)
	if !r.devs[dev0].Notify(broker.NoticeError) {
		t.Fatal("device has no notice channel: the broker does not watch it")
	}
	if !r.devs[dev0].Notify(broker.NoticeRelease) {
		t.Fatal("notify failed")
	}
	e := next(t, sub, broker.EventDeviceLost)
	if e.Lease.ID != l.ID || e.Lease.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("device_lost event %+v", e)
	}
	st, _ := r.b.Device(dev0)
	if st.Err == nil || st.Errors != 1 {
		t.Fatalf("device after the release request: err %v errors %d; want an error and 1 AER notice", st.Err, st.Errors)
	}
	if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 1, broker.Range{Length: page})); err != nil {
		// Allocate retries the open: the fake device is available again at once.
		t.Fatalf("allocate after the device came back: %v", err)
	}
	st, err := r.b.DeviceAvailable(dev0)
	if err != nil || st.Err != nil || st.LiveLeases != 1 {
		t.Fatalf("DeviceAvailable: %+v, %v", st, err)
	}
}

// TestRevokesDuringACycleShareTheNext: revocations that arrive while the device's worker
// runs a cycle wait for it and then share one cycle.
func TestRevokesDuringACycleShareTheNext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		var ids []string
		for i := range 3 {
			l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
			r.claim(t, l, tok)
			ids = append(ids, l.ID)
		}
		entered, unblock := make(chan struct{}), make(chan struct{})
		first := true
		r.devs[dev0].Locked(func(d *brokertest.Device) {
			d.RevokeHook = func() {
				if first {
					first = false
					close(entered)
					<-unblock
				}
			}
		})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); r.b.Revoke(ids[0], admin, 0) }()
		<-entered // the first cycle runs and blocks
		for _, id := range ids[1:] {
			wg.Add(1)
			go func() { defer wg.Done(); r.b.Revoke(id, admin, 0) }()
		}
		synctest.Wait() // both queued behind the running cycle
		close(unblock)
		wg.Wait()
		if c, _ := revokes(r.devs[dev0]); c != 2 {
			t.Fatalf("%d device cycles for one revoke and two that queued behind it, want 2", c)
		}
		for _, id := range ids {
			if l, _ := r.b.Get(id); l.State != broker.StateRevoked || !l.Dead {
				t.Fatalf("lease %s: %+v", id, l)
			}
		}
	})
}

// TestUnclaim: a claim whose fd never reached the client is undone; the same token claims
// again, and only once more.
func TestUnclaim(t *testing.T) {
	r := newRig(t, nil)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 1})
	if err != nil {
		t.Fatal(err)
	}
	f.Close() // "delivery failed"
	r.b.Unclaim(l.ID, 1)
	if got, _ := r.b.Get(l.ID); got.State != broker.StateAllocated || got.ClaimDeadline.IsZero() || !got.Claimed.IsZero() {
		t.Fatalf("after Unclaim: %+v", got)
	}
	r.claim(t, l, tok)   // the token works again
	r.b.Unclaim(l.ID, 2) // another generation: nothing happens
	if _, _, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 1}); !errors.Is(err, broker.ErrBadToken) {
		t.Fatalf("third claim: %v, want a bad token", err)
	}
}

// TestRevokedAfterTheKernel: a revoked (or holder-exited, expired) lease's event is sent
// only once the device revoked its dma-buf; before, a watcher must not see it.
func TestRevokedAfterTheKernel(t *testing.T) {
	r := newRig(t, nil)
	sub := subscribe(t, r.b)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, l, tok)
	next(t, sub, broker.EventAllocated)
	next(t, sub, broker.EventClaimed)
	var early []broker.Event
	r.devs[dev0].Locked(func(d *brokertest.Device) {
		d.RevokeHook = func() { // runs as the kernel is asked to revoke
			for {
				select {
				case e := <-sub.Events():
					early = append(early, *e)
				default:
					return
				}
			}
		}
	})
	if _, err := r.b.Revoke(l.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	if len(early) != 0 {
		t.Errorf("events sent before the device revoked the dma-buf: %+v", early)
	}
	if e := next(t, sub, broker.EventRevoked); e.Lease.ID != l.ID {
		t.Errorf("revoked event %+v", e)
	}
}

// TestSubscriberFilteredBeforeBuffering: a subscriber that does not read is not cut off by
// other tenants' activity (their events are dropped before its buffer), only by its own.
func TestSubscriberFilteredBeforeBuffering(t *testing.T) {
	r := newRig(t, nil)
	own := func(e *broker.Event) bool { return e.Lease.Holder.UID == 1000 }
	sub, err := r.b.SubscribeFiltered(0, own)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for i := range 200 { // 400 events of uid 1001, more than a subscription buffers
		l, _ := r.allocate(t, req(dev0, 0, 1001, 2, broker.Range{Offset: uint64(i%8) * page, Length: page}))
		if _, err := r.b.Release(l.ID, broker.Actor{UID: 1001}); err != nil {
			t.Fatal(err)
		}
	}
	mine, _ := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: 8 * page, Length: page}))
	if err := sub.Err(); err != nil {
		t.Fatalf("subscription cut by another tenant's events: %v", err)
	}
	if e := <-sub.Events(); e.Lease.ID != mine.ID || e.Type != broker.EventAllocated {
		t.Errorf("first event delivered: %+v, want the subscriber's own allocation", e)
	}
}

// TestReplayBounded: a cursor more than MaxReplay events back is refused (list leases to
// resync) even when the backlog retains it, so one subscription cannot buffer the whole
// backlog.
func TestReplayBounded(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.EventBacklog = 2 * broker.MaxReplay })
	for i := range broker.MaxReplay/2 + 1 {
		l, _ := r.allocate(t, req(dev0, 0, 1001, 2, broker.Range{Offset: uint64(i%8) * page, Length: page}))
		if _, err := r.b.Release(l.ID, broker.Actor{UID: 1001}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.b.SubscribeFiltered(1, nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("replay of %d events = %v, want FailedPrecondition", broker.MaxReplay+1, err)
	}
	sub, err := r.b.SubscribeFiltered(3, nil)
	if err != nil {
		t.Fatalf("replay of %d events: %v", broker.MaxReplay-1, err)
	}
	sub.Close()
}

// TestPrivateLeaseEndsWhenTSMUnbound: a private lease lives only while its device is
// TSM-bound; a shared lease and an unattested private lease do not depend on it.
func TestPrivateLeaseEndsWhenTSMUnbound(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.Devices[0].AllowUnattestedPrivate = true })
	dev := r.devs[dev0]
	dev.SetInfo(func(i *broker.DeviceInfo) { i.TSM = broker.TSMState{Present: true, Connect: "tsm0", Bound: "tsm0"} })
	prq := req(dev0, 0, 1000, 1, broker.Range{Length: page})
	prq.Kind = broker.KindPrivate
	priv, tok := r.allocate(t, prq)
	r.claim(t, priv, tok)
	shared, stok := r.allocate(t, req(dev0, 4, 1000, 1, broker.Range{Length: page}))
	r.claim(t, shared, stok)
	if n, err := r.b.TSMChanged(dev0); n != 0 || err != nil {
		t.Fatalf("TSMChanged while bound = %d, %v; want nothing ended", n, err)
	}
	dev.SetInfo(func(i *broker.DeviceInfo) { i.TSM.Bound = "" })
	sub := subscribe(t, r.b)
	if n, err := r.b.TSMChanged(dev0); n != 1 || err != nil {
		t.Fatalf("TSMChanged after unbind = %d, %v; want the private lease ended", n, err)
	}
	if e := next(t, sub, broker.EventRevoked); e.Lease.ID != priv.ID || e.Lease.EndReason != broker.ReasonTSMUnbound || !e.Lease.Dead {
		t.Errorf("event %+v, want the private lease revoked (tsm_unbound), dead", e)
	}
	if got, _ := r.b.Get(shared.ID); !got.Live() {
		t.Errorf("shared lease ended with the TSM state: %+v", got)
	}
	// Unattested private leases were granted without the TSM and stay.
	urq := req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page})
	urq.Kind = broker.KindPrivate
	un, _ := r.allocate(t, urq)
	if !un.Unattested {
		t.Fatalf("lease %+v not unattested", un)
	}
	if n, _ := r.b.TSMChanged(dev0); n != 0 {
		t.Errorf("TSMChanged ended %d unattested leases", n)
	}
}

// TestRevokeSaysHowManyWereReissued: an immediate revoke reports how many other leases its
// device cycle reissued.
func TestRevokeSaysHowManyWereReissued(t *testing.T) {
	r := newRig(t, nil)
	var ids []string
	for i := range 3 {
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
		r.claim(t, l, tok)
		ids = append(ids, l.ID)
	}
	undelivered, _ := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: 3 * page, Length: page}))
	if _, n, err := r.b.RevokeNow(ids[0], admin); err != nil || n != 3 {
		t.Fatalf("RevokeNow = %d reissued, %v; want the 3 other live leases", n, err)
	}
	if _, n, err := r.b.RevokeNow(undelivered.ID, admin); err != nil || n != 0 {
		t.Errorf("RevokeNow of a lease whose fd never left = %d reissued, %v; want 0 (no cycle)", n, err)
	}
	if _, _, err := r.b.RevokeNow(ids[1], broker.Actor{UID: 1000}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("RevokeNow by a non-admin = %v", err)
	}
}

// TestDeviceChangedEvents: every change of a device that Devices shows is an event about
// the device (not a lease), also when no lease is there to tell of it — what lets the DRA
// driver republish at once — and none when nothing changed. The events are recorded, so
// a restarted broker numbers after them.
func TestDeviceChangedEvents(t *testing.T) {
	st := newMemStore()
	dev := brokertest.NewDevice(dev0)
	b, err := broker.NewWithOptions(restartCfg, brokertest.Opener(dev), nil, broker.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sub := subscribe(t, b)
	want := func(what, causedBy string) {
		t.Helper()
		select {
		case e := <-sub.Events():
			if e.Type != broker.EventDeviceChanged || e.Lease.BDF != dev0 || e.Lease.ID != "" || e.CausedBy != causedBy {
				t.Fatalf("after %s: event %+v, want device_changed of %s caused by %q", what, e, dev0, causedBy)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("no device_changed event after %s", what)
		}
	}
	if !dev.Notify(broker.NoticeError) {
		t.Fatal("no notice channel")
	}
	want("an error notice", "")
	// More errors change nothing Devices shows but the count: no event for them (a
	// device's error storm must not flood the event log and the journal).
	dev.Notify(broker.NoticeError)
	for deadline := time.Now().Add(30 * time.Second); ; {
		st, err := b.Device(dev0)
		if err != nil {
			t.Fatal(err)
		}
		if st.Errors == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the second error notice was not counted: %+v", st)
		}
		runtime.Gosched()
	}
	if _, err := b.SuspendDevice(dev0, admin); err != nil {
		t.Fatal(err)
	}
	want("suspend", admin.String())
	if _, err := b.ResumeDevice(dev0, admin); err != nil {
		t.Fatal(err)
	}
	want("resume", admin.String())
	if _, err := b.TSMChanged(dev0); err != nil { // nothing changed: no event
		t.Fatal(err)
	}
	dev.SetInfo(func(i *broker.DeviceInfo) { i.TSM = broker.TSMState{Present: true, Connect: "tsm0"} })
	if _, err := b.TSMChanged(dev0); err != nil {
		t.Fatal(err)
	}
	want("a TSM connect", "")
	if _, err := b.TSMChanged(dev0); err != nil { // the same state again: no event
		t.Fatal(err)
	}
	if err := b.DeviceLost(dev0, errors.New("unplugged")); err != nil {
		t.Fatal(err)
	}
	want("a loss without leases", "")
	if err := b.DeviceLost(dev0, errors.New("again")); err != nil { // already lost: no event
		t.Fatal(err)
	}
	if _, err := b.DeviceAvailable(dev0); err != nil {
		t.Fatal(err)
	}
	want("the device back", "")
	if _, err := b.DeviceAvailable(dev0); err != nil { // open already: no event
		t.Fatal(err)
	}
	select {
	case e := <-sub.Events():
		t.Errorf("unexpected event %+v", e)
	default:
	}
	// Every event was recorded: seqs 1..6, none for the device opened at the start.
	if snap := st.snapshot(); snap.LastSeq != 6 || len(snap.Events) != 6 || snap.Events[0].Seq != 1 {
		t.Errorf("recorded %d events up to seq %d, want 6 (1..6)", len(snap.Events), snap.LastSeq)
	}
}
