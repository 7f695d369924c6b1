package server

// The authorization matrix: every RPC and the claim socket, asked by every kind of caller,
// each cell in a world of its own (a fresh env), so that mutating cells cannot disturb
// each other. Authorization is decided in internal/broker (mayLease, MayView, mayChange,
// GetAs, ListAs, the admin checks, Claim); the server only identifies callers (and picks
// who sees a REISSUED claim token). Every cell is asserted: its gRPC code, what a list or an
// event stream shows, and that a refused request changed nothing while an allowed
// mutation changed something.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// The tenants of the matrix: two VMs of uid 1000 (libvirt machine scopes), one VM of the
// group member; the other uid and the admins have uid-only tenants (Identity.Tenant empty,
// "uid=N").
const (
	azTenantVM1 = `uid=1000,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope`
	azTenantVM2 = `uid=1000,cgroup=/machine.slice/machine-qemu\x2d2\x2dvm2.scope`
	azTenantVM3 = `uid=1001,cgroup=/machine.slice/machine-qemu\x2d3\x2dvm3.scope`
)

// azUIDGroupPrimary may lease bdfA through its primary gid, gidLessees.
const azUIDGroupPrimary = 1002

// The pids of the matrix's processes (fake: they are never signalled or looked up).
const (
	azPIDHolder   = 4242 // the VMM of vm1, holder of lease L1
	azPIDSibling  = 4243 // another process in vm1's scope
	azPIDOtherVM  = 4343 // the VMM of vm2 (same uid), holder of L2
	azPIDOtherUID = 4444 // a VMM of uid 4000, holder of L4
	azPIDGroup    = 4545 // the VMM of vm3 (uid 1001, member of gidLessees), holder of L3
	azPIDGrpPrim  = 4646 // a VMM of uid 1002 (primary group gidLessees), holder of L5
	azPIDAdmin    = 100  // an admin CLI as root
	azPIDGrpAdm   = 101  // an admin CLI of a member of gidAdmin
	azPIDChild    = 4246 // a child of the holder that inherited its control connection
)

// azPrincipal is one connection to the control socket and the identity the daemon sees on
// it. In the daemon that identity is the connection's SO_PEERCRED (read at connect time);
// here each principal's connection is bound to an abstract client address that the test's
// Identify maps to the identity, so the identity belongs to the connection, not to the
// RPC: whoever uses the connection is that principal.
type azPrincipal struct {
	name string
	id   Identity // without Pin: Identify pins the principal's fake process
}

var azPrincipals = []azPrincipal{
	{"holder", Identity{UID: uidHolder, GID: uidHolder, PID: azPIDHolder, Tenant: azTenantVM1}},
	{"sibling", Identity{UID: uidHolder, GID: uidHolder, PID: azPIDSibling, Tenant: azTenantVM1}},
	{"otherVM", Identity{UID: uidHolder, GID: uidHolder, PID: azPIDOtherVM, Tenant: azTenantVM2}},
	{"otherUID", Identity{UID: uidStranger, GID: uidStranger, PID: azPIDOtherUID}},
	{"group", Identity{UID: uidHolder2, GID: uidHolder2, Groups: []uint32{gidLessees}, PID: azPIDGroup, Tenant: azTenantVM3}},
	{"groupPrim", Identity{UID: azUIDGroupPrimary, GID: gidLessees, PID: azPIDGrpPrim}},
	{"admin", Identity{UID: 0, GID: 0, PID: azPIDAdmin}},
	{"groupAdmin", Identity{UID: uidGroupAdm, GID: uidGroupAdm, Groups: []uint32{100, gidAdmin}, PID: azPIDGrpAdm}},
	// The pid-reuse impostors connect after the holder (pid 4242) died and its pid was
	// given to them. The worst case has the holder's uid and even its tenant (a process
	// started in the same VM scope): nothing but the pinned pidfd tells it from the
	// holder. The other has another uid.
	{"impostor", Identity{UID: uidHolder, GID: uidHolder, PID: azPIDHolder, Tenant: azTenantVM1}},
	{"impostorUID", Identity{UID: uidStranger, GID: uidStranger, PID: azPIDHolder}},
}

// azColumn is a caller of the matrix: which connection it uses for RPCs, and what the
// claim socket sees when it connects there itself.
type azColumn struct {
	name  string
	conn  string      // the azPrincipal whose connection it uses
	claim broker.Peer // SO_PEERCRED of its own connection to the claim socket
	// holderDead: the world's holder process (pid 4242) has died and its pid was reused,
	// but the broker has not yet seen the exit (its pidfd watch did not run yet): lease
	// L1 is still live, only its pinned process is not alive.
	holderDead bool
}

// azColumns are the matrix's callers, in table order.
//
// "inherited" is a child process that inherited the holder's control connection (fork
// without CLOEXEC, or the fd passed on). The daemon identifies callers by SO_PEERCRED, and
// the kernel records a socket's peer credentials (and SO_PEERPIDFD) when it connects: the
// child's RPCs carry the connector's uid, pid and pidfd, so the daemon cannot tell it from
// the holder and treats it as the holder in every RPC. A lease it allocates is pinned to
// the holder (it ends when the holder exits), and it even sees the holder's REISSUED claim
// tokens. What it cannot do is claim an fd: the claim socket is where the pinned pid
// matters. The child connects to the claim socket itself, which sees its own pid, and the
// broker hands a lease's fd only to the allocating uid and pid, pinned by pidfd.
var azColumns = []azColumn{
	{name: "holder", conn: "holder", claim: broker.Peer{UID: uidHolder, PID: azPIDHolder}},
	{name: "sibling", conn: "sibling", claim: broker.Peer{UID: uidHolder, PID: azPIDSibling}},
	{name: "otherVM", conn: "otherVM", claim: broker.Peer{UID: uidHolder, PID: azPIDOtherVM}},
	{name: "otherUID", conn: "otherUID", claim: broker.Peer{UID: uidStranger, PID: azPIDOtherUID}},
	{name: "group", conn: "group", claim: broker.Peer{UID: uidHolder2, PID: azPIDGroup}},
	{name: "groupPrim", conn: "groupPrim", claim: broker.Peer{UID: azUIDGroupPrimary, PID: azPIDGrpPrim}},
	{name: "admin", conn: "admin", claim: broker.Peer{UID: 0, PID: azPIDAdmin}},
	{name: "groupAdmin", conn: "groupAdmin", claim: broker.Peer{UID: uidGroupAdm, PID: azPIDGrpAdm}},
	{name: "inherited", conn: "holder", claim: broker.Peer{UID: uidHolder, PID: azPIDChild}},
	{name: "impostor", conn: "impostor", claim: broker.Peer{UID: uidHolder, PID: azPIDHolder}, holderDead: true},
	{name: "impostorUID", conn: "impostorUID", claim: broker.Peer{UID: uidStranger, PID: azPIDHolder}, holderDead: true},
}

// azEffect says how a row's call may change the broker's state.
type azEffect int

const (
	azReadOnly   azEffect = iota // never changes anything
	azMutates                    // changes something if allowed, nothing if refused
	azNotChecked                 // the call itself involves admin actions (WatchEvents)
)

// azRow is one operation of the matrix with the expected cell of every column.
type azRow struct {
	name   string
	effect azEffect
	// unclaimed leaves L1 unclaimed (ALLOCATED, its token unused) in the world.
	unclaimed bool
	// setup runs (as admin) after the world is built, before the state snapshot.
	setup func(w *azWorld)
	call  func(w *azWorld, c brokerv1.BrokerClient, col azColumn, want azCell) ([]string, error)
	want  string // the cells, one per azColumns entry, separated by spaces
}

// TestAuthzMatrix runs every RPC and the claim socket as every caller. Columns (see
// azColumns): the holder process; another process of the holder's tenant; a process of
// the holder's uid in another VM's cgroup (another tenant); another uid; allowed group
// members by supplementary and by primary gid; root; a member of the admin group; a
// process that inherited the holder's control connection; and two pid-reuse impostors
// (the holder's uid and tenant; another uid).
//
// The world of every cell: devices bdfA (leasable by uid 1000 and gid 2000), bdfB (admins
// only) and bdfC (uids 1000 and 4000, no gids); claimed leases L1 (holder, bdfA page 0),
// L2 (otherVM, bdfA page 1), L3 (group, bdfA page 2), L4 (otherUID, bdfC page 0) and L5
// (groupPrimary, bdfA page 3).
func TestAuthzMatrix(t *testing.T) {
	// Cells, in azColumns order: OK; DENIED (codes.PermissionDenied); for lists and
	// event streams "[...]": success showing exactly these leases (a stream: their REISSUED
	// events, "+tok" where the event carries the claim token), "[all]" all five, "[]" none.
	rows := []azRow{
		//	       holder    sibling  otherVM   otherUID  group     groupPrim  admin    groupAdmin  inherited  impostor  impostorUID
		{name: "ListDevices", call: azListDevices,
			want: "OK        OK       OK        OK        OK        OK         OK       OK          OK         OK        OK"},
		{name: "GetDevice", call: azGetDevice,
			want: "OK        OK       OK        OK        OK        OK         OK       OK          OK         OK        OK"},
		{name: "AllocateLease/bdfA(uid,gid)", effect: azMutates, call: azAllocate(bdfA),
			want: "OK        OK       OK        DENIED    OK        OK         OK       OK          OK         OK        DENIED"},
		{name: "AllocateLease/bdfB(admins)", effect: azMutates, call: azAllocate(bdfB),
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "AllocateLease/bdfC(uids)", effect: azMutates, call: azAllocate(bdfC),
			want: "OK        OK       OK        OK        DENIED    DENIED     OK       OK          OK         OK        OK"},
		{name: "GetLease/L1", call: azGetLease,
			want: "OK        OK       DENIED    DENIED    DENIED    DENIED     OK       OK          OK         OK        DENIED"},
		{name: "GetLease/L1+holders", call: azGetLeaseHolders,
			want: "OK        OK       DENIED    DENIED    DENIED    DENIED     OK       OK          OK         OK        DENIED"},
		{name: "ScanHolders/all", call: azScanHolders(""),
			want: "[L1]      [L1]     [L2]      [L4]      [L3]      [L5]       [all]    [all]       [L1]       [L1]      [L4]"},
		{name: "ScanHolders/L1", call: azScanHolders("L1"),
			want: "[L1]      [L1]     DENIED    DENIED    DENIED    DENIED     [L1]     [L1]        [L1]       [L1]      DENIED"},
		{name: "ListLeases/all", call: azList(func(Identity) *brokerv1.ListLeasesRequest { return &brokerv1.ListLeasesRequest{} }),
			want: "[L1]      [L1]     [L2]      [L4]      [L3]      [L5]       [all]    [all]       [L1]       [L1]      [L4]"},
		{name: "ListLeases/own-uid", call: azList(func(id Identity) *brokerv1.ListLeasesRequest {
			return &brokerv1.ListLeasesRequest{HolderUid: &id.UID}
		}),
			want: "[L1]      [L1]     [L2]      [L4]      [L3]      [L5]       []       []          [L1]       [L1]      [L4]"},
		{name: "ListLeases/own-tenant", call: azList(func(id Identity) *brokerv1.ListLeasesRequest {
			return &brokerv1.ListLeasesRequest{Tenant: id.tenant()}
		}),
			want: "[L1]      [L1]     [L2]      [L4]      [L3]      [L5]       []       []          [L1]       [L1]      [L4]"},
		{name: "ListLeases/uid-1000", call: azList(func(Identity) *brokerv1.ListLeasesRequest {
			uid := uint32(uidHolder)
			return &brokerv1.ListLeasesRequest{HolderUid: &uid}
		}),
			want: "[L1]      [L1]     [L2]      DENIED    DENIED    DENIED     [L1,L2]  [L1,L2]     [L1]       [L1]      DENIED"},
		{name: "ListLeases/tenant-vm1", call: azList(func(Identity) *brokerv1.ListLeasesRequest {
			return &brokerv1.ListLeasesRequest{Tenant: azTenantVM1}
		}),
			want: "[L1]      [L1]     DENIED    DENIED    DENIED    DENIED     [L1]     [L1]        [L1]       [L1]      DENIED"},
		// The impostor gets L1's token: tokens go to streams of the holder's uid and pid
		// (broker.proto, Event.claim_token), and it has both. It cannot use it: see the
		// Claim row.
		{name: "WatchEvents", effect: azNotChecked, call: azWatch,
			want: "[L1+tok]  [L1]     [L2+tok]  [L4+tok]  [L3+tok]  [L5+tok]   [all]    [all]       [L1+tok]   [L1+tok]  [L4]"},
		{name: "RenewLease/L1", effect: azMutates, call: azRenew,
			want: "OK        OK       DENIED    DENIED    DENIED    DENIED     OK       OK          OK         OK        DENIED"},
		{name: "ReleaseLease/L1", effect: azMutates, call: azRelease,
			want: "OK        OK       DENIED    DENIED    DENIED    DENIED     OK       OK          OK         OK        DENIED"},
		{name: "RevokeLease/L1", effect: azMutates, call: azRevoke(0),
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "RevokeLease/L1-grace", effect: azMutates, call: azRevoke(time.Minute),
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "CycleDevice/bdfA", effect: azMutates, call: azCycle,
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "SuspendDevice/bdfA", effect: azMutates, call: azSuspend,
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "ResumeDevice/bdfA", effect: azMutates, call: azResume, setup: azSuspended,
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		{name: "Drain", effect: azMutates, call: azDrain,
			want: "DENIED    DENIED   DENIED    DENIED    DENIED    DENIED     OK       OK          DENIED     DENIED    DENIED"},
		// The claim socket: L1 unclaimed, its valid token presented on each caller's own
		// connection to the claim socket.
		{name: "Claim/L1", effect: azMutates, unclaimed: true, call: azClaim,
			want: "OK        DENIED   DENIED    DENIED    DENIED    DENIED     DENIED   DENIED      DENIED     DENIED    DENIED"},
	}
	for _, row := range rows {
		want := strings.Fields(row.want)
		if len(want) != len(azColumns) {
			t.Fatalf("row %s has %d cells, want %d", row.name, len(want), len(azColumns))
		}
		t.Run(row.name, func(t *testing.T) {
			for i, col := range azColumns {
				t.Run(col.name, func(t *testing.T) { azRunCell(t, row, col, azParseCell(t, want[i])) })
			}
		})
	}
}

// azRunCell builds the cell's world, runs its call and checks the outcome.
func azRunCell(t *testing.T, row azRow, col azColumn, want azCell) {
	w := newAzWorld(t, !row.unclaimed)
	if row.setup != nil {
		row.setup(w)
	}
	if col.holderDead {
		w.procs["holder"].reuse()
	}
	before := w.snapshot()
	got, err := row.call(w, w.client(col.conn), col, want)
	if c := status.Code(toStatus(err)); c != want.code {
		t.Fatalf("%s as %s: code %v (%v), want %v", row.name, col.name, c, err, want.code)
	}
	if want.list {
		slices.Sort(got)
		if diff := cmp.Diff(want.visible, got); diff != "" {
			t.Errorf("%s as %s shows (-want +got):\n%s", row.name, col.name, diff)
		}
	}
	after := w.snapshot()
	switch diff := cmp.Diff(before, after, protocmp.Transform()); {
	case row.effect == azReadOnly && diff != "":
		t.Errorf("%s as %s changed the broker (-before +after):\n%s", row.name, col.name, diff)
	case row.effect == azMutates && err != nil && diff != "":
		t.Errorf("refused %s as %s changed the broker (-before +after):\n%s", row.name, col.name, diff)
	case row.effect == azMutates && err == nil && diff == "":
		t.Errorf("%s as %s succeeded but changed nothing", row.name, col.name)
	}
}

// azCell is a parsed matrix cell.
type azCell struct {
	code    codes.Code
	list    bool     // the cell names what is visible
	visible []string // sorted
}

func azParseCell(t *testing.T, s string) azCell {
	t.Helper()
	switch {
	case s == "OK":
		return azCell{code: codes.OK}
	case s == "DENIED":
		return azCell{code: codes.PermissionDenied}
	case s == "[all]":
		s = "[L1,L2,L3,L4,L5]"
	}
	if !strings.HasPrefix(s, "[") || !strings.HasSuffix(s, "]") {
		t.Fatalf("bad matrix cell %q", s)
	}
	v := []string{}
	if s != "[]" {
		v = strings.Split(strings.Trim(s, "[]"), ",")
	}
	slices.Sort(v)
	return azCell{code: codes.OK, list: true, visible: v}
}

// azWorld is a cell's world: an env whose callers are the azPrincipals, one connection
// each, and the leases L1-L5.
type azWorld struct {
	t      *testing.T
	e      *env
	addrs  map[string]string // principal name -> its connection's abstract client address
	conns  map[string]*grpc.ClientConn
	procs  map[string]*azProc // principal name -> its (fake) process
	leases map[string]string  // "L1".. -> lease id
	tokens map[string]string  // "L1".. -> claim token (used unless unclaimed)
	names  map[string]string  // lease id -> "L1"..
}

// azLeases are the world's leases, allocated in this order by their holders' connections.
var azLeases = []struct {
	name, principal, bdf string
	off                  uint64
}{
	{"L1", "holder", bdfA, page(0)},
	{"L2", "otherVM", bdfA, page(1)},
	{"L3", "group", bdfA, page(2)},
	{"L4", "otherUID", bdfC, page(0)},
	{"L5", "groupPrim", bdfA, page(3)},
}

var azConnSeq atomic.Uint64

// newAzWorld starts an env whose Identify maps each principal's connection to its identity
// and lets the holders allocate L1-L5, claimed if claimL1 (L2-L5 always are).
func newAzWorld(t *testing.T, claimL1 bool) *azWorld {
	t.Helper()
	w := &azWorld{t: t, addrs: map[string]string{}, conns: map[string]*grpc.ClientConn{}, procs: map[string]*azProc{},
		leases: map[string]string{}, tokens: map[string]string{}, names: map[string]string{}}
	byAddr := map[string]azPrincipal{}
	for _, p := range azPrincipals {
		addr := fmt.Sprintf("@mmb-authz-%d-%d-%s", os.Getpid(), azConnSeq.Add(1), p.name)
		w.addrs[p.name] = addr
		w.procs[p.name] = &azProc{pid: p.id.PID, exited: make(chan struct{})}
		byAddr[addr] = p
	}
	procs := w.procs // read-only from here on
	identify := func(ctx context.Context) (Identity, error) {
		pr, ok := peer.FromContext(ctx)
		if !ok || pr.Addr == nil {
			return Identity{}, errors.New("no peer")
		}
		p, ok := byAddr[pr.Addr.String()]
		if !ok {
			return Identity{}, fmt.Errorf("not a connection of the authz matrix: %q", pr.Addr)
		}
		id := p.id
		id.Groups = slices.Clone(id.Groups)
		proc := procs[p.name]
		id.Pin = func() (broker.Process, error) { return proc.pin(), nil }
		return id, nil
	}
	w.e = newEnv(t, func(o *envOptions) {
		o.identify = identify
		o.cfg = func(c *broker.Config) {
			// Policies independent of the uid the test runs as.
			c.Devices = []broker.DeviceConfig{
				{BDF: bdfA, UIDs: []uint32{uidHolder}, GIDs: []uint32{gidLessees},
					Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}, AllowUnattestedPrivate: true},
				{BDF: bdfB, BARs: []int{0}, Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}},
				{BDF: bdfC, UIDs: []uint32{uidHolder, uidStranger}},
			}
		}
	})
	for _, l := range azLeases {
		resp, err := w.client(l.principal).AllocateLease(w.ctx(), oneRange(l.bdf, 0, l.off, page(1)))
		if err != nil {
			t.Fatalf("setup: allocate %s as %s: %v", l.name, l.principal, err)
		}
		id := resp.GetLease().GetId()
		w.leases[l.name], w.tokens[l.name], w.names[id] = id, resp.GetClaimToken(), l.name
		if l.name == "L1" && !claimL1 {
			continue
		}
		w.e.claim(resp.GetLease(), resp.GetClaimToken())
	}
	return w
}

// client returns a Broker client on principal's own connection.
func (w *azWorld) client(principal string) brokerv1.BrokerClient {
	w.t.Helper()
	if c, ok := w.conns[principal]; ok {
		return brokerv1.NewBrokerClient(c)
	}
	addr, ok := w.addrs[principal]
	if !ok {
		w.t.Fatalf("no principal %q", principal)
	}
	ct := &w.e.sockets
	conn := w.e.dial(grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
		d := net.Dialer{LocalAddr: &net.UnixAddr{Name: addr, Net: "unix"}}
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, err
		}
		ct.wg.Add(1)
		return &trackedConn{UnixConn: c.(*net.UnixConn), done: ct.wg.Done}, nil
	}))
	w.conns[principal] = conn
	return brokerv1.NewBrokerClient(conn)
}

func (w *azWorld) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	w.t.Cleanup(cancel)
	return ctx
}

// snapshot returns every lease and device as an admin would see them.
func (w *azWorld) snapshot() []any {
	var out []any
	for _, l := range leasesToProto(w.e.b.List(broker.Filter{})) {
		out = append(out, l)
	}
	for _, d := range w.e.b.Devices() {
		out = append(out, deviceToProto(d))
	}
	return out
}

// named maps lease ids to the world's names.
func (w *azWorld) named(ls []*brokerv1.Lease) []string {
	out := []string{}
	for _, l := range ls {
		out = append(out, w.nameOf(l.GetId()))
	}
	return out
}

func (w *azWorld) nameOf(id string) string {
	if n, ok := w.names[id]; ok {
		return n
	}
	return id
}

// azPrincipalOf returns the identity the daemon sees on col's connection.
func azPrincipalOf(col azColumn) Identity {
	for _, p := range azPrincipals {
		if p.name == col.conn {
			return p.id
		}
	}
	panic("no principal " + col.conn)
}

func azListDevices(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	resp, err := c.ListDevices(w.ctx(), &brokerv1.ListDevicesRequest{})
	if err == nil && len(resp.GetDevices()) != 3 {
		w.t.Errorf("ListDevices shows %d devices, want 3", len(resp.GetDevices()))
	}
	return nil, err
}

func azGetDevice(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	resp, err := c.GetDevice(w.ctx(), &brokerv1.GetDeviceRequest{Bdf: bdfA})
	if err == nil && resp.GetDevice().GetLiveLeases() != 4 {
		w.t.Errorf("GetDevice shows %d live leases, want 4", resp.GetDevice().GetLiveLeases())
	}
	return nil, err
}

// azAllocate allocates page 8 of BAR 0 of bdf (free in every world). An allowed lease is
// the connection's: its holder is the uid, pid and tenant the daemon sees on it, also for
// a child that inherited the connection.
func azAllocate(bdf string) func(*azWorld, brokerv1.BrokerClient, azColumn, azCell) ([]string, error) {
	return func(w *azWorld, c brokerv1.BrokerClient, col azColumn, _ azCell) ([]string, error) {
		resp, err := c.AllocateLease(w.ctx(), oneRange(bdf, 0, page(8), page(1)))
		if err != nil {
			return nil, err
		}
		id := azPrincipalOf(col)
		want := &brokerv1.Holder{Uid: id.UID, Pid: id.PID, Tenant: id.tenant()}
		if diff := cmp.Diff(want, resp.GetLease().GetHolder(), protocmp.Transform()); diff != "" {
			w.t.Errorf("lease allocated as %s has holder (-want +got):\n%s", col.name, diff)
		}
		return nil, nil
	}
}

func azGetLease(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	resp, err := c.GetLease(w.ctx(), &brokerv1.GetLeaseRequest{LeaseId: w.leases["L1"]})
	if err == nil && resp.GetLease().GetId() != w.leases["L1"] {
		w.t.Errorf("GetLease(L1) returned lease %s", resp.GetLease().GetId())
	}
	return nil, err
}

func azGetLeaseHolders(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	resp, err := c.GetLease(w.ctx(), &brokerv1.GetLeaseRequest{LeaseId: w.leases["L1"], IncludeHolders: true})
	if err == nil && resp.GetLease().GetId() != w.leases["L1"] {
		w.t.Errorf("GetLease(L1, include_holders) returned lease %s", resp.GetLease().GetId())
	}
	return nil, err
}

// azScanHolders scans for the holders of lease name ("": of every lease the caller may
// see) and returns the leases reported.
func azScanHolders(name string) func(*azWorld, brokerv1.BrokerClient, azColumn, azCell) ([]string, error) {
	return func(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
		req := &brokerv1.ScanHoldersRequest{}
		if name != "" {
			req.LeaseId = w.leases[name]
		}
		resp, err := c.ScanHolders(w.ctx(), req)
		if err != nil {
			return nil, err
		}
		var leases []*brokerv1.Lease
		for _, l := range resp.GetLeases() {
			leases = append(leases, l.GetLease())
		}
		return w.named(leases), nil
	}
}

func azList(req func(Identity) *brokerv1.ListLeasesRequest) func(*azWorld, brokerv1.BrokerClient, azColumn, azCell) ([]string, error) {
	return func(w *azWorld, c brokerv1.BrokerClient, col azColumn, _ azCell) ([]string, error) {
		resp, err := c.ListLeases(w.ctx(), req(azPrincipalOf(col)))
		if err != nil {
			return nil, err
		}
		return w.named(resp.GetLeases()), nil
	}
}

// azWatch opens the caller's event stream, has an admin cycle bdfA and bdfC (every lease
// is reissued: a REISSUED event each, with a new claim token), then renews the first
// lease the caller should see as the stream's last event. Every event before it is what
// the caller saw; it returns the REISSUED ones, "+tok" where a claim token came along.
func azWatch(w *azWorld, c brokerv1.BrokerClient, col azColumn, want azCell) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
	if err != nil {
		return nil, err
	}
	if _, err := s.Header(); err != nil {
		return nil, err
	}
	admin := w.client("admin")
	for _, bdf := range []string{bdfA, bdfC} {
		if _, err := admin.CycleDevice(w.ctx(), &brokerv1.CycleDeviceRequest{Bdf: bdf}); err != nil {
			w.t.Fatalf("CycleDevice(%s): %v", bdf, err)
		}
	}
	if len(want.visible) == 0 {
		w.t.Fatal("a WatchEvents cell must name a lease: its renewal ends the stream's check")
	}
	sentinel := w.leases[strings.TrimSuffix(want.visible[0], "+tok")]
	if _, err := admin.RenewLease(w.ctx(), &brokerv1.RenewLeaseRequest{LeaseId: sentinel, Ttl: durationpb.New(time.Hour)}); err != nil {
		w.t.Fatalf("RenewLease(%s): %v", w.nameOf(sentinel), err)
	}
	got := []string{}
	for range len(want.visible) + 1 {
		resp, err := s.Recv()
		if err != nil {
			w.t.Fatalf("WatchEvents as %s: Recv after %v: %v", col.name, got, err)
		}
		ev := resp.GetEvent()
		name := w.nameOf(ev.GetLease().GetId())
		switch ev.GetType() {
		case evReissued:
			if ev.GetClaimToken() != "" {
				name += "+tok"
			}
			got = append(got, name)
		case brokerv1.EventType_EVENT_TYPE_RENEWED:
			if ev.GetLease().GetId() == sentinel {
				return got, nil // the last event: everything before it is checked
			}
			fallthrough
		default:
			if ev.GetClaimToken() != "" {
				w.t.Errorf("%v event of %s carries a claim token", ev.GetType(), name)
			}
			got = append(got, ev.GetType().String()+" "+name)
		}
	}
	return append(got, "(more events than expected before the renewal of "+w.nameOf(sentinel)+")"), nil
}

// azSuspended suspends bdfA as an admin, so that it can be resumed.
func azSuspended(w *azWorld) {
	if _, err := w.client("admin").SuspendDevice(w.ctx(), &brokerv1.SuspendDeviceRequest{Bdf: bdfA}); err != nil {
		w.t.Fatalf("setup: SuspendDevice: %v", err)
	}
}

func azRenew(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.RenewLease(w.ctx(), &brokerv1.RenewLeaseRequest{LeaseId: w.leases["L1"], Ttl: durationpb.New(time.Hour)})
	return nil, err
}

func azRelease(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.ReleaseLease(w.ctx(), &brokerv1.ReleaseLeaseRequest{LeaseId: w.leases["L1"]})
	return nil, err
}

func azRevoke(grace time.Duration) func(*azWorld, brokerv1.BrokerClient, azColumn, azCell) ([]string, error) {
	return func(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
		req := &brokerv1.RevokeLeaseRequest{LeaseId: w.leases["L1"]}
		if grace > 0 {
			req.GracePeriod = durationpb.New(grace)
		}
		_, err := c.RevokeLease(w.ctx(), req)
		return nil, err
	}
}

func azCycle(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.CycleDevice(w.ctx(), &brokerv1.CycleDeviceRequest{Bdf: bdfA})
	return nil, err
}

func azSuspend(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.SuspendDevice(w.ctx(), &brokerv1.SuspendDeviceRequest{Bdf: bdfA})
	return nil, err
}

func azResume(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.ResumeDevice(w.ctx(), &brokerv1.ResumeDeviceRequest{Bdf: bdfA})
	return nil, err
}

func azDrain(w *azWorld, c brokerv1.BrokerClient, _ azColumn, _ azCell) ([]string, error) {
	_, err := c.Drain(w.ctx(), &brokerv1.DrainRequest{})
	return nil, err
}

// azClaim presents L1's valid claim token on the claim socket as col. The env has no claim
// socket server, and a real one would see the test process's own SO_PEERCRED for every
// column; so this calls Broker.Claim with the broker.Peer the claim socket reports for
// col's own connection to it, as the daemon's fdpass adapter (internal/daemon) does with
// fdpass.Peer.
func azClaim(w *azWorld, _ brokerv1.BrokerClient, col azColumn, _ azCell) ([]string, error) {
	_, f, err := w.e.b.Claim(w.leases["L1"], w.tokens["L1"], col.claim)
	if f != nil {
		f.Close()
	}
	if (err == nil) != (f != nil) {
		w.t.Errorf("Claim as %s = %v, %v: want an fd exactly on success", col.name, f, err)
	}
	return nil, err
}

// azProc is a fake process as pinned by a pidfd. Pins of one process share its fate, as
// duplicates of a pidfd do.
type azProc struct {
	pid      int32
	dead     atomic.Bool   // the process is gone (its pid may be someone else's now)
	exited   chan struct{} // closed when the broker's pidfd watch should see the exit
	exitOnce sync.Once
}

// reuse makes the process dead without waking the broker's watch: the pid was reused
// before the broker noticed the exit, so its leases are still live.
func (p *azProc) reuse() { p.dead.Store(true) }

// exit makes the process dead and wakes the broker's watch.
func (p *azProc) exit() {
	p.dead.Store(true)
	p.exitOnce.Do(func() { close(p.exited) })
}

func (p *azProc) pin() *azPin { return &azPin{p: p, closed: make(chan struct{})} }

// azPin is one pin (pidfd) of an azProc.
type azPin struct {
	p         *azProc
	closed    chan struct{}
	closeOnce sync.Once
}

func (q *azPin) PID() int32   { return q.p.pid }
func (q *azPin) Alive() bool  { return !q.p.dead.Load() }
func (q *azPin) Close() error { q.closeOnce.Do(func() { close(q.closed) }); return nil }

func (q *azPin) Wait(ctx context.Context) error {
	select {
	case <-q.p.exited:
		return nil
	case <-q.closed:
		return errors.New("azPin: closed")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestAuthzClaimAfterHolderExit is the usual course of a pid reuse, where the broker's
// pidfd watch sees the holder exit before an impostor with its pid claims: the lease has
// ended (HOLDER_EXITED), so the claim is refused as FAILED_PRECONDITION. (The matrix's
// impostors claim before the broker noticed: PERMISSION_DENIED, by the pinned pidfd.)
func TestAuthzClaimAfterHolderExit(t *testing.T) {
	w := newAzWorld(t, false)
	s, err := w.client("admin").WatchEvents(w.ctx(), &brokerv1.WatchEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Header(); err != nil {
		t.Fatal(err)
	}
	w.procs["holder"].exit()
	ev := waitEvent(t, s, evReleased, w.leases["L1"])
	if r := ev.GetLease().GetEndReason(); r != brokerv1.EndReason_END_REASON_HOLDER_EXITED {
		t.Fatalf("L1 ended with %v, want HOLDER_EXITED", r)
	}
	for _, p := range []broker.Peer{{UID: uidHolder, PID: azPIDHolder}, {UID: uidStranger, PID: azPIDHolder}} {
		_, f, err := w.e.b.Claim(w.leases["L1"], w.tokens["L1"], p)
		if f != nil {
			f.Close()
			t.Errorf("claim as %+v after the holder exited delivered an fd", p)
		}
		if c := status.Code(toStatus(err)); c != codes.FailedPrecondition {
			t.Errorf("claim as %+v after the holder exited: code %v (%v), want FailedPrecondition", p, c, err)
		}
	}
}

// TestAuthzClaimSameProcessOtherUID: the holder process itself, still alive, but with
// another uid by the time it claims (it dropped privileges after allocating, as a VMM
// started as root may): the claim socket sees the lease's pid and pinned process with
// another uid, and refuses. A claim must come from the allocating uid and pid.
func TestAuthzClaimSameProcessOtherUID(t *testing.T) {
	w := newAzWorld(t, false)
	before := w.snapshot()
	_, f, err := w.e.b.Claim(w.leases["L1"], w.tokens["L1"], broker.Peer{UID: uidStranger, PID: azPIDHolder})
	if f != nil {
		f.Close()
		t.Error("claim with the holder's pid and another uid delivered an fd")
	}
	if c := status.Code(toStatus(err)); c != codes.PermissionDenied {
		t.Fatalf("claim with the holder's pid and another uid: code %v (%v), want PermissionDenied", c, err)
	}
	if diff := cmp.Diff(before, w.snapshot(), protocmp.Transform()); diff != "" {
		t.Errorf("refused claim changed the broker (-before +after):\n%s", diff)
	}
}
