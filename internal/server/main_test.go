package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/holders"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestMain(m *testing.M) {
	if socket := os.Getenv(envChildSocket); socket != "" {
		os.Exit(childAllocate(socket))
	}
	goleak.VerifyTestMain(m)
}

// The test devices.
const (
	// bdfA may be leased by uidHolder and members of gidLessees, shared and private
	// (unattested), any BAR.
	bdfA = "0000:00:03.0"
	// bdfB is admin-only, BAR 0 only, shared and private, and not TSM-bound.
	bdfB = "0000:00:04.0"
	// bdfC may be leased by uidHolder, shared only.
	bdfC = "0000:00:05.0"
	// bdfD is configured but fails to open.
	bdfD = "0000:00:06.0"
	// bdfNone is not configured.
	bdfNone = "0000:00:1f.0"
)

// The test users, simulated through metadata read by testIdentify.
const (
	uidHolder   = 1000 // may lease bdfA and bdfC by uid
	uidHolder2  = 1001 // may lease bdfA through gidLessees
	uidStranger = 4000 // may lease nothing
	uidGroupAdm = 3000 // admin through gidAdmin
	gidLessees  = 2000
	gidAdmin    = 500
)

// env is a broker behind a Server on a real unix socket, with a client connection.
type env struct {
	t       testing.TB
	b       *broker.Broker
	srv     *Server
	conn    *grpc.ClientConn
	client  brokerv1.BrokerClient
	devA    *brokertest.Device
	devB    *brokertest.Device
	devC    *brokertest.Device
	socket  string
	logs    *syncBuffer
	served  chan error
	stopped bool
	conns   []*grpc.ClientConn
	sockets connTracker // the client connections' sockets
}

type envOptions struct {
	cfg      func(*broker.Config)
	identify IdentifyFunc     // nil: testIdentify
	quiet    bool             // discard logs (benchmarks)
	holders  *holders.Checker // nil: one scanning the real /proc
}

// newEnv starts a broker with the test devices, serves it on a unix socket in a short
// temp dir and connects a client. Everything is torn down (and fd leaks checked) at
// cleanup.
func newEnv(t testing.TB, opts ...func(*envOptions)) *env {
	t.Helper()
	testutil.FDLeakCheck(t)
	var o envOptions
	for _, f := range opts {
		f(&o)
	}
	e := &env{t: t, devA: brokertest.NewDevice(bdfA), devB: brokertest.NewDevice(bdfB), devC: brokertest.NewDevice(bdfC),
		logs: &syncBuffer{}, served: make(chan error, 1)}
	self := uint32(os.Getuid())
	cfg := broker.Config{
		Devices: []broker.DeviceConfig{
			{BDF: bdfA, UIDs: []uint32{uidHolder, self}, GIDs: []uint32{gidLessees},
				Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}, AllowUnattestedPrivate: true},
			{BDF: bdfB, BARs: []int{0}, Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}},
			{BDF: bdfC, UIDs: []uint32{uidHolder}},
			{BDF: bdfD, UIDs: []uint32{uidHolder}},
		},
		Limits: broker.Limits{MaxLeasesPerHolder: 8},
	}
	if o.cfg != nil {
		o.cfg(&cfg)
	}
	if o.holders == nil {
		o.holders = &holders.Checker{}
	}
	log := newTestLogger(e.logs)
	if o.quiet {
		log = slog.New(slog.DiscardHandler)
	}
	b, err := broker.New(cfg, brokertest.Opener(e.devA, e.devB, e.devC), log.With("component", "broker"))
	if err != nil {
		t.Fatal(err)
	}
	e.b = b
	identify := o.identify
	if identify == nil {
		identify = testIdentify
	}
	e.srv = New(b, Options{
		ClaimSocket: "/run/mmiobroker/fd.sock", AdminGroups: []uint32{gidAdmin},
		Log: log.With("component", "server"), Identify: identify, Holders: o.holders,
	})
	e.socket = filepath.Join(testutil.ShortTempDir(t), "control.sock")
	l, err := Listen(e.socket, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	go func() { e.served <- e.srv.Serve(l) }()
	t.Cleanup(e.close)
	e.conn = e.dial()
	e.client = brokerv1.NewBrokerClient(e.conn)
	return e
}

// dial returns a new client connection to the server. The env closes it at cleanup and
// waits until its socket is closed.
func (e *env) dial(opts ...grpc.DialOption) *grpc.ClientConn {
	e.t.Helper()
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(newEnvCreds()), grpc.WithContextDialer(e.sockets.dial)}, opts...)
	conn, err := grpc.NewClient("passthrough:///"+e.socket, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.conns = append(e.conns, conn)
	return conn
}

// stop stops the server (as the daemon does on SIGTERM) and waits for Serve to return.
func (e *env) stop() {
	e.t.Helper()
	if e.stopped {
		return
	}
	e.stopped = true
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.srv.Stop(ctx); err != nil {
		e.t.Errorf("Stop: %v", err)
	}
	if err := <-e.served; err != nil {
		e.t.Errorf("Serve: %v", err)
	}
}

func (e *env) close() {
	for _, c := range e.conns {
		c.Close()
	}
	e.stop()
	// A client transport whose server went away first closes its socket asynchronously.
	e.sockets.wait(e.t)
	if err := e.b.Close(); err != nil {
		e.t.Errorf("broker Close: %v", err)
	}
}

// user is a simulated caller.
type user struct {
	uid    uint32
	gid    uint32
	groups []uint32
	pid    int32 // 0: the real pid
}

var (
	root      = user{uid: 0}
	holder    = user{uid: uidHolder, gid: uidHolder}
	holder2   = user{uid: uidHolder2, gid: uidHolder2, groups: []uint32{gidLessees}}
	stranger  = user{uid: uidStranger, gid: uidStranger}
	groupAdm  = user{uid: uidGroupAdm, gid: uidGroupAdm, groups: []uint32{100, gidAdmin}}
	otherProc = user{uid: uidHolder, gid: uidHolder, pid: 1} // the holder's uid, another process
)

// ctx returns a context (cancelled at cleanup) in which RPCs are made as u.
func (u user) ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	kv := []string{"x-test-uid", strconv.Itoa(int(u.uid)), "x-test-gid", strconv.Itoa(int(u.gid))}
	for _, g := range u.groups {
		kv = append(kv, "x-test-groups", strconv.Itoa(int(g)))
	}
	if u.pid != 0 {
		kv = append(kv, "x-test-pid", strconv.Itoa(int(u.pid)))
	}
	return metadata.AppendToOutgoingContext(ctx, kv...)
}

// testIdentify identifies the caller by its real peer credentials (so the pidfd pinning is
// real) and then lets the test override uid, gid, groups and pid through metadata, so that
// one test process can act as several users.
func testIdentify(ctx context.Context) (Identity, error) {
	id, err := IdentifyPeer(ctx)
	if err != nil {
		return id, err
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if len(md.Get("x-test-panic")) > 0 {
		panic("test panic in identify")
	}
	if len(md.Get("x-test-deny")) > 0 {
		return Identity{}, errors.New("test identity refused")
	}
	num := func(key string) (uint64, bool) {
		v := md.Get(key)
		if len(v) == 0 {
			return 0, false
		}
		n, err := strconv.ParseUint(v[0], 10, 32)
		return n, err == nil
	}
	if v, ok := num("x-test-uid"); ok {
		id.UID = uint32(v)
		id.GID = id.UID
		id.Groups = nil
		id.Tenant = "" // the uid's own tenant unless x-test-tenant says otherwise
	}
	if v := md.Get("x-test-tenant"); len(v) > 0 {
		id.Tenant = v[0]
	}
	if v, ok := num("x-test-gid"); ok {
		id.GID = uint32(v)
	}
	for _, g := range md.Get("x-test-groups") {
		n, err := strconv.ParseUint(g, 10, 32)
		if err == nil {
			id.Groups = append(id.Groups, uint32(n))
		}
	}
	if v, ok := num("x-test-pid"); ok {
		id.PID = int32(v)
	}
	return id, nil
}

// allocate allocates a lease as u and fails the test on error.
func (e *env) allocate(u user, req *brokerv1.AllocateLeaseRequest) *brokerv1.AllocateLeaseResponse {
	e.t.Helper()
	resp, err := e.client.AllocateLease(u.ctx(e.t), req)
	if err != nil {
		e.t.Fatalf("AllocateLease(%v) as uid %d: %v", req, u.uid, err)
	}
	return resp
}

// allLeases lists every lease as root.
func (e *env) allLeases() []*brokerv1.Lease {
	e.t.Helper()
	resp, err := e.client.ListLeases(root.ctx(e.t), &brokerv1.ListLeasesRequest{})
	if err != nil {
		e.t.Fatalf("ListLeases: %v", err)
	}
	return resp.GetLeases()
}

// claim claims a lease directly through the broker, as the fdpass claim socket would for a
// client with the lease's real pid, and closes the fd.
func (e *env) claim(l *brokerv1.Lease, token string) {
	e.t.Helper()
	_, f, err := e.b.Claim(l.GetId(), token, broker.Peer{UID: l.GetHolder().GetUid(), PID: l.GetHolder().GetPid()})
	if err != nil {
		e.t.Fatalf("Claim(%s): %v", l.GetId(), err)
	}
	f.Close()
}

func page(n uint64) uint64 { return n * 4096 }

func oneRange(bdf string, bar uint32, off, length uint64) *brokerv1.AllocateLeaseRequest {
	return &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: bar, Ranges: []*brokerv1.Range{{Offset: off, Length: length}}}
}

// toStatus converts a domain error as the handlers do.

// cmpLeases diffs lease lists.
func cmpLeases(want, got []*brokerv1.Lease) string { return cmp.Diff(want, got, protocmp.Transform()) }

// cmpSeen diffs events, ignoring their sequence numbers.
func cmpSeen(want, got []seen) string {
	return cmp.Diff(want, got, cmpopts.IgnoreFields(seen{}, "Seq"))
}

// wantCode fails the test unless err is a status with code want whose message contains
// every one of substrs.
func wantCode(t testing.TB, err error, want codes.Code, substrs ...string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != want {
		t.Fatalf("got error %v, want code %v", err, want)
	}
	for _, s := range substrs {
		if !strings.Contains(st.Message(), s) {
			t.Errorf("error message %q does not contain %q", st.Message(), s)
		}
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writers (log handlers).
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// revokes returns d.Revokes, read under d's lock (through SetInfo, which holds it).
func revokes(d *brokertest.Device) int {
	var n int
	d.SetInfo(func(*broker.DeviceInfo) { n = d.Revokes })
	return n
}

// setRevokeErr sets d.RevokeErr under d's lock.
func setRevokeErr(d *brokertest.Device, err error) {
	d.SetInfo(func(*broker.DeviceInfo) { d.RevokeErr = err })
}

// newEnvCreds returns client transport credentials.
func newEnvCreds() credentials.TransportCredentials { return peercred.NewTransportCredentials() }

// newTestLogger returns a JSON logger writing to w.
func newTestLogger(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// rpcLogLines returns the server's "rpc" log lines, decoded.
func (e *env) rpcLogLines() []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(e.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "rpc" {
			out = append(out, m)
		}
	}
	return out
}

// connTracker dials unix sockets and tracks when they are closed.
type connTracker struct {
	wg sync.WaitGroup
}

func (ct *connTracker) dial(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	ct.wg.Add(1)
	return &trackedConn{UnixConn: c.(*net.UnixConn), done: ct.wg.Done}, nil
}

// wait waits until every socket dialed has been closed.
func (ct *connTracker) wait(t testing.TB) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		ct.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Errorf("client sockets still open 30 s after closing the connections")
		<-done
	}
}

// trackedConn is a client socket that reports its Close.
type trackedConn struct {
	*net.UnixConn
	once sync.Once
	done func()
}

func (c *trackedConn) Close() error {
	err := c.UnixConn.Close()
	c.once.Do(c.done)
	return err
}
