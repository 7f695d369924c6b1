package server

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
)

const (
	evExpired         = brokerv1.EventType_EVENT_TYPE_EXPIRED
	evDeviceLost      = brokerv1.EventType_EVENT_TYPE_DEVICE_LOST
	evRevokeRequested = brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED
	evRenewed         = brokerv1.EventType_EVENT_TYPE_RENEWED
	evSuspended       = brokerv1.EventType_EVENT_TYPE_SUSPENDED
	evResumed         = brokerv1.EventType_EVENT_TYPE_RESUMED

	stateActive   = brokerv1.LeaseState_LEASE_STATE_ACTIVE
	stateRevoked  = brokerv1.LeaseState_LEASE_STATE_REVOKED
	stateReleased = brokerv1.LeaseState_LEASE_STATE_RELEASED
)

// waitEvent reads s until an event of type typ about lease id arrives and returns it. The
// stream's context bounds the wait (a bound on failure, not a timing assertion).
func waitEvent(t *testing.T, s grpc.ServerStreamingClient[brokerv1.WatchEventsResponse], typ brokerv1.EventType, id string) *brokerv1.Event {
	t.Helper()
	for {
		resp, err := s.Recv()
		if err != nil {
			t.Fatalf("waiting for %v of lease %s: %v", typ, id, err)
		}
		if e := resp.GetEvent(); e.GetType() == typ && e.GetLease().GetId() == id {
			return e
		}
	}
}

// allocateClaimed allocates a lease as u and claims it, as the holder's process would.
func (e *env) allocateClaimed(u user, req *brokerv1.AllocateLeaseRequest) *brokerv1.Lease {
	e.t.Helper()
	resp := e.allocate(u, req)
	e.claim(resp.GetLease(), resp.GetClaimToken())
	return resp.GetLease()
}

func (e *env) getLease(id string) *brokerv1.Lease {
	e.t.Helper()
	resp, err := e.client.GetLease(root.ctx(e.t), &brokerv1.GetLeaseRequest{LeaseId: id})
	if err != nil {
		e.t.Fatalf("GetLease(%s): %v", id, err)
	}
	return resp.GetLease()
}

// cycles returns d's device cycles and per-buffer revokes.
func cycles(d *brokertest.Device) (dev, buf int) {
	d.Locked(func(d *brokertest.Device) { dev, buf = d.Revokes, d.BufferRevokes })
	return dev, buf
}

func TestDurationFromProto(t *testing.T) {
	for _, tc := range []struct {
		d    *durationpb.Duration
		want time.Duration
		msg  string // "" if accepted
	}{
		{nil, 0, ""},
		{&durationpb.Duration{}, 0, ""},
		{durationpb.New(time.Nanosecond), time.Nanosecond, ""},
		{durationpb.New(time.Hour), time.Hour, ""},
		{durationpb.New(-time.Second), 0, "x -1s is negative"},
		{durationpb.New(time.Hour + time.Nanosecond), 0, "x 1h0m0.000000001s is longer than the 1h0m0s allowed"},
		{&durationpb.Duration{Seconds: 1, Nanos: -1}, 0, "x is not a valid duration"},
		{&durationpb.Duration{Nanos: 1e9}, 0, "x is not a valid duration"},
		{&durationpb.Duration{Seconds: 315576000000}, 0, "is longer than"}, // saturates, still refused
		{&durationpb.Duration{Seconds: 315576000001}, 0, "x is not a valid duration"},
	} {
		got, err := durationFromProto("x", tc.d, time.Hour)
		switch {
		case tc.msg == "" && (err != nil || got != tc.want):
			t.Errorf("durationFromProto(%v) = %v, %v; want %v", tc.d, got, err, tc.want)
		case tc.msg != "":
			wantCode(t, toStatus(err), codes.InvalidArgument, tc.msg)
		}
	}
}

func TestRevokeLeaseGraceReleased(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	hs := e.watch(holder.ctx(t), holder, 0)

	before := time.Now()
	resp, err := e.client.RevokeLease(groupAdm.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l.GetId(), GracePeriod: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	got := resp.GetLease()
	deadline := got.GetRevokeDeadline().AsTime()
	if got.GetState() != stateActive || got.GetEndReason() != brokerv1.EndReason_END_REASON_UNSPECIFIED ||
		deadline.Before(before.Add(time.Hour)) || deadline.After(time.Now().Add(time.Hour)) {
		t.Fatalf("lease after a revoke with a 1h grace period = %v, want ACTIVE with revoke_deadline about 1h from now", got)
	}
	ev := waitEvent(t, hs, evRevokeRequested, l.GetId())
	if !ev.GetLease().GetRevokeDeadline().AsTime().Equal(deadline) {
		t.Errorf("REVOKE_REQUESTED carries revoke_deadline %v, want %v", ev.GetLease().GetRevokeDeadline().AsTime(), deadline)
	}
	// A longer grace period does not push the deadline out; no new event.
	resp, err = e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l.GetId(), GracePeriod: durationpb.New(time.Hour)})
	if err != nil || !resp.GetLease().GetRevokeDeadline().AsTime().Equal(deadline) {
		t.Errorf("second revoke request = %v, %v; want the first deadline %v to stand", resp, err, deadline)
	}
	if e.getLease(l.GetId()).GetRevokeDeadline() == nil {
		t.Error("GetLease does not show the pending revoke deadline")
	}

	// The holder cooperates: it releases the lease, which ends as released; the release
	// completes the requested revoke at once (one device cycle), nothing waits for the
	// deadline.
	rel, err := e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: l.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if r := rel.GetLease(); r.GetState() != stateReleased || r.GetEndReason() != brokerv1.EndReason_END_REASON_RELEASED || r.GetRevokeDeadline() != nil {
		t.Errorf("released lease = %v, want RELEASED/RELEASED without revoke_deadline", r)
	}
	// The next event on the holder's stream is the release: the grace timer was stopped.
	if got := recv(t, hs, 1); got[0].Type != evReleased || got[0].Lease != l.GetId() {
		t.Errorf("event after the release: %+v", got)
	}
	if c, _ := cycles(e.devA); c != 1 {
		t.Errorf("device cycled %d times, want once, by the release", c)
	}
}

func TestRevokeLeaseGraceEnforced(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	survivor := e.allocateClaimed(holder2, oneRange(bdfA, 4, 0, page(1)))
	as := e.watch(root.ctx(t), root, 0)

	// A long grace period, then a short one: the earlier deadline replaces the later.
	for _, grace := range []time.Duration{time.Hour, time.Millisecond} {
		if _, err := e.client.RevokeLease(groupAdm.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l.GetId(), GracePeriod: durationpb.New(grace)}); err != nil {
			t.Fatal(err)
		}
	}
	first := waitEvent(t, as, evRevokeRequested, l.GetId()).GetLease().GetRevokeDeadline().AsTime()
	second := waitEvent(t, as, evRevokeRequested, l.GetId()).GetLease().GetRevokeDeadline().AsTime()
	if !second.Before(first) {
		t.Errorf("deadlines %v then %v; want the second earlier", first, second)
	}
	// The holder does nothing: at the deadline the broker revokes the lease for the admin
	// who asked, and the device cycle reissues the survivor.
	ev := waitEvent(t, as, evRevoked, l.GetId())
	want := fmt.Sprintf("uid %d (admin) pid %d", uidGroupAdm, os.Getpid())
	if got := ev.GetLease(); got.GetState() != stateRevoked || got.GetEndReason() != brokerv1.EndReason_END_REASON_REVOKED ||
		got.GetEndedBy() != want || got.GetRevokeDeadline() != nil {
		t.Errorf("enforced revoke = %v, want REVOKED/REVOKED by %q", got, want)
	}
	if re := waitEvent(t, as, evReissued, survivor.GetId()); re.GetLease().GetGeneration() != 2 {
		t.Errorf("survivor reissued as %v", re.GetLease())
	}
	if c, _ := cycles(e.devA); c != 1 {
		t.Errorf("device cycled %d times, want 1", c)
	}

	// Grace 0 after a pending request revokes at once.
	l2 := e.allocateClaimed(holder2, oneRange(bdfA, 0, page(8), page(1)))
	if _, err := e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l2.GetId(), GracePeriod: durationpb.New(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l2.GetId(), GracePeriod: &durationpb.Duration{}})
	if err != nil || resp.GetLease().GetState() != stateRevoked {
		t.Errorf("revoke with grace 0 after a pending request = %v, %v; want REVOKED", resp, err)
	}
}

func TestRevokeLeaseGraceRejected(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	id := l.GetId()
	for _, tc := range []struct {
		as    user
		grace *durationpb.Duration
		code  codes.Code
		msg   []string
	}{
		{root, durationpb.New(-time.Second), codes.InvalidArgument, []string{"revoke lease " + id + ": grace_period -1s is negative"}},
		{root, durationpb.New(time.Hour + time.Second), codes.InvalidArgument, []string{"grace_period 1h0m1s is longer than the 1h0m0s allowed"}},
		{root, &durationpb.Duration{Seconds: -1, Nanos: 5}, codes.InvalidArgument, []string{"grace_period is not a valid duration"}},
		{holder, durationpb.New(time.Minute), codes.PermissionDenied, []string{"is not an admin"}},
		{root, durationpb.New(time.Minute), codes.NotFound, nil}, // with the id below
	} {
		lid := id
		if tc.code == codes.NotFound {
			lid = "0123456789abcdef01234567"
		}
		before := e.allLeases()
		_, err := e.client.RevokeLease(tc.as.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: lid, GracePeriod: tc.grace})
		wantCode(t, err, tc.code, tc.msg...)
		if diff := cmpLeases(before, e.allLeases()); diff != "" {
			t.Errorf("leases changed (-before +after):\n%s", diff)
		}
	}
}

func TestAllocateLeaseTTL(t *testing.T) {
	e := newEnv(t)
	before := time.Now()
	resp := e.allocate(holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: []*brokerv1.Range{{Length: page(1)}}, Ttl: durationpb.New(time.Hour)})
	l := resp.GetLease()
	exp := l.GetExpireTime().AsTime()
	if l.GetTtl().AsDuration() != time.Hour || exp.Before(before.Add(time.Hour)) || exp.After(time.Now().Add(time.Hour)) {
		t.Errorf("lease with a 1h ttl = %v", l)
	}
	if cd := l.GetClaimDeadline(); cd == nil || !cd.AsTime().Equal(resp.GetClaimDeadline().AsTime()) {
		t.Errorf("lease claim_deadline %v, response claim_deadline %v", cd, resp.GetClaimDeadline())
	}
	e.claim(l, resp.GetClaimToken())
	if got := e.getLease(l.GetId()); got.GetClaimDeadline() != nil || got.GetExpireTime() == nil {
		t.Errorf("claimed lease = %v, want no claim_deadline and an expire_time", got)
	}
	// Without a ttl, none is reported.
	if l := e.allocate(holder, oneRange(bdfA, 0, page(4), page(1))).GetLease(); l.GetTtl() != nil || l.GetExpireTime() != nil {
		t.Errorf("lease without a ttl = %v", l)
	}

	for _, tc := range []struct {
		ttl *durationpb.Duration
		msg string
	}{
		{durationpb.New(-time.Second), "device 0000:00:03.0: ttl -1s is negative"},
		{durationpb.New(367 * 24 * time.Hour), "device 0000:00:03.0: ttl 8808h0m0s is longer than the 8784h0m0s allowed"},
		{&durationpb.Duration{Nanos: -1e9}, "device 0000:00:03.0: ttl is not a valid duration"},
	} {
		before := e.allLeases()
		_, err := e.client.AllocateLease(holder.ctx(t), &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: []*brokerv1.Range{{Offset: page(8), Length: page(1)}}, Ttl: tc.ttl})
		wantCode(t, err, codes.InvalidArgument, tc.msg)
		if diff := cmpLeases(before, e.allLeases()); diff != "" {
			t.Errorf("leases changed (-before +after):\n%s", diff)
		}
	}
}

func TestRenewLease(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: []*brokerv1.Range{{Length: page(1)}}, Ttl: durationpb.New(time.Hour)})
	noTTL := e.allocateClaimed(holder, oneRange(bdfA, 0, page(4), page(1)))
	hs := e.watch(otherProc.ctx(t), otherProc, 0) // another process of the holder's uid

	for _, tc := range []struct {
		as   user
		id   string
		ttl  *durationpb.Duration
		code codes.Code
		msg  []string
	}{
		{holder2, l.GetId(), nil, codes.PermissionDenied, []string{"renew lease " + l.GetId() + ": it is held by tenant uid=1000, not uid=1001"}},
		{stranger, l.GetId(), nil, codes.PermissionDenied, nil},
		{holder, "", nil, codes.InvalidArgument, []string{"lease_id is required"}},
		{holder, l.GetId(), durationpb.New(-time.Minute), codes.InvalidArgument, []string{"renew lease " + l.GetId() + ": ttl -1m0s is negative"}},
		{holder, l.GetId(), durationpb.New(400 * 24 * time.Hour), codes.InvalidArgument, []string{"is longer than the 8784h0m0s allowed"}},
		{holder, noTTL.GetId(), nil, codes.InvalidArgument, []string{"has no time to live; give one to renew it"}},
		{holder, "0123456789abcdef01234567", nil, codes.NotFound, nil},
		{root, "0123456789abcdef01234567", nil, codes.NotFound, nil},
	} {
		before := e.allLeases()
		_, err := e.client.RenewLease(tc.as.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: tc.id, Ttl: tc.ttl})
		wantCode(t, err, tc.code, tc.msg...)
		if diff := cmpLeases(before, e.allLeases()); diff != "" {
			t.Errorf("leases changed (-before +after):\n%s", diff)
		}
	}

	// The holder renews by its own ttl; then an admin gives it a new one.
	old := e.getLease(l.GetId()).GetExpireTime().AsTime()
	resp, err := e.client.RenewLease(holder.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: l.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetLease(); got.GetTtl().AsDuration() != time.Hour || got.GetExpireTime().AsTime().Before(old) {
		t.Errorf("renewed lease = %v, want ttl 1h and an expiry not before %v", got, old)
	}
	ev := waitEvent(t, hs, evRenewed, l.GetId())
	if !ev.GetLease().GetExpireTime().AsTime().Equal(resp.GetLease().GetExpireTime().AsTime()) {
		t.Errorf("RENEWED event expire_time %v, response %v", ev.GetLease().GetExpireTime().AsTime(), resp.GetLease().GetExpireTime().AsTime())
	}
	resp, err = e.client.RenewLease(groupAdm.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: l.GetId(), Ttl: durationpb.New(2 * time.Hour)})
	if err != nil || resp.GetLease().GetTtl().AsDuration() != 2*time.Hour {
		t.Errorf("admin renew with 2h = %v, %v", resp, err)
	}
	// Renewing a lease without a ttl gives it one.
	resp, err = e.client.RenewLease(holder.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: noTTL.GetId(), Ttl: durationpb.New(time.Minute)})
	if err != nil || resp.GetLease().GetTtl().AsDuration() != time.Minute || resp.GetLease().GetExpireTime() == nil {
		t.Errorf("renew of a lease without a ttl = %v, %v", resp, err)
	}

	// A renewal to a very short ttl: the lease expires, which revokes it (device cycle).
	if _, err := e.client.RenewLease(holder.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: l.GetId(), Ttl: durationpb.New(time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	ev = waitEvent(t, hs, evExpired, l.GetId())
	if got := ev.GetLease(); got.GetState() != stateRevoked || got.GetEndReason() != brokerv1.EndReason_END_REASON_EXPIRED ||
		got.GetEndedBy() != "broker (ttl)" || got.GetExpireTime() != nil || got.GetEndTime() == nil {
		t.Errorf("expired lease = %v, want REVOKED/EXPIRED by \"broker (ttl)\", no expire_time", got)
	}
	// The device cycle reissues the other lease of the device.
	waitEvent(t, hs, evReissued, noTTL.GetId())
	if c, _ := cycles(e.devA); c != 1 {
		t.Errorf("device cycled %d times, want 1", c)
	}
	_, err = e.client.RenewLease(holder.ctx(t), &brokerv1.RenewLeaseRequest{LeaseId: l.GetId()})
	wantCode(t, err, codes.FailedPrecondition, "has already ended (expired)")
}

func TestClaimExpired(t *testing.T) {
	e := newEnv(t, func(o *envOptions) { o.cfg = func(c *broker.Config) { c.ClaimTimeout = time.Millisecond } })
	hs := e.watch(holder.ctx(t), holder, 0)
	resp := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	ev := waitEvent(t, hs, evExpired, resp.GetLease().GetId())
	if got := ev.GetLease(); got.GetState() != stateReleased || got.GetEndReason() != brokerv1.EndReason_END_REASON_CLAIM_EXPIRED ||
		got.GetEndedBy() != "broker" || got.GetClaimDeadline() != nil {
		t.Errorf("lease after its claim token expired = %v, want RELEASED/CLAIM_EXPIRED", got)
	}
	if c, _ := cycles(e.devA); c != 0 {
		t.Errorf("an unclaimed lease's expiry cycled the device %d times", c)
	}
}

func TestSuspendResumeDevice(t *testing.T) {
	e := newEnv(t)
	l1 := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	l2 := e.allocateClaimed(holder2, oneRange(bdfA, 4, 0, page(1)))
	hs := e.watch(holder.ctx(t), holder, 0)
	as := e.watch(root.ctx(t), root, 0)
	suspended := func() bool {
		var s bool
		e.devA.Locked(func(d *brokertest.Device) { s = d.Suspended })
		return s
	}

	for _, tc := range []struct {
		as   user
		bdf  string
		code codes.Code
		msg  []string
	}{
		{holder, bdfA, codes.PermissionDenied, []string{"suspend device 0000:00:03.0: uid 1000 pid", "is not an admin"}},
		{root, "", codes.InvalidArgument, []string{"bdf is required"}},
		{root, "00:03", codes.InvalidArgument, nil},
		{root, bdfNone, codes.NotFound, []string{"device 0000:00:1f.0 is not configured"}},
		{root, bdfD, codes.FailedPrecondition, []string{"suspend device 0000:00:06.0"}},
	} {
		_, err := e.client.SuspendDevice(tc.as.ctx(t), &brokerv1.SuspendDeviceRequest{Bdf: tc.bdf})
		wantCode(t, err, tc.code, tc.msg...)
	}
	if suspended() {
		t.Fatal("a rejected request suspended the device")
	}

	resp, err := e.client.SuspendDevice(groupAdm.ctx(t), &brokerv1.SuspendDeviceRequest{Bdf: "00:03.0"})
	if err != nil {
		t.Fatal(err)
	}
	if d := resp.GetDevice(); !d.GetSuspended() || !d.GetUsable() || d.GetLiveLeases() != 2 || d.GetBdf() != bdfA {
		t.Errorf("suspended device = %v", d)
	}
	if !suspended() {
		t.Error("the device's memory decode was not turned off")
	}
	// Every live lease of the device hears of it; the holder only of its own.
	if diff := cmpSeen([]seen{{0, evSuspended, l1.GetId(), 1, false}, {0, evSuspended, l2.GetId(), 1, false}}, recv(t, as, 2)); diff != "" {
		t.Errorf("admin's events (-want +got):\n%s", diff)
	}
	if ev := waitEvent(t, hs, evSuspended, l1.GetId()); ev.GetLease().GetState() != stateActive {
		t.Errorf("suspended lease = %v, want still ACTIVE", ev.GetLease())
	}
	dev, err := e.client.GetDevice(holder.ctx(t), &brokerv1.GetDeviceRequest{Bdf: bdfA})
	if err != nil || !dev.GetDevice().GetSuspended() {
		t.Errorf("GetDevice while suspended = %v, %v", dev, err)
	}
	_, err = e.client.AllocateLease(holder.ctx(t), oneRange(bdfA, 0, page(8), page(1)))
	wantCode(t, err, codes.FailedPrecondition, "device 0000:00:03.0 is suspended for maintenance")
	_, err = e.client.SuspendDevice(root.ctx(t), &brokerv1.SuspendDeviceRequest{Bdf: bdfA})
	wantCode(t, err, codes.FailedPrecondition, "it is already suspended")

	_, err = e.client.ResumeDevice(holder.ctx(t), &brokerv1.ResumeDeviceRequest{Bdf: bdfA})
	wantCode(t, err, codes.PermissionDenied, "resume device 0000:00:03.0", "is not an admin")
	rresp, err := e.client.ResumeDevice(root.ctx(t), &brokerv1.ResumeDeviceRequest{Bdf: bdfA})
	if err != nil {
		t.Fatal(err)
	}
	if d := rresp.GetDevice(); d.GetSuspended() || !d.GetUsable() {
		t.Errorf("resumed device = %v", d)
	}
	if suspended() {
		t.Error("the device's memory decode was not turned back on")
	}
	if diff := cmpSeen([]seen{{0, evResumed, l1.GetId(), 1, false}, {0, evResumed, l2.GetId(), 1, false}}, recv(t, as, 2)); diff != "" {
		t.Errorf("admin's events (-want +got):\n%s", diff)
	}
	waitEvent(t, hs, evResumed, l1.GetId())
	_, err = e.client.ResumeDevice(root.ctx(t), &brokerv1.ResumeDeviceRequest{Bdf: bdfA})
	wantCode(t, err, codes.FailedPrecondition, "it is already resume") // broker says "resumeed"
	// Leasable again; the leases kept their generation (the fds were never revoked).
	e.allocate(holder, oneRange(bdfA, 0, page(8), page(1)))
	if g := e.getLease(l1.GetId()).GetGeneration(); g != 1 {
		t.Errorf("generation after suspend and resume = %d, want 1", g)
	}
	if c, _ := cycles(e.devA); c != 0 {
		t.Errorf("suspend and resume cycled the device %d times", c)
	}
}

// TestDeviceErrorsAndLoss raises an error notice and then a release request (the kernel
// asking for the device back on an unbind), as the VFIO notifiers would.
func TestDeviceErrorsAndLoss(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	hs := e.watch(holder.ctx(t), holder, 0)
	if !e.devA.Notify(broker.NoticeError) || !e.devA.Notify(broker.NoticeRelease) {
		t.Fatal("the fake device does not take notices")
	}
	ev := waitEvent(t, hs, evDeviceLost, l.GetId())
	if got := ev.GetLease(); got.GetState() != stateRevoked || got.GetEndReason() != brokerv1.EndReason_END_REASON_DEVICE_LOST {
		t.Errorf("lease after device loss = %v", got)
	}
	// The notices are handled in order: the error was counted before the device was lost.
	dev, err := e.client.GetDevice(root.ctx(t), &brokerv1.GetDeviceRequest{Bdf: bdfA})
	if err != nil {
		t.Fatal(err)
	}
	if d := dev.GetDevice(); d.GetErrorCount() != 1 || d.GetUsable() || !strings.Contains(d.GetError(), "asked for the device back") {
		t.Errorf("device after an error and a release request = %v, want error_count 1, unusable", d)
	}
}

// withFakeProcs makes callers whose (test-overridden) pid is a key of procs pinned by that
// fake process, so that a test can make a holder exit.
func withFakeProcs(procs map[int32]*brokertest.Process) func(*envOptions) {
	return func(o *envOptions) {
		o.identify = func(ctx context.Context) (Identity, error) {
			id, err := testIdentify(ctx)
			if p, ok := procs[id.PID]; ok && err == nil {
				id.Pin = func() (broker.Process, error) { return p, nil }
			}
			return id, err
		}
	}
}

func TestHolderExit(t *testing.T) {
	proc := &brokertest.Process{Pid: 4242}
	e := newEnv(t, withFakeProcs(map[int32]*brokertest.Process{4242: proc}))
	vmm := user{uid: uidHolder, gid: uidHolder, pid: 4242}
	l := e.allocateClaimed(vmm, oneRange(bdfA, 0, 0, page(1)))
	survivor := e.allocateClaimed(holder2, oneRange(bdfA, 4, 0, page(1)))
	as := e.watch(root.ctx(t), root, 0)

	proc.Exit()
	ev := waitEvent(t, as, evReleased, l.GetId())
	if got := ev.GetLease(); got.GetState() != stateReleased || got.GetEndReason() != brokerv1.EndReason_END_REASON_HOLDER_EXITED ||
		got.GetEndedBy() != "pid 4242 exited" {
		t.Errorf("lease after its holder exited = %v, want RELEASED/HOLDER_EXITED by \"pid 4242 exited\"", got)
	}
	// Unlike a release, a holder exit revokes the buffer: the device cycles and the
	// survivor is reissued.
	waitEvent(t, as, evReissued, survivor.GetId())
	if c, _ := cycles(e.devA); c != 1 {
		t.Errorf("device cycled %d times, want 1", c)
	}
	if !proc.Closed() {
		t.Error("the holder's process handle was not closed")
	}
}

// envChildSocket makes the test binary a child process that allocates a lease on the
// control socket it names (with its real peer credentials), prints "ID TOKEN", and exits
// when its stdin closes.
const envChildSocket = "MMB_SERVER_TEST_CHILD_SOCKET"

// childAllocate is the child's side of TestHolderExitRealProcess.
func childAllocate(socket string) int {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(newEnvCreds()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := brokerv1.NewBrokerClient(conn).AllocateLease(ctx, oneRange(bdfA, 0, page(32), page(1)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	fmt.Printf("%s %s\n", resp.GetLease().GetId(), resp.GetClaimToken())
	bufio.NewReader(os.Stdin).ReadString('\n') // until the parent closes stdin
	return 0
}

// TestHolderExitRealProcess lets a real process allocate a lease (pinned by the pidfd of
// its connection, SO_PEERPIDFD) and exit: the broker sees the exit through the pidfd.
func TestHolderExitRealProcess(t *testing.T) {
	e := newEnv(t)
	survivor := e.allocateClaimed(holder2, oneRange(bdfA, 4, 0, page(1)))
	as := e.watch(root.ctx(t), root, 0)

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), envChildSocket+"="+e.socket)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	id, token, ok := strings.Cut(strings.TrimSpace(line), " ")
	if err != nil || !ok {
		stdin.Close()
		cmd.Wait()
		t.Fatalf("child said %q, %v", line, err)
	}
	l := e.getLease(id)
	if l.GetHolder().GetPid() != int32(cmd.Process.Pid) || l.GetHolder().GetUid() != uint32(os.Getuid()) {
		t.Errorf("lease holder %v, want the child (pid %d)", l.GetHolder(), cmd.Process.Pid)
	}
	e.claim(l, token) // as the claim socket would for the child: its fd left the broker

	stdin.Close() // the child exits
	ev := waitEvent(t, as, evReleased, id)
	if err := cmd.Wait(); err != nil {
		t.Errorf("child: %v", err)
	}
	want := fmt.Sprintf("pid %d exited", cmd.Process.Pid)
	if got := ev.GetLease(); got.GetState() != stateReleased || got.GetEndReason() != brokerv1.EndReason_END_REASON_HOLDER_EXITED || got.GetEndedBy() != want {
		t.Errorf("lease after the child exited = %v, want RELEASED/HOLDER_EXITED by %q", got, want)
	}
	waitEvent(t, as, evReissued, survivor.GetId())
	if c, _ := cycles(e.devA); c != 1 {
		t.Errorf("device cycled %d times, want 1", c)
	}
}

func TestDrainRPC(t *testing.T) {
	e := newEnv(t)
	l := e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1)))
	_, err := e.client.Drain(holder.ctx(t), &brokerv1.DrainRequest{})
	wantCode(t, err, codes.PermissionDenied, "drain: uid 1000 pid", "is not an admin")
	resp, err := e.client.Drain(root.ctx(t), &brokerv1.DrainRequest{})
	if err != nil || resp.GetEndedLeases() != 1 || resp.GetCycledDevices() != 1 {
		t.Fatalf("Drain = %v, %v; want 1 lease ended, 1 device cycled", resp, err)
	}
	got, err := e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.GetId()})
	if err != nil || got.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED ||
		got.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_BROKER_SHUTDOWN {
		t.Errorf("lease after drain: %v, %v", got, err)
	}
	_, err = e.client.AllocateLease(holder.ctx(t), oneRange(bdfA, 0, 0, page(1)))
	wantCode(t, err, codes.FailedPrecondition, "drained")
}
