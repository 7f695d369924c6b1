package client_test

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// reissue is what OnReissue saw.
type reissue struct {
	f    *os.File
	info client.ClaimInfo
	ino  uint64 // fstat of f inside the callback
}

// recorder collects a hold's callbacks into channels.
type recorder struct {
	reissues chan reissue
	events   chan *brokerv1.Event
}

func newRecorder() *recorder {
	return &recorder{reissues: make(chan reissue, 8), events: make(chan *brokerv1.Event, 64)}
}

func (r *recorder) options() client.HoldOptions {
	return client.HoldOptions{
		OnReissue: func(f *os.File, info client.ClaimInfo) {
			var ino uint64
			if fi, err := f.Stat(); err == nil {
				ino = fi.Sys().(*syscall.Stat_t).Ino
			}
			r.reissues <- reissue{f, info, ino}
		},
		OnEvent: func(e *brokerv1.Event) { r.events <- e },
	}
}

// event waits for the next event of type typ.
func (r *recorder) event(t *testing.T, typ brokerv1.EventType) *brokerv1.Event {
	t.Helper()
	timeout := time.After(30 * time.Second) // a bound on failure, not a timing assertion
	for {
		select {
		case e := <-r.events:
			if e.GetType() == typ {
				return e
			}
		case <-timeout:
			t.Fatalf("no %v event", typ)
		}
	}
}

func wait(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: not within 30s", what)
	}
}

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestAllocateAndHoldReissue revokes another lease of the same device: the held lease is
// reissued, and the hold claims the new generation without the caller calling Claim.
func TestAllocateAndHoldReissue(t *testing.T) {
	_, c := start(t)
	rec := newRecorder()
	h, err := c.AllocateAndHold(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: 4096}}}, rec.options())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	first := h.File()
	if h.Claim().Generation != 1 || inode(t, first) != h.Claim().Inode || h.Lease().GetId() != h.ID {
		t.Fatalf("held lease %s: claim %+v, lease %v", h.ID, h.Claim(), h.Lease())
	}
	other, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.File.Close()
	if _, err := c.Revoke(ctx(t), other.ID); err != nil {
		t.Fatal(err)
	}

	var r reissue
	select {
	case r = <-rec.reissues:
	case <-time.After(30 * time.Second):
		t.Fatal("the held lease was not reissued")
	}
	cur, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: h.ID})
	if err != nil {
		t.Fatal(err)
	}
	l := cur.GetLease()
	if r.info.Generation != 2 || r.info.LeaseID != h.ID || r.ino != r.info.Inode || r.info.Inode != l.GetInode() ||
		l.GetGeneration() != 2 || l.GetClaimTime() == nil {
		t.Errorf("reissue %+v (fd inode %d); lease now %v; want generation 2 claimed, fd of the new inode", r.info, r.ino, l)
	}
	if h.File() != r.f || h.Claim() != r.info {
		t.Errorf("File/Claim not swapped: %v %+v", h.File(), h.Claim())
	}
	// The dead fd was closed once OnReissue returned, before OnEvent's REISSUED (checked
	// after that event: OnReissue's send reaches the test before the close).
	rec.event(t, brokerv1.EventType_EVENT_TYPE_REISSUED)
	if _, err := first.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("old fd: Stat = %v, want os.ErrClosed", err)
	}

	// Revoking the held lease ends the hold.
	if _, err := c.Revoke(ctx(t), h.ID); err != nil {
		t.Fatal(err)
	}
	wait(t, h.Done(), "hold end after revoke")
	var le *client.LeaseEndedError
	if err := h.Err(); !errors.As(err, &le) || le.Event.GetType() != brokerv1.EventType_EVENT_TYPE_REVOKED ||
		le.Event.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_REVOKED {
		t.Errorf("Err = %v, want a LeaseEndedError of a REVOKED event", err)
	}
	if e := rec.event(t, brokerv1.EventType_EVENT_TYPE_REVOKED); e.GetLease().GetId() != h.ID {
		t.Errorf("final event %v", e)
	}
	if h.Lease().GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED {
		t.Errorf("Lease() = %v, want the revoked snapshot", h.Lease())
	}
	if err := h.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := r.f.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("fd after Close: Stat = %v, want os.ErrClosed", err)
	}
}

// TestHoldCooperativeRevoke releases the held lease from the hold's callback when an
// administrator asks for it back.
func TestHoldCooperativeRevoke(t *testing.T) {
	_, c := start(t)
	var h *client.HeldLease
	held := make(chan struct{})
	released := make(chan error, 1)
	opt := client.HoldOptions{OnEvent: func(e *brokerv1.Event) {
		if e.GetType() == brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED {
			<-held
			_, err := h.Release(context.Background())
			released <- err
		}
	}}
	h, err := c.AllocateAndHold(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0}, opt)
	close(held)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := c.RevokeWithGrace(ctx(t), h.ID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if l.GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || l.GetRevokeDeadline() == nil {
		t.Fatalf("lease after a revoke request = %v", l)
	}
	wait(t, h.Done(), "hold end after the cooperative release")
	if err := <-released; err != nil {
		t.Errorf("release from the callback: %v", err)
	}
	var le *client.LeaseEndedError
	if err := h.Err(); !errors.As(err, &le) || le.Event.GetType() != brokerv1.EventType_EVENT_TYPE_RELEASED ||
		le.Event.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_RELEASED {
		t.Errorf("Err = %v, want a LeaseEndedError of a RELEASED event", err)
	}
	// A release does not revoke: the fd still works until closed.
	if _, err := h.File().Stat(); err != nil {
		t.Errorf("fd after release: %v", err)
	}
}

func TestHoldAllocatedLease(t *testing.T) {
	_, c := start(t)
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	h, err := c.Hold(ctx(t), l, rec.options())
	if err != nil {
		l.File.Close()
		t.Fatal(err)
	}
	defer h.Close()
	if h.File() != l.File {
		t.Fatal("Hold did not take over the lease's fd")
	}

	// A lease reissued before Hold subscribed cannot be held: its claim token is lost.
	l2, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 4096, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.File.Close()
	victim, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer victim.File.Close()
	if _, err := c.Revoke(ctx(t), victim.ID); err != nil {
		t.Fatal(err)
	}
	// The first hold follows its reissue by itself.
	select {
	case r := <-rec.reissues:
		if r.info.Generation != 2 || r.info.LeaseID != l.ID {
			t.Errorf("reissue %+v", r.info)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the held lease was not reissued")
	}
	_, err = c.Hold(ctx(t), l2, client.HoldOptions{})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Hold of a lease reissued before = %v, want FailedPrecondition", err)
	}
	if _, err := l2.File.Stat(); err != nil {
		t.Errorf("the caller's fd after a failed Hold: %v", err)
	}
	// Nor can an ended lease be held.
	if _, err := c.Release(ctx(t), l2.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Hold(ctx(t), l2, client.HoldOptions{}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Hold of a released lease = %v, want FailedPrecondition", err)
	}
}

func TestTTLRenewSuspendResume(t *testing.T) {
	_, c := start(t)
	rec := newRecorder()
	h, err := c.AllocateAndHold(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, TTL: time.Hour}, rec.options())
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if l := h.Lease(); l.GetTtl().AsDuration() != time.Hour || l.GetExpireTime() == nil {
		t.Fatalf("lease with a ttl = %v", l)
	}
	l, err := c.Renew(ctx(t), h.ID, 2*time.Hour)
	if err != nil || l.GetTtl().AsDuration() != 2*time.Hour {
		t.Fatalf("Renew = %v, %v", l, err)
	}
	rec.event(t, brokerv1.EventType_EVENT_TYPE_RENEWED)
	if _, err := c.Renew(ctx(t), h.ID, -time.Second); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Renew with a negative ttl = %v, want InvalidArgument", err)
	}

	d, err := c.Suspend(ctx(t), bdf)
	if err != nil || !d.GetSuspended() {
		t.Fatalf("Suspend = %v, %v", d, err)
	}
	rec.event(t, brokerv1.EventType_EVENT_TYPE_SUSPENDED)
	if _, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 4}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Allocate on a suspended device = %v, want FailedPrecondition", err)
	}
	d, err = c.Resume(ctx(t), bdf)
	if err != nil || d.GetSuspended() {
		t.Fatalf("Resume = %v, %v", d, err)
	}
	if e := rec.event(t, brokerv1.EventType_EVENT_TYPE_RESUMED); e.GetLease().GetGeneration() != 1 {
		t.Errorf("resumed lease %v, want still generation 1", e.GetLease())
	}
	select {
	case <-h.Done():
		t.Fatalf("the hold ended: %v", h.Err())
	default:
	}

	// A very short renewal: the lease expires, which ends the hold.
	if _, err := c.Renew(ctx(t), h.ID, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	wait(t, h.Done(), "hold end after expiry")
	var le *client.LeaseEndedError
	if err := h.Err(); !errors.As(err, &le) || le.Event.GetType() != brokerv1.EventType_EVENT_TYPE_EXPIRED ||
		le.Event.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_EXPIRED {
		t.Errorf("Err = %v, want a LeaseEndedError of an EXPIRED event", err)
	}
}

func TestHoldEndsWhenDaemonStops(t *testing.T) {
	d, c := start(t)
	h, err := c.AllocateAndHold(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0}, client.HoldOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	go d.Stop()
	wait(t, h.Done(), "hold end after the daemon stopped")
	// The broker's shutdown releases the lease, or the stream ends first: either way the
	// hold stops with a reason.
	var le *client.LeaseEndedError
	if err := h.Err(); errors.As(err, &le) {
		if r := le.Event.GetLease().GetEndReason(); r != brokerv1.EndReason_END_REASON_BROKER_SHUTDOWN {
			t.Errorf("lease ended with %v, want BROKER_SHUTDOWN", r)
		}
	} else if status.Code(err) != codes.Unavailable {
		t.Errorf("Err = %v, want Unavailable or a LeaseEndedError", err)
	}
}

func TestAllocateAndHoldFails(t *testing.T) {
	_, c := start(t)
	if _, err := c.AllocateAndHold(ctx(t), client.AllocateOptions{BDF: "0000:00:1f.0"}, client.HoldOptions{}); status.Code(err) != codes.NotFound {
		t.Errorf("AllocateAndHold of an unconfigured device = %v, want NotFound", err)
	}
	cctx, cancel := context.WithCancel(ctx(t))
	cancel()
	if _, err := c.AllocateAndHold(cctx, client.AllocateOptions{BDF: bdf}, client.HoldOptions{}); !errors.Is(err, context.Canceled) && status.Code(err) != codes.Canceled {
		t.Errorf("AllocateAndHold with a cancelled context = %v", err)
	}
}
