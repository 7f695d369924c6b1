package broker_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// The revocation bounds R and C (docs/api.md, "Revocation bounds"), on the fake device
// with synctest's clock: every duration below is fake time, so the assertions are about
// the broker's schedule, not about how fast the machine is.

const (
	boundR = 30 * time.Second
	boundC = 10 * time.Second
)

func bounded(c *broker.Config) {
	c.RevokeWithin, c.TenantCycleInterval, c.MinTTL = boundR, boundC, time.Second
	c.Limits.MaxLeasesPerHolder = 8
}

// claimed allocates and claims a lease of uid's process pid on dev0 at page off; the fd
// is closed at the end of the test.
func (r *rig) claimed(t *testing.T, uid uint32, pid int32, off uint64) broker.Lease {
	t.Helper()
	l, tok := r.allocate(t, req(dev0, 0, uid, pid, broker.Range{Offset: off * page, Length: page}))
	r.claim(t, l, tok)
	l, _ = r.b.Get(l.ID)
	return l
}

// TestEndedButLiveDiesWithinR: a release, a holder exit and a ttl expiry end the tenant's
// right at once; the leases stay ended-but-live (visible, counted against the tenant) and
// die together in one device cycle R after the first end, which FD_REVOKED events report
// with the tenant that caused it.
func TestEndedButLiveDiesWithinR(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, bounded)
		sub := subscribe(t, r.b)
		victim := r.claimed(t, 1001, 9, 10)
		rel := r.claimed(t, 1000, 7, 0)
		rq := req(dev0, 0, 1000, 8, broker.Range{Offset: page, Length: page})
		exiting := rq.Holder.Proc.(*brokertest.Process)
		ex, tok := r.allocate(t, rq)
		r.claim(t, ex, tok)
		ttlReq := req(dev0, 0, 1000, 7, broker.Range{Offset: 2 * page, Length: page})
		ttlReq.TTL = 5 * time.Second
		tl, tok := r.allocate(t, ttlReq)
		r.claim(t, tl, tok)
		start := time.Now()

		if _, err := r.b.Release(rel.ID, broker.Actor{UID: 1000, PID: 7}); err != nil {
			t.Fatal(err)
		}
		exiting.Exit()
		time.Sleep(6 * time.Second) // the ttl runs out
		synctest.Wait()
		for _, id := range []string{rel.ID, ex.ID, tl.ID} {
			l, _ := r.b.Get(id)
			if l.Live() || l.Dead || l.RevokeDue.IsZero() || l.RevokeDue.After(l.Ended.Add(boundR)) {
				t.Fatalf("lease %s after its tenant ended it: %+v; want ended, not dead, due within R", id, l)
			}
		}
		if c, _ := revokes(r.devs[dev0]); c != 0 {
			t.Fatalf("%d device cycles before R, want 0", c)
		}
		// The cycle starts early enough to complete by the deadline: R/2 early before the
		// device has a cycle time of its own (then twice its longest, at most R/2).
		if st, _ := r.b.Device(dev0); st.LiveLeases != 1 || st.EndedLive != 3 || !st.CycleAt.Equal(start.Add(boundR/2)) {
			t.Fatalf("device: %d live, %d ended-but-live, cycle at %v; want 1 (the victim), 3, R/2 after the first end", st.LiveLeases, st.EndedLive, st.CycleAt)
		}
		// Still counted: uid 1000 can have 8; 3 are ended-but-live.
		for i := range 5 {
			r.claimed(t, 1000, 7, 20+uint64(i))
		}
		if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 7, broker.Range{Offset: 30 * page, Length: page})); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("9th lease of a tenant with 3 ended-but-live: %v, want RESOURCE_EXHAUSTED", err)
		}

		e := next(t, sub, broker.EventFdRevoked)
		if waited := time.Since(start); waited > boundR || waited < boundR/2 {
			t.Errorf("the ended leases died %v after the first end, want within R = %v (and not before R/2)", waited, boundR)
		}
		if e.CausedBy != "uid=1000" {
			t.Errorf("fd_revoked caused by %q, want uid=1000", e.CausedBy)
		}
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Fatalf("%d device cycles for three ends within R, want 1", c)
		}
		for _, id := range []string{rel.ID, ex.ID, tl.ID} {
			if l, _ := r.b.Get(id); !l.Dead || !l.RevokeDue.IsZero() {
				t.Fatalf("lease %s after the cycle: %+v", id, l)
			}
		}
		re := next(t, sub, broker.EventReissued)
		if re.Lease.Holder.UID != 1001 && re.Lease.ID != victim.ID || re.CausedBy != "uid=1000" {
			t.Errorf("reissue %+v caused by %q", re.Lease, re.CausedBy)
		}
		if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 7, broker.Range{Offset: 30 * page, Length: page})); err != nil {
			t.Fatalf("allocation once the ended leases died: %v", err)
		}
	})
}

// TestHostileLoopsCycleAtMostOncePerC: a tenant that allocates, claims and ends leases as
// fast as it can — release, ttl expiry at the minimum ttl, holder exit, and allocations
// that need a cycle (private over its own released range) — for ten minutes makes the
// victim's lease reissue at most once per C, and never leaves an ended fd alive past R.
func TestHostileLoopsCycleAtMostOncePerC(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(c *broker.Config) { bounded(c); c.Devices[0].AllowUnattestedPrivate = true })
		sub := subscribe(t, r.b)
		r.claimed(t, 1001, 9, 100)
		var reissues []time.Time
		done := make(chan struct{})
		go func() {
			defer close(done)
			for e := range sub.Events() {
				switch {
				case e.Type == broker.EventReissued && e.Lease.Holder.UID == 1001:
					reissues = append(reissues, e.Time)
				case e.Type == broker.EventFdRevoked:
					if late := e.Time.Sub(e.Lease.Ended); late > boundR {
						t.Errorf("lease %s died %v after its end, beyond R", e.Lease.ID, late)
					}
				}
			}
		}()
		start := time.Now()
		refused := 0
		for i := 0; time.Since(start) < 10*time.Minute; i++ {
			off := uint64(i % 4)
			rq := req(dev0, 0, 1000, int32(1000+i), broker.Range{Offset: off * page, Length: page})
			switch i % 4 {
			case 1:
				rq.TTL = time.Second
			case 3:
				rq.Kind = broker.KindPrivate
			}
			l, tok, err := r.b.Allocate(rq)
			if err != nil {
				if !errors.Is(err, errdefs.ErrResourceExhausted) && !errors.Is(err, errdefs.ErrUnavailable) {
					t.Fatalf("iteration %d: %v", i, err)
				}
				refused++
				time.Sleep(100 * time.Millisecond)
				continue
			}
			_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: l.Holder.PID})
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
			r.b.CommitClaim(l.ID, l.Generation)
			switch i % 4 {
			case 0, 3:
				r.b.Release(l.ID, broker.Actor{UID: 1000, PID: l.Holder.PID})
			case 2:
				rq.Holder.Proc.(*brokertest.Process).Exit()
			}
			time.Sleep(10 * time.Millisecond)
		}
		synctest.Wait()
		sub.Close()
		<-done
		if len(reissues) == 0 || refused == 0 {
			t.Fatalf("the loop caused %d reissues of the victim and was refused %d times: the test did not exercise the bounds", len(reissues), refused)
		}
		for i := 1; i < len(reissues); i++ {
			if gap := reissues[i].Sub(reissues[i-1]); gap < boundC {
				t.Errorf("victim reissued %v after the previous reissue, under C = %v", gap, boundC)
			}
		}
		t.Logf("10 min of a hostile tenant: victim reissued %d times (at most %d allowed by C), attacker refused %d times",
			len(reissues), int(10*time.Minute/boundC)+1, refused)
	})
}

// TestAllocationWaitsForC: an allocation that must not share an ended-but-live lease's
// ranges cycles the device at once the first time; within C of that cycle it is refused
// with UNAVAILABLE naming when the device cycles, and the device cycles then by itself, so
// the retry succeeds without another cycle.
func TestAllocationWaitsForC(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, bounded)
		rel := func(off uint64) {
			l := r.claimed(t, 1000, 7, off)
			if _, err := r.b.Release(l.ID, broker.Actor{UID: 1000}); err != nil {
				t.Fatal(err)
			}
		}
		rel(0)
		r.allocate(t, req(dev0, 0, 1001, 9, broker.Range{Offset: 0, Length: page}))
		if c, _ := revokes(r.devs[dev0]); c != 1 {
			t.Fatalf("%d cycles for the first allocation over another tenant's ended range, want 1", c)
		}
		cycled := time.Now()
		rel(1)
		over := req(dev0, 0, 1001, 9, broker.Range{Offset: page, Length: page})
		_, _, err := r.b.Allocate(over)
		if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "retry after") {
			t.Fatalf("allocation within C of the last tenant cycle: %v, want UNAVAILABLE with a retry time", err)
		}
		time.Sleep(boundC)
		synctest.Wait()
		if c, _ := revokes(r.devs[dev0]); c != 2 {
			t.Fatalf("%d cycles C after the refused allocation, want 2 (the scheduled one)", c)
		}
		r.allocate(t, req(dev0, 0, 1001, 9, broker.Range{Offset: page, Length: page}))
		if c, _ := revokes(r.devs[dev0]); c != 2 || time.Since(cycled) != boundC {
			t.Fatalf("%d cycles after the retry (%v after the first), want still 2", c, time.Since(cycled))
		}
	})
}

// TestTenantCycleBudget: a tenant's on-demand cycles are bounded per hour, across devices.
func TestTenantCycleBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(c *broker.Config) {
			c.RevokeWithin, c.TenantCycleInterval, c.TenantCycleBudget = time.Hour, time.Second, 2
			c.Devices[0].AllowUnattestedPrivate = true
		})
		try := func() error {
			l := r.claimed(t, 1000, 7, 0)
			r.b.Release(l.ID, broker.Actor{UID: 1000})
			p := req(dev0, 0, 1000, 7, broker.Range{Length: page})
			p.Kind = broker.KindPrivate
			pl, _, err := r.b.Allocate(p)
			if err == nil {
				r.b.Release(pl.ID, broker.Actor{UID: 1000})
			}
			time.Sleep(2 * time.Second)
			return err
		}
		for i := range 2 {
			if err := try(); err != nil {
				t.Fatalf("on-demand cycle %d within the budget: %v", i+1, err)
			}
		}
		if err := try(); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("third on-demand cycle within the hour: %v, want RESOURCE_EXHAUSTED", err)
		}
		time.Sleep(time.Hour)
		if err := try(); err != nil {
			t.Fatalf("an hour later: %v", err)
		}
	})
}

// TestAdminsAreNotBounded: an admin's CycleDevice and RevokeLease cycle at once, even right
// after a tenant's cycle; CycleDevice buries the ended-but-live leases.
func TestAdminsAreNotBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, bounded)
		l := r.claimed(t, 1000, 7, 0)
		r.b.Release(l.ID, broker.Actor{UID: 1000})
		if _, _, err := r.b.CycleDevice(dev0, broker.Actor{UID: 1000, PID: 7}); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Fatalf("tenant CycleDevice: %v", err)
		}
		n, buried, err := r.b.CycleDevice(dev0, admin)
		if err != nil || n != 0 || buried != 1 {
			t.Fatalf("CycleDevice = %d reissued, %d buried, %v; want 0, 1, nil", n, buried, err)
		}
		if got, _ := r.b.Get(l.ID); !got.Dead {
			t.Fatalf("ended lease after CycleDevice: %+v", got)
		}
		other := r.claimed(t, 1001, 9, 1)
		if _, _, err := r.b.RevokeNow(other.ID, admin); err != nil {
			t.Fatal(err)
		}
		if c, _ := revokes(r.devs[dev0]); c != 2 {
			t.Fatalf("%d cycles, want 2: admins are not held to C", c)
		}
		if _, _, err := r.b.CycleDevice("0000:00:09.0", admin); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("CycleDevice of an unconfigured device: %v", err)
		}
	})
}

// TestMinTTL: tenants cannot ask for a ttl below the minimum; admins can.
func TestMinTTL(t *testing.T) {
	r := newRig(t, bounded)
	rq := req(dev0, 0, 1000, 7, broker.Range{Length: page})
	rq.TTL = time.Millisecond
	if _, _, err := r.b.Allocate(rq); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("ttl 1ms: %v", err)
	}
	rq = req(dev0, 0, 1000, 7, broker.Range{Length: page})
	l, _ := r.allocate(t, rq)
	if _, err := r.b.Renew(l.ID, broker.Actor{UID: 1000}, time.Nanosecond); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("renew to 1ns: %v", err)
	}
	if _, err := r.b.Renew(l.ID, admin, time.Millisecond); err != nil {
		t.Fatalf("admin renew to 1ms: %v", err)
	}
}

// TestTenantsOfOneUID: two VMs under one uid but in different tenants (cgroups) cannot
// release, renew or see each other's leases, share no ranges, and have their own limits.
func TestTenantsOfOneUID(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { deferred(c); c.Limits.MaxLeasesPerHolder = 1 })
	vm := func(name string, pid int32, off uint64) broker.AllocateRequest {
		rq := req(dev0, 0, 1000, pid, broker.Range{Offset: off * page, Length: page})
		rq.Holder.Tenant = "uid=1000,cgroup=/machine.slice/machine-qemu\\x2d1\\x2d" + name + ".scope"
		return rq
	}
	a, _ := r.allocate(t, vm("a", 10, 0))
	b, _ := r.allocate(t, vm("b", 20, 1)) // uid 1000's second lease: per-tenant limit of 1 holds
	actorA := broker.Actor{UID: 1000, PID: 10, Tenant: a.Holder.Tenant}
	if _, err := r.b.Release(b.ID, actorA); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("VM a releases VM b's lease: %v", err)
	}
	if _, err := r.b.Renew(b.ID, actorA, time.Hour); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("VM a renews VM b's lease: %v", err)
	}
	if broker.MayView(actorA, b) || !broker.MayView(actorA, a) {
		t.Fatal("MayView does not follow the tenant")
	}
	if got := r.b.List(broker.Filter{Tenant: a.Holder.Tenant}); len(got) != 1 || got[0].ID != a.ID {
		t.Fatalf("List by tenant: %+v", got)
	}
	if _, _, err := r.b.Allocate(vm("a", 10, 2)); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("VM a's second lease: %v", err)
	}
	if _, _, err := r.b.Allocate(vm("c", 30, 1)); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("VM c over VM b's shared range: %v, want refused (another tenant)", err)
	}
	// A uid-only caller of the same uid is another tenant too.
	if _, err := r.b.Release(a.ID, broker.Actor{UID: 1000}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("uid-only caller releases a VM's lease: %v", err)
	}
	if _, err := r.b.Release(a.ID, actorA); err != nil {
		t.Fatal(err)
	}
}

// TestPingNamesAHungDevice: a device operation that hangs in the kernel makes Ping fail
// naming the device, which is what the service watchdog acts on.
func TestPingNamesAHungDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		l := r.claimed(t, 1000, 7, 0)
		unblock := make(chan struct{})
		r.devs[dev0].Locked(func(d *brokertest.Device) { d.RevokeHook = func() { <-unblock } })
		go r.b.RevokeNow(l.ID, admin)
		synctest.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := r.b.Ping(ctx)
		if err == nil || !strings.Contains(err.Error(), dev0) || !strings.Contains(err.Error(), "running for 5s") {
			t.Fatalf("Ping with a device cycle hung for 5s: %v; want an error naming %s and how long", err, dev0)
		}
		close(unblock)
		synctest.Wait()
		if err := r.b.Ping(context.Background()); err != nil {
			t.Fatalf("Ping once the cycle returned: %v", err)
		}
	})
}

// TestCycleStartsEarlyEnough: the scheduled cycle starts R/2 after the end, so that the
// ended lease's fd is dead (and FD_REVOKED sent) by end + R even when a cycle takes
// seconds, not one cycle after the deadline.
func TestCycleStartsEarlyEnough(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, bounded)
		sub := subscribe(t, r.b)
		r.devs[dev0].Locked(func(d *brokertest.Device) { d.RevokeHook = func() { time.Sleep(12 * time.Second) } }) // a slow device
		l := r.claimed(t, 1000, 7, 0)
		ended, err := r.b.Release(l.ID, broker.Actor{UID: 1000, PID: 7})
		if err != nil {
			t.Fatal(err)
		}
		if st, _ := r.b.Device(dev0); !st.CycleAt.Equal(ended.RevokeDue.Add(-boundR / 2)) {
			t.Fatalf("cycle scheduled at %v, want R/2 before revoke_due %v", st.CycleAt, ended.RevokeDue)
		}
		e := next(t, sub, broker.EventFdRevoked)
		if e.Lease.ID != l.ID || e.Time.After(ended.RevokeDue) {
			t.Fatalf("fd_revoked of %s at %v, after revoke_due %v", e.Lease.ID, e.Time, ended.RevokeDue)
		}
	})
}
