package broker_test

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"golang.org/x/sys/unix"
	"pgregory.net/rapid"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// modelLease is what the model knows of a lease.
type modelLease struct {
	id      string
	bdf     string
	uid     uint32
	proc    *brokertest.Process
	created time.Time
	live    bool
	claimed bool // current generation claimed
	gen     uint64
	token   string // current unclaimed token
	ttl     time.Duration
	expires time.Time
	// delivered are the buffers whose fds left the broker; they must all be dead once the
	// lease ends for any reason but a voluntary release.
	delivered []*brokertest.Buffer
	reason    broker.Reason
}

type model struct {
	t       *rapid.T
	b       *broker.Broker
	sub     *broker.Subscription
	devs    map[string]*brokertest.Device
	leases  []*modelLease
	byID    map[string]*modelLease
	procs   []*brokertest.Process
	timeout time.Duration
	cfg     broker.Config
	nextPID int32
}

var modelBDFs = []string{dev0, dev1}

func (m *model) start() {
	var all []*brokertest.Device
	for _, bdf := range modelBDFs {
		all = append(all, m.devs[bdf])
	}
	b, err := broker.New(m.cfg, brokertest.Opener(all...), nil)
	if err != nil {
		m.t.Fatal(err)
	}
	m.b = b
	if m.sub, err = b.Subscribe(0); err != nil {
		m.t.Fatal(err)
	}
}

// drain applies the events so far: tokens of reissued leases, ends the model did not
// cause directly (holder exit, expiry, device loss).
func (m *model) drain() {
	for {
		select {
		case e, ok := <-m.sub.Events():
			if !ok {
				m.t.Fatalf("event subscription ended: %v", m.sub.Err())
			}
			if e.Type == broker.EventDeviceChanged { // about a device: no lease to apply it to
				if e.Lease.ID != "" || e.Lease.BDF == "" {
					m.t.Fatalf("device event %+v names a lease or no device", e)
				}
				continue
			}
			ml := m.byID[e.Lease.ID]
			if ml == nil {
				m.t.Fatalf("event %s for lease %s the model never granted", e.Type, e.Lease.ID)
			}
			switch e.Type {
			case broker.EventReissued:
				if !ml.live {
					m.t.Fatalf("ended lease %s reissued", ml.id)
				}
				ml.gen, ml.token, ml.claimed = e.Lease.Generation, e.Token, false
			}
			if !e.Lease.Live() && ml.live {
				ml.live, ml.reason = false, e.Lease.EndReason
			}
		default:
			return
		}
	}
}

func (m *model) pick(t *rapid.T, live bool) *modelLease {
	var c []*modelLease
	for _, l := range m.leases {
		if !live || l.live {
			c = append(c, l)
		}
	}
	if len(c) == 0 {
		t.Skip("no lease")
	}
	return rapid.SampledFrom(c).Draw(t, "lease")
}

func (m *model) settle() {
	synctest.Wait()
	m.drain()
}

func (m *model) check(t *rapid.T) {
	m.settle()
	live := 0
	for _, ml := range m.leases {
		got, err := m.b.Get(ml.id)
		if err != nil {
			t.Fatalf("granted lease %s is not accounted for: %v", ml.id, err)
		}
		if got.Live() != ml.live {
			t.Fatalf("lease %s: broker live=%v (%s %s), model live=%v", ml.id, got.Live(), got.State, got.EndReason, ml.live)
		}
		if ml.live {
			live++
			if got.Generation != ml.gen {
				t.Fatalf("lease %s generation %d, model %d", ml.id, got.Generation, ml.gen)
			}
			continue
		}
		if ml.reason != broker.ReasonReleased && ml.reason != broker.ReasonClaimExpired && ml.reason != broker.ReasonShutdown {
			for _, buf := range ml.delivered {
				if !buf.Revoked() {
					t.Fatalf("lease %s ended (%s) but a delivered dma-buf is still alive", ml.id, ml.reason)
				}
			}
		}
	}
	if n := len(m.b.List(broker.Filter{Live: true})); n != live {
		t.Fatalf("broker has %d live leases, model %d", n, live)
	}
	open := 0
	for _, d := range m.devs {
		for _, buf := range d.OpenBuffers() {
			open++
			if buf.Revoked() {
				t.Fatalf("the broker holds a dead buffer %s", buf.Name)
			}
		}
	}
	if open != live {
		t.Fatalf("the broker holds %d buffers for %d live leases", open, live)
	}
}

func (m *model) allocate(t *rapid.T) {
	bdf := rapid.SampledFrom(modelBDFs).Draw(t, "bdf")
	page0 := rapid.Uint64Range(0, 15).Draw(t, "page")
	pages := rapid.Uint64Range(1, 4).Draw(t, "pages")
	var proc *brokertest.Process
	if len(m.procs) > 0 && rapid.Bool().Draw(t, "existing process") {
		proc = rapid.SampledFrom(m.procs).Draw(t, "process")
	} else {
		m.nextPID++
		proc = &brokertest.Process{Pid: m.nextPID}
		m.procs = append(m.procs, proc)
	}
	uid := uint32(1000 + proc.Pid%2)
	var ttl time.Duration
	if rapid.Bool().Draw(t, "with ttl") {
		ttl = time.Duration(rapid.IntRange(1, 120).Draw(t, "ttl seconds")) * time.Second
	}
	before := m.b.List(broker.Filter{})
	l, tok, err := m.b.Allocate(broker.AllocateRequest{
		BDF: bdf, BAR: 0, Ranges: []broker.Range{{Offset: page0 * page, Length: pages * page}},
		Holder: broker.Holder{UID: uid, GID: 500, PID: proc.Pid, Proc: nopClose{proc}}, TTL: ttl,
	})
	if err != nil {
		if !proc.Alive() {
			return
		}
		if !errors.Is(err, errdefs.ErrFailedPrecondition) && !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("allocate: unexpected error %v", err)
		}
		if len(m.b.List(broker.Filter{})) != len(before) {
			t.Fatalf("a rejected allocation changed the leases")
		}
		return
	}
	ml := &modelLease{id: l.ID, bdf: bdf, uid: uid, proc: proc, created: time.Now(), live: true, gen: 1, token: tok, ttl: ttl}
	if ttl > 0 {
		ml.expires = time.Now().Add(ttl)
	}
	m.leases = append(m.leases, ml)
	m.byID[l.ID] = ml
}

func (m *model) claim(t *rapid.T) {
	ml := m.pick(t, false)
	m.drain()
	token := ml.token
	if token == "" || rapid.Bool().Draw(t, "bad token") {
		token = fmt.Sprintf("%032x", rapid.Uint64().Draw(t, "garbage"))
	}
	l, f, err := m.b.Claim(ml.id, token, broker.Peer{UID: ml.uid, PID: ml.proc.Pid})
	if err != nil {
		if f != nil {
			t.Fatal("a failed claim returned an fd")
		}
		if ml.live && token == ml.token && ml.proc.Alive() && !ml.claimed {
			t.Fatalf("claim with the right token from the holder failed: %v", err)
		}
		return
	}
	defer f.Close()
	if !ml.live {
		t.Fatalf("claim of ended lease %s (%s) delivered an fd", ml.id, ml.reason)
	}
	if token != ml.token || ml.claimed {
		t.Fatalf("claim with a wrong or used token succeeded")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Ino != l.Inode {
		t.Fatalf("claimed fd inode %d, lease inode %d (%v)", st.Ino, l.Inode, err)
	}
	for _, buf := range m.devs[ml.bdf].OpenBuffers() {
		if buf.Inode() == l.Inode {
			ml.delivered = append(ml.delivered, buf)
		}
	}
	ml.claimed, ml.token = true, ""
}

func (m *model) revoke(t *rapid.T) {
	ml := m.pick(t, false)
	m.drain()
	wasLive := ml.live
	_, err := m.b.Revoke(ml.id, admin, 0)
	m.drain()
	switch {
	case wasLive && (err != nil || ml.live):
		t.Fatalf("revoke of live lease %s: %v (model live %v)", ml.id, err, ml.live)
	case !wasLive && err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition):
		// An ended lease is either dead already (FailedPrecondition) or, if its fd may
		// still work, the revoke cycles its device (nil).
		t.Fatalf("revoke of ended lease %s: %v", ml.id, err)
	}
	for _, buf := range ml.delivered {
		if (wasLive || err == nil) && !buf.Revoked() {
			t.Fatalf("revoke of %s returned with a delivered dma-buf alive", ml.id)
		}
	}
}

func (m *model) release(t *rapid.T) {
	ml := m.pick(t, false)
	m.drain()
	wasLive := ml.live
	_, err := m.b.Release(ml.id, broker.Actor{UID: ml.uid})
	m.drain()
	switch {
	case wasLive && (err != nil || ml.live || ml.reason != broker.ReasonReleased):
		t.Fatalf("release of live lease %s: %v (model: live %v, reason %s)", ml.id, err, ml.live, ml.reason)
	case !wasLive && !errors.Is(err, errdefs.ErrFailedPrecondition):
		t.Fatalf("release of ended lease %s: %v", ml.id, err)
	}
}

func (m *model) exit(t *rapid.T) {
	if len(m.procs) == 0 {
		t.Skip("no process")
	}
	p := rapid.SampledFrom(m.procs).Draw(t, "process")
	p.Exit()
	m.settle()
	for _, ml := range m.leases {
		if ml.proc == p && ml.live {
			t.Fatalf("lease %s of exited pid %d is still live", ml.id, p.Pid)
		}
	}
}

func (m *model) loseDevice(t *rapid.T) {
	bdf := rapid.SampledFrom(modelBDFs).Draw(t, "bdf")
	if !m.devs[bdf].Notify(broker.NoticeRelease) {
		return // not open: lost already
	}
	m.settle()
	for _, ml := range m.leases {
		if ml.bdf == bdf && ml.live {
			t.Fatalf("lease %s survived the loss of %s", ml.id, bdf)
		}
	}
}

func (m *model) wait(t *rapid.T) {
	d := time.Duration(rapid.IntRange(1, 60).Draw(t, "seconds")) * time.Second
	time.Sleep(d)
	m.settle()
	now := time.Now()
	for _, ml := range m.leases {
		if !ml.live {
			continue
		}
		if ml.gen == 1 && !ml.claimed && !now.Before(ml.created.Add(m.timeout)) {
			t.Fatalf("unclaimed lease %s outlived its claim deadline", ml.id)
		}
		if ml.ttl > 0 && !now.Before(ml.expires) {
			t.Fatalf("lease %s outlived its ttl", ml.id)
		}
	}
}

func (m *model) restart(t *rapid.T) {
	m.settle()
	if err := m.b.Close(); err != nil {
		t.Fatal(err)
	}
	synctest.Wait()
	for e := range m.sub.Events() { // the shutdown's releases, then the end
		if ml := m.byID[e.Lease.ID]; ml != nil && !e.Lease.Live() {
			ml.live, ml.reason = false, e.Lease.EndReason
		}
	}
	for _, ml := range m.leases {
		if ml.live {
			t.Fatalf("lease %s survived the broker's shutdown unaccounted", ml.id)
		}
	}
	// The model's leases were the old broker's: all ended. Start afresh.
	m.leases, m.byID = nil, map[string]*modelLease{}
	m.start()
}

// nopClose keeps a fake process usable by several leases: the broker closes the handle
// it owns when a lease ends, which must not wake other leases' waiters.
type nopClose struct{ *brokertest.Process }

func (nopClose) Close() error { return nil }

// TestLeaseModel drives the broker with random sequences of allocate, claim, revoke,
// release, holder exit, device loss, time passing (claim and TTL expiry) and restart,
// checking it against a simple model: no lease is live after its end, no fd is delivered
// for an ended lease, every delivered fd of a lease ended by the broker is dead, the broker
// holds exactly one live buffer per live lease, and every granted lease is accounted for.
func TestLeaseModel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// rapid asks a *testing.T for its deadline, which panics inside a bubble: hand it
		// the test through an interface.
		rapid.Check(struct{ rapid.TB }{t}, func(rt *rapid.T) {
			m := &model{
				t:       rt,
				devs:    map[string]*brokertest.Device{},
				byID:    map[string]*modelLease{},
				timeout: 30 * time.Second,
				nextPID: 100,
			}
			m.cfg = broker.Config{
				Devices: []broker.DeviceConfig{
					{BDF: dev0, UIDs: []uint32{1000, 1001}},
					{BDF: dev1, GIDs: []uint32{500}},
				},
				ClaimTimeout: m.timeout,
				Limits:       broker.Limits{MaxLeasesPerHolder: 6, MaxLeases: 10},
			}
			for _, bdf := range modelBDFs {
				m.devs[bdf] = brokertest.NewDevice(bdf)
			}
			m.start()
			defer func() {
				m.b.Close()
				m.sub.Close()
				synctest.Wait()
			}()
			rt.Repeat(map[string]func(*rapid.T){
				"allocate":    m.allocate,
				"claim":       m.claim,
				"revoke":      m.revoke,
				"release":     m.release,
				"exit":        m.exit,
				"lose-device": m.loseDevice,
				"wait":        m.wait,
				"restart":     m.restart,
				"":            m.check,
			})
		})
	})
	if n := openMemfds(t); n != 0 {
		t.Errorf("%d fake dma-buf fds left open", n)
	}
}

func openMemfds(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.HasPrefix(l, "/memfd:mmb-") {
			n++
		}
	}
	return n
}
