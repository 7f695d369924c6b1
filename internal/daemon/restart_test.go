package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/systemd/systemdtest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// TestRestartKeepsLeases stops a daemon run by a (fake) systemd with the fd store on and
// starts it again: leases, tokens and event numbers carry over, and no device cycled.
func TestRestartKeepsLeases(t *testing.T) {
	const bdf = "0000:00:03.0"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sdm := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 64})
	dev := brokertest.NewDevice(bdf)
	devices := fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid())
	d1 := daemontest.StartWith(t, daemontest.Options{Systemd: sdm}, devices, dev)
	c1, err := client.Dial(d1.Control, client.WithClaimSocket(d1.Claim))
	if err != nil {
		t.Fatal(err)
	}
	held, err := c1.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer held.File.Close()
	pending, err := c1.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: 0, Ranges: []*brokerv1.Range{{Offset: 4096, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	c1.Close()
	if err := d1.Stop(); err != nil {
		t.Fatal(err)
	}

	d2 := daemontest.StartWith(t, daemontest.Options{Systemd: sdm, Dir: d1.Dir}, devices, dev)
	c2, err := client.Dial(d2.Control, client.WithClaimSocket(d2.Claim))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	got, err := c2.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: held.ID})
	if err != nil {
		t.Fatalf("GetLease after restart: %v", err)
	}
	if l := got.GetLease(); l.GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || l.GetGeneration() != 1 {
		t.Errorf("claimed lease after restart: state %v generation %d, want ACTIVE generation 1", l.GetState(), l.GetGeneration())
	}
	// The token handed out before the restart still claims the same dma-buf.
	f, info, err := c2.Claim(ctx, pending.GetLease().GetId(), pending.GetClaimToken())
	if err != nil {
		t.Fatalf("claim with a token from before the restart: %v", err)
	}
	f.Close()
	if info.Inode != pending.GetLease().GetInode() || info.Generation != 1 {
		t.Errorf("claimed inode %d generation %d after restart, want %d and 1", info.Inode, info.Generation, pending.GetLease().GetInode())
	}
	// Event numbering continues: a cursor from before the restart replays what followed.
	var types []brokerv1.EventType
	var seqs []uint64
	for ev, err := range c2.Watch(ctx, 1) {
		if err != nil {
			t.Fatal(err)
		}
		types, seqs = append(types, ev.GetType()), append(seqs, ev.GetSeq())
		if len(seqs) == 3 {
			break
		}
	}
	if seqs[0] != 2 || seqs[2] != 4 || types[2] != brokerv1.EventType_EVENT_TYPE_CLAIMED {
		t.Errorf("events after cursor 1: seqs %v types %v; want 2..4 ending with the claim after the restart", seqs, types)
	}
	if err := d2.Stop(); err != nil {
		t.Fatal(err)
	}
	dev.Locked(func(d *brokertest.Device) {
		if d.Revokes != 0 {
			t.Errorf("the restart cycled the device %d times", d.Revokes)
		}
	})
}

// restartable is a daemon under a fake systemd with the fd store on (so it can restart
// keeping its leases) on one fake device, and a client of it.
type restartable struct {
	bdf    string
	sdm    *systemdtest.Manager
	dev    *brokertest.Device
	config string // the daemon's [[device]] configuration, prefixed by the test's
	d      *daemontest.Daemon
	c      *client.Client
}

func startRestartable(t *testing.T, prefix string) *restartable {
	t.Helper()
	r := &restartable{bdf: "0000:00:03.0", sdm: systemdtest.Start(t, systemdtest.Options{FDStoreMax: 64})}
	r.dev = brokertest.NewDevice(r.bdf)
	r.config = prefix + fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", r.bdf, os.Getuid())
	r.d = daemontest.StartWith(t, daemontest.Options{Systemd: r.sdm}, r.config, r.dev)
	c, err := client.Dial(r.d.Control, client.WithClaimSocket(r.d.Claim))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r.c = c
	return r
}

// restart stops the daemon and starts it again on the same directory and fd store.
func (r *restartable) restart(t *testing.T) {
	t.Helper()
	if err := r.d.Stop(); err != nil {
		t.Fatal(err)
	}
	r.d = daemontest.StartWith(t, daemontest.Options{Systemd: r.sdm, Dir: r.d.Dir}, r.config, r.dev)
}

// TestDrainingStopReachesWatchers stops a daemon that drains (on_stop = "drain", and
// always without the fd store): every lease ends, and watchers get those events before
// their stream ends.
func TestDrainingStopReachesWatchers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := startRestartable(t, "on_stop = \"drain\"\n")
	bdf, d, c, dev := r.bdf, r.d, r.c, r.dev
	l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	stream, err := c.API().WatchEvents(ctx, &brokerv1.WatchEventsRequest{AfterSeq: 1})
	if err != nil {
		t.Fatal(err)
	}
	// The cursor replays the claim: the subscription exists once that arrives.
	if ev, err := stream.Recv(); err != nil || ev.GetEvent().GetType() != brokerv1.EventType_EVENT_TYPE_CLAIMED {
		t.Fatalf("replayed event: %v, %v", ev, err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- d.Stop() }()
	ev, err := stream.Recv()
	if err != nil {
		t.Fatalf("stream ended without the stop's event: %v", err)
	}
	if ev.GetEvent().GetLease().GetId() != l.ID || ev.GetEvent().GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_BROKER_SHUTDOWN {
		t.Errorf("event at a draining stop: %v", ev)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	if kept := dev.Kept(); len(kept) != 0 {
		t.Errorf("a draining stop left dma-bufs kept: %v", kept)
	}
}

// TestClientResumesAcrossRestart: a Watch and a held lease follow the daemon across a
// restart by themselves: the Watch sees every event once, in order, and the hold claims
// a reissue that happens after the restart.
func TestClientResumesAcrossRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := startRestartable(t, "")
	bdf, c := r.bdf, r.c
	reissued := make(chan client.ClaimInfo, 1)
	h, err := c.AllocateAndHold(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}},
		client.HoldOptions{OnReissue: func(_ *os.File, info client.ClaimInfo) { reissued <- info }})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	seqs := make(chan uint64, 64)
	wctx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan error, 1)
	go func() {
		for e, err := range c.Watch(wctx, 2) { // after the held lease's allocated and claimed
			if err != nil {
				watchDone <- err
				return
			}
			seqs <- e.GetSeq()
		}
		watchDone <- nil
	}()
	other, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 4096, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.File.Close()
	// The other lease's allocated and claimed reach the watcher before the stop: its
	// subscription is in place (a first subscription to a stopped daemon fails at once),
	// and it resumes after the last one it saw.
	var got []uint64
	for len(got) < 2 {
		select {
		case s := <-seqs:
			got = append(got, s)
		case err := <-watchDone:
			t.Fatalf("watch ended before the restart: %v", err)
		case <-ctx.Done():
			t.Fatalf("watch saw %v before the restart, want 2 events", got)
		}
	}

	r.restart(t)
	// After the restart: revoking the other lease cycles the device and reissues the held
	// one; the hold, on its resumed stream, claims the new generation.
	// (The test daemon listens itself, so its socket is gone for a moment; under systemd
	// the socket unit keeps it. Unary calls fail fast unless they wait for the daemon.)
	if _, err := c.API().RevokeLease(ctx, &brokerv1.RevokeLeaseRequest{LeaseId: other.ID}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	select {
	case info := <-reissued:
		if info.Generation != 2 || info.LeaseID != h.ID {
			t.Errorf("hold claimed %+v, want generation 2 of %s", info, h.ID)
		}
	case <-ctx.Done():
		t.Fatalf("the hold did not claim the reissue after the restart: %v", h.Err())
	}
	// The watcher saw every event exactly once, in order, across the restart:
	// allocated+claimed (other), then revoked (other) and reissued + claimed (held).
	for len(got) < 5 {
		select {
		case s := <-seqs:
			got = append(got, s)
		case err := <-watchDone:
			t.Fatalf("watch ended after %v: %v", got, err)
		case <-ctx.Done():
			t.Fatalf("watch saw %v, want 5 events", got)
		}
	}
	if !slices.Equal(got, []uint64{3, 4, 5, 6, 7}) {
		t.Errorf("watch across the restart saw seqs %v, want 3..7 once each", got)
	}
	stopWatch()
	if err := <-watchDone; err != nil {
		t.Errorf("watch ended with %v", err)
	}
}

// TestDeviceEventsAcrossRestart: device events are journaled like lease events — a
// restarted daemon replays them and numbers after them — and a client's device-event
// stream resumes across the restart still asking for them.
func TestDeviceEventsAcrossRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := startRestartable(t, "")
	bdf, c := r.bdf, r.c
	type ev struct {
		seq  uint64
		typ  brokerv1.EventType
		bdf  string
		more bool // has a lease
	}
	// Seq 1, before the stream: a cursor after it leaves the stream no race to miss what
	// follows.
	if _, err := c.API().SuspendDevice(ctx, &brokerv1.SuspendDeviceRequest{Bdf: bdf}); err != nil {
		t.Fatal(err)
	}
	events := make(chan ev, 16)
	subscribed := make(chan uint64, 4) // WithSubscribed: at the start and after the restart
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		for e, err := range c.Watch(wctx, 1, client.WithDeviceEvents(), client.WithSubscribed(func(last uint64) { subscribed <- last })) {
			if err != nil {
				t.Errorf("watch: %v", err)
				return
			}
			events <- ev{e.GetSeq(), e.GetType(), e.GetBdf(), e.GetLease() != nil}
		}
	}()
	changed := brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED
	want := func(w ev) {
		t.Helper()
		select {
		case got := <-events:
			if got != w {
				t.Errorf("event %+v, want %+v", got, w)
			}
		case <-ctx.Done():
			t.Fatalf("no event, want %+v", w)
		}
	}
	subscribedAfter := func(min uint64) {
		t.Helper()
		select {
		case last := <-subscribed:
			if last < min {
				t.Errorf("subscribed after seq %d, want at least %d", last, min)
			}
		case <-ctx.Done():
			t.Fatalf("no subscription (WithSubscribed) after seq %d", min)
		}
	}
	subscribedAfter(1) // the daemon's last event before the subscription: the suspend
	if _, err := c.API().ResumeDevice(ctx, &brokerv1.ResumeDeviceRequest{Bdf: bdf}); err != nil {
		t.Fatal(err)
	}
	want(ev{2, changed, bdf, false})

	r.restart(t)
	// The resumed stream still asks for device events; numbering continues after them.
	if _, err := c.API().SuspendDevice(ctx, &brokerv1.SuspendDeviceRequest{Bdf: bdf}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	want(ev{3, changed, bdf, false})
	subscribedAfter(2) // the resumed stream subscribed again (before or after seq 3)
	// A new stream replays the journaled device event of the first run. (Watch ends
	// without an error when its context is done: no event at all must fail too.)
	rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
	defer rcancel()
	replayed := false
	for e, err := range c.Watch(rctx, 1, client.WithDeviceEvents()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.GetSeq() != 2 || e.GetType() != changed || e.GetBdf() != bdf || e.GetLease() != nil {
			t.Errorf("replayed after seq 1: %v; want the resume's DEVICE_CHANGED (seq 2)", e)
		}
		replayed = true
		break
	}
	if !replayed {
		t.Error("a stream after seq 1 replayed nothing; want the first run's DEVICE_CHANGED (seq 2)")
	}
}

// TestFreshJournalDropsKeptFds: fds in the store with no journal to account for them (it
// was lost) are dropped at start: their dma-bufs must not outlive it unaccounted.
func TestFreshJournalDropsKeptFds(t *testing.T) {
	sdm := systemdtest.Start(t, systemdtest.Options{FDStoreMax: 64})
	prev, err := sdm.Client()
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := prev.StoreFD("vfio-device.0000_00_09.0", w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if err := prev.Barrier(t.Context()); err != nil { // the store has it before the next start
		t.Fatal(err)
	}
	// A configured device would take its kept fd back unless the daemon dropped it first.
	const bdf = "0000:00:09.0"
	var taken *os.File
	opener := func(k vfio.Keeper) broker.Opener {
		return func(string) (broker.Device, error) {
			if k != nil {
				taken = k.Take(vfio.KeepName(bdf))
			}
			return brokertest.NewDevice(bdf), nil
		}
	}
	daemontest.StartWith(t, daemontest.Options{Systemd: sdm, Opener: opener}, fmt.Sprintf("[[device]]\naddress = %q\n", bdf))
	if taken != nil {
		taken.Close()
		t.Error("the device took back a kept fd that no journal accounts for")
	}
	if got := sdm.Stored(); len(got) != 0 {
		t.Errorf("fd store after a start with an empty journal: %v, want empty", got)
	}
	// The kept copy was the last write end of the pipe: EOF proves it was closed.
	buf := make([]byte, 1)
	r.SetReadDeadline(time.Now().Add(10 * time.Second)) // a bound, not a timing assertion
	if n, err := r.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("read = %d, %v; want EOF (the kept fd closed)", n, err)
	}
}

// TestFDBudget: the daemon refuses to start when its limits could exhaust RLIMIT_NOFILE
// (a device reopen must never fail with EMFILE), naming what needs the fds.
func TestFDBudget(t *testing.T) {
	cfg, res := resolve(t, "[limits]\nmax_leases = 100\n")
	err := daemon.Run(context.Background(), daemon.Options{Config: cfg, Resolved: res, FDLimit: 1024,
		Opener: func(vfio.Keeper) broker.Opener { return brokertest.Opener() }})
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "RLIMIT_NOFILE is 1024") ||
		!strings.Contains(err.Error(), "for 100 leases") {
		t.Fatalf("Run with RLIMIT_NOFILE 1024 = %v, want a refusal naming the budget", err)
	}
	if err := runOnceWithLimit(t, "[limits]\nmax_leases = 100\n", 4096); err != nil {
		t.Errorf("Run with RLIMIT_NOFILE 4096: %v", err)
	}
}

func runOnceWithLimit(t *testing.T, text string, limit uint64) error {
	t.Helper()
	dir := testutil.ShortTempDir(t)
	cfg, res := resolve(t, fmt.Sprintf("[daemon]\ncontrol_socket = %q\nclaim_socket = %q\n%s", dir+"/c.sock", dir+"/f.sock", text))
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // a start-up error returns at once; a successful start stops at once
	return daemon.Run(ctx, daemon.Options{Config: cfg, Resolved: res, FDLimit: limit,
		Opener: func(vfio.Keeper) broker.Opener { return brokertest.Opener() }, Notify: func(string) error { return nil }})
}
