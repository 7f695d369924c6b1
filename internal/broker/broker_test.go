package broker_test

import (
	"errors"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	dev0 = "0000:00:03.0"
	dev1 = "0000:00:04.0"
	page = 4096
)

var admin = broker.Actor{UID: 0, PID: 1, Admin: true}

type rig struct {
	b    *broker.Broker
	devs map[string]*brokertest.Device
}

func newRig(t *testing.T, mutate func(*broker.Config)) *rig {
	t.Helper()
	testutil.FDLeakCheck(t)
	cfg := broker.Config{
		Devices: []broker.DeviceConfig{
			{BDF: dev0, UIDs: []uint32{1000, 1001}, Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}},
			{BDF: dev1, GIDs: []uint32{500}},
		},
	}
	if mutate != nil {
		mutate(&cfg)
	}
	r := &rig{devs: map[string]*brokertest.Device{}}
	var all []*brokertest.Device
	for _, bdf := range []string{dev0, dev1} { // other configured devices fail to open
		fd := brokertest.NewDevice(bdf)
		r.devs[bdf] = fd
		all = append(all, fd)
	}
	b, err := broker.New(cfg, brokertest.Opener(all...), nil)
	if err != nil {
		t.Fatal(err)
	}
	r.b = b
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		for bdf, d := range r.devs {
			if n := len(d.OpenBuffers()); n != 0 {
				t.Errorf("device %s: %d buffers still open after Close", bdf, n)
			}
		}
	})
	return r
}

func holder(uid uint32, pid int32) broker.Holder {
	return broker.Holder{UID: uid, GID: uid, PID: pid, Proc: &brokertest.Process{Pid: pid}}
}

func req(bdf string, bar int, uid uint32, pid int32, ranges ...broker.Range) broker.AllocateRequest {
	return broker.AllocateRequest{BDF: bdf, BAR: bar, Ranges: ranges, Holder: holder(uid, pid)}
}

func (r *rig) allocate(t *testing.T, rq broker.AllocateRequest) (broker.Lease, string) {
	t.Helper()
	l, tok, err := r.b.Allocate(rq)
	if err != nil {
		t.Fatalf("Allocate(%+v): %v", rq, err)
	}
	return l, tok
}

func (r *rig) claim(t *testing.T, l broker.Lease, tok string) *os.File {
	t.Helper()
	_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: l.Holder.UID, PID: l.Holder.PID})
	if err != nil {
		t.Fatalf("Claim(%s): %v", l.ID, err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestAllocateClaim(t *testing.T) {
	r := newRig(t, nil)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 42, broker.Range{Offset: 0, Length: 2 * page}, broker.Range{Offset: 8 * page, Length: page}))
	if l.State != broker.StateAllocated || l.Generation != 1 || l.Size != 3*page || l.Kind != broker.KindShared {
		t.Fatalf("new lease = %+v", l)
	}
	if len(tok) != 32 {
		t.Fatalf("token %q: want 128 bits as 32 hex digits", tok)
	}
	bufs := r.devs[dev0].OpenBuffers()
	if len(bufs) != 1 || bufs[0].Name != "mmb-"+l.ID || len(bufs[0].Name) > 31 {
		t.Fatalf("exported buffers = %+v, want one named mmb-%s (<= 31 bytes)", bufs, l.ID)
	}
	f := r.claim(t, l, tok)
	if got := inode(t, f); got != l.Inode {
		t.Fatalf("claimed fd inode %d, lease inode %d", got, l.Inode)
	}
	got, err := r.b.Get(l.ID)
	if err != nil || got.State != broker.StateActive || got.Claimed.IsZero() {
		t.Fatalf("Get after claim = %+v, %v", got, err)
	}
	// single use
	if _, _, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 42}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("second claim: %v, want permission denied", err)
	}
}

func TestClaimIdentity(t *testing.T) {
	r := newRig(t, nil)
	rq := req(dev0, 0, 1000, 42, broker.Range{Length: page})
	proc := rq.Holder.Proc.(*brokertest.Process)
	l, tok := r.allocate(t, rq)
	for _, tc := range []struct {
		name string
		id   string
		tok  string
		peer broker.Peer
		want error
	}{
		{"unknown lease", "nope", tok, broker.Peer{UID: 1000, PID: 42}, errdefs.ErrNotFound},
		{"wrong token", l.ID, strings.Repeat("0", 32), broker.Peer{UID: 1000, PID: 42}, errdefs.ErrPermissionDenied},
		{"other pid", l.ID, tok, broker.Peer{UID: 1000, PID: 43}, errdefs.ErrPermissionDenied},
		{"other uid", l.ID, tok, broker.Peer{UID: 1001, PID: 42}, errdefs.ErrPermissionDenied},
	} {
		if _, f, err := r.b.Claim(tc.id, tc.tok, tc.peer); !errors.Is(err, tc.want) || f != nil {
			t.Errorf("%s: Claim = %v, %v; want %v", tc.name, f, err, tc.want)
		}
	}
	// the allocating process died and its pid was reused: the pinned pidfd says so (or,
	// if the holder watch was quicker, the lease has already ended holder_exited)
	proc.Exit()
	_, _, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 42})
	if !errors.Is(err, errdefs.ErrPermissionDenied) && !(errors.Is(err, errdefs.ErrFailedPrecondition) && strings.Contains(err.Error(), "holder_exited")) {
		t.Fatalf("claim after holder exit: %v, want permission denied (or the lease ended holder_exited)", err)
	}
}

func TestAllocateRejects(t *testing.T) {
	r := newRig(t, func(c *broker.Config) {
		c.Devices = append(c.Devices, broker.DeviceConfig{BDF: "0000:00:09.0", UIDs: []uint32{1000}})
		c.Limits.MaxRangesPerLease = 4
	})
	rg := func(off, n uint64) broker.Range { return broker.Range{Offset: off, Length: n} }
	priv := func(rq broker.AllocateRequest) broker.AllocateRequest { rq.Kind = broker.KindPrivate; return rq }
	for _, tc := range []struct {
		name string
		rq   broker.AllocateRequest
		want error
		msg  string
	}{
		{"unknown device", req("0000:00:1f.0", 0, 1000, 1, rg(0, page)), errdefs.ErrNotFound, "not configured"},
		{"device that fails to open", req("0000:00:09.0", 0, 1000, 1, rg(0, page)), errdefs.ErrFailedPrecondition, "no such fake device"},
		{"uid not allowed", req(dev0, 0, 2000, 1, rg(0, page)), errdefs.ErrPermissionDenied, "uid 2000"},
		{"bar 6", req(dev0, 6, 1000, 1, rg(0, page)), errdefs.ErrInvalidArgument, "bar 6"},
		{"negative bar", req(dev0, -1, 1000, 1, rg(0, page)), errdefs.ErrInvalidArgument, "bar -1"},
		{"unimplemented bar", req(dev0, 3, 1000, 1, rg(0, page)), errdefs.ErrInvalidArgument, "bar 3 is not implemented"},
		{"io bar", req(dev0, 2, 1000, 1, rg(0, page)), errdefs.ErrInvalidArgument, "I/O port"},
		{"no ranges", req(dev0, 0, 1000, 1), errdefs.ErrInvalidArgument, "no ranges"},
		{"too many ranges", req(dev0, 0, 1000, 1, rg(0, page), rg(page, page), rg(2*page, page), rg(3*page, page), rg(4*page, page)), errdefs.ErrInvalidArgument, "5 ranges, at most 4"},
		{"empty range", req(dev0, 0, 1000, 1, rg(0, 0)), errdefs.ErrInvalidArgument, "is empty"},
		{"unaligned offset", req(dev0, 0, 1000, 1, rg(100, page)), errdefs.ErrInvalidArgument, "not aligned"},
		{"unaligned length", req(dev0, 0, 1000, 1, rg(0, 100)), errdefs.ErrInvalidArgument, "not aligned"},
		{"beyond bar", req(dev0, 0, 1000, 1, rg(1<<20-page, 2*page)), errdefs.ErrInvalidArgument, "ends beyond the bar (size 0x100000)"},
		{"overflowing range", req(dev0, 0, 1000, 1, rg(^uint64(0)-page+1, 2*page)), errdefs.ErrInvalidArgument, "ends beyond"},
		{"bar smaller than a page", req(dev0, 1, 1000, 1, rg(0, page)), errdefs.ErrInvalidArgument, "ends beyond the bar (size 0x100)"},
		{"overlap within lease", req(dev0, 0, 1000, 1, rg(0, 2*page), rg(page, page)), errdefs.ErrInvalidArgument, "overlap"},
		{"private not allowed by policy", priv(req(dev1, 0, 500, 1, rg(0, page))), errdefs.ErrPermissionDenied, "private leases are not allowed"},
		{"private on a device not TSM-bound", priv(req(dev0, 0, 1000, 1, rg(0, page))), errdefs.ErrFailedPrecondition, "tsm/bound"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proc := tc.rq.Holder.Proc.(*brokertest.Process)
			before := r.b.List(broker.Filter{})
			l, tok, err := r.b.Allocate(tc.rq)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Allocate = %+v, %q, %v; want %v containing %q", l, tok, err, tc.want, tc.msg)
			}
			if !strings.Contains(err.Error(), tc.rq.BDF) {
				t.Errorf("error %q does not name the device", err)
			}
			if diff := cmp.Diff(before, r.b.List(broker.Filter{})); diff != "" {
				t.Errorf("leases changed on a rejected request (-before +after):\n%s", diff)
			}
			if n := len(r.devs[dev0].OpenBuffers()) + len(r.devs[dev1].OpenBuffers()); n != 0 {
				t.Errorf("%d buffers exported by a rejected request", n)
			}
			if !proc.Closed() {
				t.Errorf("holder process handle not closed after a rejected request")
			}
		})
	}
}

func TestExportFailureChangesNothing(t *testing.T) {
	r := newRig(t, nil)
	r.devs[dev0].ExportErr = unix.ENODEV
	_, _, err := r.b.Allocate(req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	if !errors.Is(err, unix.ENODEV) || !strings.Contains(err.Error(), dev0) {
		t.Fatalf("Allocate with failing export: %v, want ENODEV naming %s", err, dev0)
	}
	if got := r.b.List(broker.Filter{}); len(got) != 0 {
		t.Fatalf("leases after failed export: %+v", got)
	}
}

func TestOverlapRules(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.Devices[0].AllowUnattestedPrivate = true })
	rg := broker.Range{Offset: 0, Length: 4 * page}
	r.allocate(t, req(dev0, 0, 1000, 1, rg))
	// same uid: shared overlap allowed
	r.allocate(t, req(dev0, 0, 1000, 2, broker.Range{Offset: page, Length: page}))
	// another uid: shared overlap refused
	if _, _, err := r.b.Allocate(req(dev0, 0, 1001, 3, broker.Range{Offset: 2 * page, Length: page})); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("shared overlap by another uid: %v", err)
	}
	// another uid, disjoint: fine; another BAR, same offsets: fine
	r.allocate(t, req(dev0, 0, 1001, 3, broker.Range{Offset: 4 * page, Length: page}))
	r.allocate(t, req(dev0, 4, 1001, 3, rg))
	// private overlapping anything: refused, even for the same uid
	p := req(dev0, 0, 1000, 1, broker.Range{Offset: 3 * page, Length: page})
	p.Kind = broker.KindPrivate
	if _, _, err := r.b.Allocate(p); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "exclusive") {
		t.Fatalf("private overlap: %v", err)
	}
	// private disjoint: granted, marked unattested (device not TSM-bound)
	p = req(dev0, 0, 1000, 1, broker.Range{Offset: 8 * page, Length: page})
	p.Kind = broker.KindPrivate
	pl, _ := r.allocate(t, p)
	if !pl.Unattested || pl.Kind != broker.KindPrivate {
		t.Fatalf("private lease = %+v, want unattested private", pl)
	}
	// shared overlapping a private lease: refused
	if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 1, broker.Range{Offset: 8 * page, Length: page})); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("shared over private: %v", err)
	}
}

func TestPrivateNeedsTSMBound(t *testing.T) {
	r := newRig(t, nil)
	p := req(dev0, 0, 1000, 1, broker.Range{Length: page})
	p.Kind = broker.KindPrivate
	if _, _, err := r.b.Allocate(p); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("private on unbound device: %v", err)
	}
	r.devs[dev0].SetInfo(func(i *broker.DeviceInfo) { i.TSM = broker.TSMState{Present: true, Connect: "tsm0", Bound: "tsm0"} })
	p.Holder = holder(1000, 1)
	l, _ := r.allocate(t, p)
	if l.Unattested {
		t.Fatalf("lease on a TSM-bound device marked unattested")
	}
}

func TestGroupAccessAndLimits(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.Limits.MaxLeasesPerHolder = 2; c.Limits.MaxLeases = 3 })
	rq := req(dev1, 0, 2000, 1, broker.Range{Length: page})
	if _, _, err := r.b.Allocate(rq); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("uid outside gid 500: %v", err)
	}
	rq = req(dev1, 0, 2000, 1, broker.Range{Length: page})
	rq.Holder.Groups = []uint32{27, 500}
	r.allocate(t, rq)
	rq.Holder = holder(2000, 1)
	rq.Holder.Groups = []uint32{500}
	r.allocate(t, rq)
	rq.Holder = holder(2000, 1)
	rq.Holder.Groups = []uint32{500}
	if _, _, err := r.b.Allocate(rq); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("third lease of uid 2000: %v, want resource exhausted", err)
	}
	r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	if _, _, err := r.b.Allocate(req(dev0, 0, 1001, 1, broker.Range{Offset: page, Length: page})); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("fourth lease of the broker: %v, want resource exhausted", err)
	}
	// admins may lease any configured device
	a := req(dev1, 0, 0, 1, broker.Range{Offset: 8 * page, Length: page})
	a.Admin = true
	if _, _, err := r.b.Allocate(a); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("admin over the global limit: %v", err)
	}
}

func TestRevokeReissues(t *testing.T) {
	r := newRig(t, nil)
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	victim, vtok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, victim, vtok)
	survivor, stok := r.allocate(t, req(dev0, 0, 1001, 2, broker.Range{Offset: page, Length: page}))
	r.claim(t, survivor, stok)
	unclaimed, utok := r.allocate(t, req(dev0, 4, 1001, 2, broker.Range{Length: page}))
	orq := req(dev1, 0, 0, 3, broker.Range{Length: page})
	orq.Admin = true
	other, otok := r.allocate(t, orq)
	r.claim(t, other, otok)
	oldBufs := r.devs[dev0].OpenBuffers()

	if _, err := r.b.Revoke(victim.ID, broker.Actor{UID: 1000, PID: 1}, 0); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("revoke by a holder: %v, want permission denied", err)
	}
	got, err := r.b.Revoke(victim.ID, admin, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != broker.StateRevoked || got.EndReason != broker.ReasonRevoked || !strings.Contains(got.EndedBy, "admin") {
		t.Fatalf("revoked lease = %+v", got)
	}
	if r.devs[dev0].Revokes != 1 || r.devs[dev1].Revokes != 0 {
		t.Fatalf("device revokes: dev0 %d dev1 %d, want 1 and 0", r.devs[dev0].Revokes, r.devs[dev1].Revokes)
	}
	for _, b := range oldBufs {
		if !b.Revoked() {
			t.Errorf("buffer %s survived the device revoke", b.Name)
		}
	}
	if _, err := r.b.Revoke(victim.ID, admin, 0); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second revoke: %v", err)
	}
	if _, _, err := r.b.Claim(victim.ID, vtok, broker.Peer{UID: 1000, PID: 1}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("claim of revoked lease: %v", err)
	}

	// survivors: new generation, live buffer; a new token in the reissued event of the
	// claimed one, none for the never-claimed one, which keeps its allocation's token
	tokens := map[string]string{unclaimed.ID: utok}
	var types []broker.EventType
	for len(types) < 9 {
		e := <-sub.Events()
		types = append(types, e.Type)
		if e.Type == broker.EventReissued {
			if e.Lease.ID == unclaimed.ID {
				if e.Token != "" {
					t.Errorf("never-claimed lease reissued with a new token")
				}
			} else {
				tokens[e.Lease.ID] = e.Token
			}
			if e.Lease.Generation != 2 {
				t.Errorf("reissued %s generation %d, want 2", e.Lease.ID, e.Lease.Generation)
			}
		}
	}
	want := []broker.EventType{"allocated", "claimed", "allocated", "claimed", "allocated", "allocated", "claimed", "revoked", "reissued"}
	if diff := cmp.Diff(want, types); diff != "" {
		t.Fatalf("events (-want +got):\n%s", diff)
	}
	e := <-sub.Events()
	if e.Type != broker.EventReissued {
		t.Fatalf("10th event %+v, want the second reissue", e)
	}
	if e.Lease.ID == unclaimed.ID {
		if e.Token != "" {
			t.Errorf("never-claimed lease reissued with a new token")
		}
	} else {
		tokens[e.Lease.ID] = e.Token
	}
	for _, l := range []broker.Lease{survivor, unclaimed} {
		if tokens[l.ID] == "" {
			t.Fatalf("lease %s not reissued", l.ID)
		}
		nl, err := r.b.Get(l.ID)
		if err != nil || nl.Generation != 2 || nl.Inode == l.Inode || !nl.Live() {
			t.Fatalf("after reissue %+v, %v", nl, err)
		}
		f := r.claim(t, nl, tokens[l.ID])
		if inode(t, f) != nl.Inode {
			t.Fatalf("re-claimed fd is not the new generation")
		}
	}
	for _, b := range r.devs[dev0].OpenBuffers() {
		if b.Revoked() {
			t.Errorf("reissued buffer %s is revoked", b.Name)
		}
	}
	if nl, _ := r.b.Get(other.ID); nl.Generation != 1 || nl.State != broker.StateActive {
		t.Fatalf("lease on another device disturbed: %+v", nl)
	}
}

func TestRevokeDeviceFailureEndsLeases(t *testing.T) {
	r := newRig(t, nil)
	a, atok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, a, atok)
	b, _ := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page}))
	r.devs[dev0].RevokeErr = unix.EIO
	if _, err := r.b.Revoke(a.ID, admin, 0); !errors.Is(err, unix.EIO) || !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("revoke with failing device: %v", err)
	}
	if l, _ := r.b.Get(b.ID); l.State != broker.StateRevoked || l.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("other lease after device failure: %+v", l)
	}
	st, _ := r.b.Device(dev0)
	if st.Err == nil {
		t.Fatalf("device still usable after failed cycle")
	}
}

// deferred sets R to an hour (and C to 0): tenant ends leave ended-but-live leases that no
// timer buries within a test.
func deferred(c *broker.Config) { c.RevokeWithin = time.Hour }

func TestRelease(t *testing.T) {
	r := newRig(t, deferred)
	l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
	r.claim(t, l, tok)
	if _, err := r.b.Release(l.ID, broker.Actor{UID: 1001, PID: 9}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("release by stranger: %v", err)
	}
	got, err := r.b.Release(l.ID, broker.Actor{UID: 1000, PID: 7})
	if err != nil || got.State != broker.StateReleased || got.EndReason != broker.ReasonReleased {
		t.Fatalf("Release = %+v, %v", got, err)
	}
	if r.devs[dev0].Revokes != 0 {
		t.Fatalf("release cycled the device")
	}
	if got.Dead || !got.RevokeDue.Equal(got.Ended.Add(time.Hour)) {
		t.Fatalf("released lease: dead %v, revoke due %v; want ended-but-live, due an hour after its end", got.Dead, got.RevokeDue)
	}
	if n := len(r.devs[dev0].OpenBuffers()); n != 0 {
		t.Fatalf("broker kept %d buffers after release", n)
	}
	if _, err := r.b.Release(l.ID, admin); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second release: %v", err)
	}
	uid := uint32(1000)
	if live := r.b.List(broker.Filter{UID: &uid, Live: true}); len(live) != 0 {
		t.Fatalf("live leases after release: %+v", live)
	}
	if all := r.b.List(broker.Filter{UID: &uid}); len(all) != 1 {
		t.Fatalf("ended lease not listed: %+v", all)
	}
}

func TestClaimTokenExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(c *broker.Config) { c.ClaimTimeout = 10 * time.Second })
		sub, err := r.b.Subscribe(0)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Length: page}))
		claimed, ctok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: page, Length: page}))
		r.claim(t, claimed, ctok)
		time.Sleep(10*time.Second - time.Nanosecond)
		synctest.Wait()
		if got, _ := r.b.Get(l.ID); got.State != broker.StateAllocated {
			t.Fatalf("lease ended before its claim deadline: %+v", got)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		got, _ := r.b.Get(l.ID)
		if got.State != broker.StateReleased || got.EndReason != broker.ReasonClaimExpired {
			t.Fatalf("unclaimed lease after the deadline: %+v", got)
		}
		if _, _, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 1}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Fatalf("claim after expiry: %v", err)
		}
		if got, _ := r.b.Get(claimed.ID); got.State != broker.StateActive {
			t.Fatalf("claimed lease expired: %+v", got)
		}
		if n := len(r.devs[dev0].OpenBuffers()); n != 1 {
			t.Fatalf("%d buffers open, want only the claimed lease's", n)
		}
		var last broker.Event
		for len(sub.Events()) > 0 {
			last = *<-sub.Events()
		}
		if last.Type != broker.EventExpired || last.Lease.ID != l.ID {
			t.Fatalf("last event %+v, want expired %s", last, l.ID)
		}
	})
}

func TestSubscribeCursor(t *testing.T) {
	r := newRig(t, func(c *broker.Config) { c.EventBacklog = 4 })
	for i := range 3 {
		r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
	}
	sub, err := r.b.Subscribe(1)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []uint64{2, 3} {
		if e := <-sub.Events(); e.Seq != want {
			t.Fatalf("replayed seq %d, want %d", e.Seq, want)
		}
	}
	sub.Close()
	if _, ok := <-sub.Events(); ok {
		t.Fatal("events after Close")
	}
	if sub.Err() != nil {
		t.Fatalf("Err after Close = %v", sub.Err())
	}
	if _, err := r.b.Subscribe(99); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("cursor ahead: %v", err)
	}
	for i := 3; i < 6; i++ {
		r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
	}
	// 6 events, 4 retained (3..6): cursor 1 lost event 2
	if _, err := r.b.Subscribe(1); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("expired cursor: %v", err)
	}
	sub, err = r.b.Subscribe(2)
	if err != nil {
		t.Fatalf("oldest valid cursor: %v", err)
	}
	if e := <-sub.Events(); e.Seq != 3 {
		t.Fatalf("first event after cursor 2 = %d", e.Seq)
	}
	sub.Close()
}

func TestSlowSubscriberIsCut(t *testing.T) {
	const leases = 200 // more events than a subscriber may fall behind by (256)
	r := newRig(t, func(c *broker.Config) { c.Limits.MaxLeasesPerHolder = leases })
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range leases {
		l, tok := r.allocate(t, req(dev0, 0, 1000, 1, broker.Range{Offset: uint64(i) * page, Length: page}))
		_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 1})
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	n := 0
	for range sub.Events() { // 2 events per lease: the subscription must be cut, or this hangs
		n++
	}
	if n == 0 || n >= 2*leases || !errors.Is(sub.Err(), broker.ErrSubscriberLagged) {
		t.Fatalf("slow subscriber got %d events, err %v; want cut off with ErrSubscriberLagged", n, sub.Err())
	}
}

func TestCloseEndsEverything(t *testing.T) {
	r := newRig(t, nil)
	rq := req(dev0, 0, 1000, 1, broker.Range{Length: page})
	proc := rq.Holder.Proc.(*brokertest.Process)
	l, _ := r.allocate(t, rq)
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.b.Close(); err != nil {
		t.Fatal(err)
	}
	if e, ok := <-sub.Events(); !ok || e.Type != broker.EventReleased || e.Lease.EndReason != broker.ReasonShutdown {
		t.Fatalf("first event after Close = %+v, %v; want the lease released for shutdown", e, ok)
	}
	if _, ok := <-sub.Events(); ok || !errors.Is(sub.Err(), errdefs.ErrUnavailable) {
		t.Fatalf("subscription survived Close (err %v)", sub.Err())
	}
	got, _ := r.b.Get(l.ID)
	if got.State != broker.StateReleased || got.EndReason != broker.ReasonShutdown || !proc.Closed() {
		t.Fatalf("after Close: %+v, process closed %v", got, proc.Closed())
	}
	if _, _, err := r.b.Allocate(req(dev0, 0, 1000, 1, broker.Range{Length: page})); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Allocate after Close: %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  broker.Config
		want string
	}{
		{broker.Config{Devices: []broker.DeviceConfig{{}}}, "no PCI address"},
		{broker.Config{Devices: []broker.DeviceConfig{{BDF: dev0}, {BDF: dev0}}}, "configured twice"},
		{broker.Config{Devices: []broker.DeviceConfig{{BDF: dev0, BARs: []int{6}}}}, "bar 6"},
		{broker.Config{Devices: []broker.DeviceConfig{{BDF: dev0, AllowUnattestedPrivate: true, Kinds: []broker.Kind{broker.KindShared}}}}, "allow_unattested_private"},
		{broker.Config{Limits: broker.Limits{MaxRangesPerLease: 17}}, "max ranges"},
		{broker.Config{PageSize: 3000}, "power of two"},
	} {
		err := tc.cfg.Validate()
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}
