package server

import (
	"context"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// watch opens an event stream as u and waits until the server has subscribed.
func (e *env) watch(ctx context.Context, u user, after uint64) grpc.ServerStreamingClient[brokerv1.WatchEventsResponse] {
	e.t.Helper()
	s, err := e.client.WatchEvents(ctx, &brokerv1.WatchEventsRequest{AfterSeq: after})
	if err != nil {
		e.t.Fatalf("WatchEvents as uid %d: %v", u.uid, err)
	}
	if _, err := s.Header(); err != nil {
		e.t.Fatalf("WatchEvents as uid %d: header: %v", u.uid, err)
	}
	return s
}

// seen is an event as a test compares it.
type seen struct {
	Seq   uint64
	Type  brokerv1.EventType
	Lease string
	Gen   uint64
	Token bool
}

// recv reads n events from s.
func recv(t *testing.T, s grpc.ServerStreamingClient[brokerv1.WatchEventsResponse], n int) []seen {
	t.Helper()
	var out []seen
	for range n {
		resp, err := s.Recv()
		if err != nil {
			t.Fatalf("Recv after %v: %v", out, err)
		}
		ev := resp.GetEvent()
		if ev.GetTime() == nil {
			t.Errorf("event %d has no time", ev.GetSeq())
		}
		out = append(out, seen{ev.GetSeq(), ev.GetType(), ev.GetLease().GetId(), ev.GetLease().GetGeneration(), ev.GetClaimToken() != ""})
	}
	return out
}

const (
	evAllocated = brokerv1.EventType_EVENT_TYPE_ALLOCATED
	evClaimed   = brokerv1.EventType_EVENT_TYPE_CLAIMED
	evRevoked   = brokerv1.EventType_EVENT_TYPE_REVOKED
	evReleased  = brokerv1.EventType_EVENT_TYPE_RELEASED
	evReissued  = brokerv1.EventType_EVENT_TYPE_REISSUED
)

// TestWatchEventsVisibility checks who sees which events, and that a reissued claim token
// reaches only the lease's holder process.
func TestWatchEventsVisibility(t *testing.T) {
	e := newEnv(t)
	streams := map[string]grpc.ServerStreamingClient[brokerv1.WatchEventsResponse]{}
	for name, u := range map[string]user{"admin": root, "group admin": groupAdm, "holder": holder, "holder other process": otherProc, "holder2": holder2} {
		streams[name] = e.watch(u.ctx(t), u, 0)
	}

	l1 := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	e.claim(l1.GetLease(), l1.GetClaimToken())
	l2 := e.allocate(holder2, oneRange(bdfA, 4, 0, page(1)))
	e.claim(l2.GetLease(), l2.GetClaimToken())
	if _, err := e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l2.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	// The holder's stream carries the new claim token, which claims generation 2.
	var hs []seen
	var token string
	for range 3 {
		resp, err := streams["holder"].Recv()
		if err != nil {
			t.Fatal(err)
		}
		ev := resp.GetEvent()
		hs = append(hs, seen{ev.GetSeq(), ev.GetType(), ev.GetLease().GetId(), ev.GetLease().GetGeneration(), ev.GetClaimToken() != ""})
		token = ev.GetClaimToken()
	}
	if token == "" {
		t.Fatalf("holder's first three events %+v carry no claim token", hs)
	}
	_, f, err := e.b.Claim(l1.GetLease().GetId(), token, broker.Peer{UID: uidHolder, PID: int32(os.Getpid())})
	if err != nil {
		t.Fatalf("claim with the reissued token: %v", err)
	}
	f.Close()
	if _, err := e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: l1.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	l3 := e.allocate(holder2, oneRange(bdfA, 4, page(8), page(1))).GetLease().GetId()

	id1, id2 := l1.GetLease().GetId(), l2.GetLease().GetId()
	all := []seen{
		{1, evAllocated, id1, 1, false},
		{2, evClaimed, id1, 1, false},
		{3, evAllocated, id2, 1, false},
		{4, evClaimed, id2, 1, false},
		{5, evRevoked, id2, 1, false},
		{6, evReissued, id1, 2, false},
		{7, evClaimed, id1, 2, false},
		{8, evReleased, id1, 2, false},
		{9, evAllocated, l3, 1, false},
	}
	holderView := []seen{all[0], all[1], all[5], all[6], all[7]}
	want := map[string][]seen{
		"admin":                all,
		"group admin":          all,
		"holder other process": holderView,
		"holder2":              {all[2], all[3], all[4], all[8]},
	}
	for name, w := range want {
		if diff := cmp.Diff(w, recv(t, streams[name], len(w))); diff != "" {
			t.Errorf("%s's events (-want +got):\n%s", name, diff)
		}
	}
	if diff := cmp.Diff(holderView[3:], recv(t, streams["holder"], 2)); diff != "" {
		t.Errorf("holder's events after the reissue (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]seen{all[0], all[1], {6, evReissued, id1, 2, true}}, hs); diff != "" {
		t.Errorf("holder's first events (-want +got):\n%s", diff)
	}
}

func TestWatchEventsResume(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(root.ctx(t))
	s := e.watch(ctx, root, 0)
	var ids []string
	for i := range 3 {
		ids = append(ids, e.allocate(holder, oneRange(bdfA, 0, page(uint64(i)), page(1))).GetLease().GetId())
	}
	got := recv(t, s, 2)
	cancel() // the client goes away after seeing 2 events
	if _, err := s.Recv(); err == nil {
		// Event 3 may have been buffered already; the stream must end after it.
		if _, err := s.Recv(); err == nil {
			t.Fatal("stream continues after cancel")
		}
	}
	for i := 3; i < 5; i++ {
		ids = append(ids, e.allocate(holder2, oneRange(bdfA, 4, page(uint64(i)), page(1))).GetLease().GetId())
	}

	// Resuming after the last event seen replays the rest and continues live.
	s = e.watch(root.ctx(t), root, got[len(got)-1].Seq)
	ids = append(ids, e.allocate(holder, oneRange(bdfA, 0, page(100), page(1))).GetLease().GetId())
	want := []seen{{3, evAllocated, ids[2], 1, false}, {4, evAllocated, ids[3], 1, false},
		{5, evAllocated, ids[4], 1, false}, {6, evAllocated, ids[5], 1, false}}
	if diff := cmp.Diff(want, recv(t, s, 4)); diff != "" {
		t.Errorf("resumed events (-want +got):\n%s", diff)
	}

	// A holder's resume replays only its own events.
	s = e.watch(holder.ctx(t), holder, 1)
	if diff := cmp.Diff([]seen{{2, evAllocated, ids[1], 1, false}, {3, evAllocated, ids[2], 1, false}, {6, evAllocated, ids[5], 1, false}},
		recv(t, s, 3)); diff != "" {
		t.Errorf("holder's resumed events (-want +got):\n%s", diff)
	}

	// Resuming at the last event sends only new ones.
	s = e.watch(root.ctx(t), root, 6)
	ids = append(ids, e.allocate(holder, oneRange(bdfA, 0, page(101), page(1))).GetLease().GetId())
	if diff := cmp.Diff([]seen{{7, evAllocated, ids[6], 1, false}}, recv(t, s, 1)); diff != "" {
		t.Errorf("events after resuming at the last one (-want +got):\n%s", diff)
	}

	// A cursor ahead of the last event is a client bug.
	s, err := e.client.WatchEvents(root.ctx(t), &brokerv1.WatchEventsRequest{AfterSeq: 100})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	wantCode(t, err, codes.InvalidArgument, "event cursor 100 is ahead of the last event 7")
}

func TestWatchEventsExpiredCursor(t *testing.T) {
	e := newEnv(t, func(o *envOptions) { o.cfg = func(c *broker.Config) { c.EventBacklog = 4 } })
	for i := range 6 { // events 1-6; 3-6 are retained
		e.allocate(holder, oneRange(bdfA, 0, page(uint64(i)), page(1)))
	}
	for _, after := range []uint64{1, 2, 3, 4, 5} {
		s := e.watch(root.ctx(t), root, after)
		if after < 2 {
			_, err := s.Recv()
			wantCode(t, err, codes.FailedPrecondition, "older than the oldest retained event 3", "list leases to resync")
			continue
		}
		got := recv(t, s, int(6-after))
		if got[0].Seq != after+1 {
			t.Errorf("after_seq %d: first event %d", after, got[0].Seq)
		}
	}
}

func TestWatchEventsEndsOnStop(t *testing.T) {
	e := newEnv(t)
	s := e.watch(root.ctx(t), root, 0)
	e.stop()
	_, err := s.Recv()
	wantCode(t, err, codes.Unavailable, "shutting down")
}

func TestWatchEventsEndsOnBrokerClose(t *testing.T) {
	e := newEnv(t)
	s := e.watch(holder.ctx(t), holder, 0)
	e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	if err := e.b.Close(); err != nil {
		t.Fatal(err)
	}
	// The allocation, the lease released for the shutdown, then the end of the stream.
	got := recv(t, s, 2)
	if got[1].Type != brokerv1.EventType_EVENT_TYPE_RELEASED {
		t.Fatalf("second event %+v, want RELEASED (broker shutdown)", got[1])
	}
	_, err := s.Recv()
	wantCode(t, err, codes.Unavailable, "event stream ended")
	// Once closed, the broker refuses new streams, and its devices' state is not
	// reported: every device would read as closed (a DRA driver would withdraw them all
	// while the daemon restarts).
	s, err = e.client.WatchEvents(holder.ctx(t), &brokerv1.WatchEventsRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	wantCode(t, err, codes.Unavailable)
	_, err = e.client.ListDevices(holder.ctx(t), &brokerv1.ListDevicesRequest{})
	wantCode(t, err, codes.Unavailable, "shutting down")
	_, err = e.client.GetDevice(holder.ctx(t), &brokerv1.GetDeviceRequest{Bdf: bdfA})
	wantCode(t, err, codes.Unavailable, "shutting down")
}

func TestWatchEventsLagging(t *testing.T) {
	e := newEnv(t, func(o *envOptions) { o.cfg = func(c *broker.Config) { c.EventBacklog = 8 } })
	// A fixed flow-control window (no BDP growth) so that a client that does not read
	// stops the server's sends soon.
	conn := e.dial(grpc.WithInitialWindowSize(1<<16), grpc.WithInitialConnWindowSize(1<<16))
	s, err := brokerv1.NewBrokerClient(conn).WatchEvents(root.ctx(t), &brokerv1.WatchEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Header(); err != nil {
		t.Fatal(err)
	}
	// Churn leases through the broker directly (fast): far more events than the flow
	// control windows and the subscription's buffer can hold.
	h := broker.Holder{UID: uidHolder, PID: int32(os.Getpid())}
	for range 5000 {
		l, _, err := e.b.Allocate(broker.AllocateRequest{BDF: bdfA, BAR: 0, Ranges: []broker.Range{{Offset: 0, Length: 4096}}, Holder: h})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.b.Release(l.ID, broker.Actor{UID: uidHolder}); err != nil {
			t.Fatal(err)
		}
	}
	n := 0
	for {
		_, err := s.Recv()
		if err != nil {
			wantCode(t, err, codes.ResourceExhausted, "fell behind")
			if n >= 10000 {
				t.Errorf("received all %d events before the stream was cut", n)
			}
			return
		}
		n++
	}
}

func TestLastSeqHeader(t *testing.T) {
	if LastSeqHeader != client.LastSeqHeader {
		t.Errorf("server sends %q, client reads %q", LastSeqHeader, client.LastSeqHeader)
	}
	e := newEnv(t)
	e.allocateClaimed(holder, oneRange(bdfA, 0, 0, page(1))) // events 1 and 2
	s, err := e.client.WatchEvents(root.ctx(t), &brokerv1.WatchEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	md, err := s.Header()
	if got := md.Get(LastSeqHeader); err != nil || len(got) != 1 || got[0] != "2" {
		t.Errorf("header %s = %q, %v; want [\"2\"], the last event before the subscription", LastSeqHeader, got, err)
	}
}

// TestWatchEventsDevices: a device's changes reach the streams that ask for them
// (device_events), any caller's, as events with the device's address and no lease; other
// streams never see them.
func TestWatchEventsDevices(t *testing.T) {
	e := newEnv(t)
	open := func(u user, devices bool) grpc.ServerStreamingClient[brokerv1.WatchEventsResponse] {
		s, err := e.client.WatchEvents(u.ctx(t), &brokerv1.WatchEventsRequest{DeviceEvents: devices})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Header(); err != nil {
			t.Fatal(err)
		}
		return s
	}
	adminAll, adminLeases, holderAll := open(root, true), open(root, false), open(holder2, true)
	if _, err := e.client.SuspendDevice(root.ctx(t), &brokerv1.SuspendDeviceRequest{Bdf: bdfB}); err != nil {
		t.Fatal(err)
	}
	l := e.allocate(holder2, oneRange(bdfA, 4, 0, page(1))).GetLease()
	for name, s := range map[string]grpc.ServerStreamingClient[brokerv1.WatchEventsResponse]{"admin": adminAll, "holder2": holderAll} {
		resp, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		ev := resp.GetEvent()
		if ev.GetType() != brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED || ev.GetBdf() != bdfB || ev.GetLease() != nil ||
			ev.GetSeq() != 1 || ev.GetCausedBy() == "" {
			t.Errorf("%s's first event: %v; want DEVICE_CHANGED of %s (seq 1) caused by the admin, no lease", name, ev, bdfB)
		}
		if got := recv(t, s, 1); got[0] != (seen{2, evAllocated, l.GetId(), 1, false}) {
			t.Errorf("%s's second event: %+v", name, got)
		}
	}
	resp, err := adminLeases.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if ev := resp.GetEvent(); ev.GetSeq() != 2 || ev.GetBdf() != bdfA || ev.GetLease().GetId() != l.GetId() {
		t.Errorf("a stream without device_events got %v first; want the allocation (seq 2, bdf %s)", ev, bdfA)
	}
}
