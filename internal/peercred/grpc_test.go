package peercred

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// connEnds signals every server-side connection end. gRPC reports ConnEnd after it has
// closed the connection, so by then the connection's pidfd must be closed.
type connEnds chan struct{}

func (connEnds) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (connEnds) HandleRPC(context.Context, stats.RPCStats)                         {}
func (connEnds) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (c connEnds) HandleConn(_ context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnEnd); ok {
		c <- struct{}{}
	}
}

type grpcHarness struct {
	path  string
	seen  chan AuthInfo
	ended connEnds
}

// startGRPC serves a catch-all handler that reports the caller's AuthInfo.
func startGRPC(t *testing.T, creds credentials.TransportCredentials) *grpcHarness {
	t.Helper()
	h := &grpcHarness{
		path:  testutil.ShortTempDir(t) + "/control.sock",
		seen:  make(chan AuthInfo, 16),
		ended: make(connEnds, 16),
	}
	l, err := net.Listen("unix", h.path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(creds), grpc.StatsHandler(h.ended),
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			if err := stream.RecvMsg(&emptypb.Empty{}); err != nil {
				return err
			}
			ai, ok := FromContext(stream.Context())
			if !ok {
				return status.Error(codes.Unauthenticated, "no peercred auth info")
			}
			h.seen <- ai
			return stream.SendMsg(wrapperspb.String(fmt.Sprintf("uid=%d pid=%d alive=%v",
				ai.Creds.UID, ai.Creds.PID, ai.Process.Alive())))
		}))
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return h
}

func dial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(NewTransportCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return cc
}

func countPidfds(t *testing.T) int {
	t.Helper()
	fds, err := testutil.OpenFDs()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, target := range fds {
		if strings.Contains(target, "pidfd") {
			n++
		}
	}
	return n
}

func TestTransportCredentials(t *testing.T) {
	for _, pm := range pinModes {
		t.Run(pm.name, func(t *testing.T) {
			testutil.FDLeakCheck(t)
			h := startGRPC(t, &transportCredentials{pin: pm.mode})
			before := countPidfds(t)

			cc := dial(t, h.path)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var (
				out wrapperspb.StringValue
				p   peer.Peer
			)
			if err := cc.Invoke(ctx, "/mmiobroker.test.Who/Who", &emptypb.Empty{}, &out, grpc.Peer(&p)); err != nil {
				t.Fatalf("Invoke: %v", err)
			}
			me := os.Getpid()
			if want := fmt.Sprintf("uid=%d pid=%d alive=true", os.Geteuid(), me); out.GetValue() != want {
				t.Errorf("server saw %q, want %q", out.GetValue(), want)
			}
			ai := <-h.seen
			if ai.Process == nil || ai.Process.PID() != int32(me) {
				t.Fatalf("server AuthInfo.Process = %v, want pid %d", ai.Process, me)
			}
			if ai.SecurityLevel != credentials.PrivacyAndIntegrity || ai.AuthType() != AuthType {
				t.Errorf("server AuthInfo = %+v", ai)
			}
			if got := countPidfds(t); got != before+1 {
				t.Errorf("%d pidfds open during the connection, want %d", got, before+1)
			}

			// Client side: the server's credentials, no Process.
			cai, ok := p.AuthInfo.(AuthInfo)
			if !ok {
				t.Fatalf("client AuthInfo is %T", p.AuthInfo)
			}
			if cai.Creds.PID != int32(me) || cai.Process != nil {
				t.Errorf("client AuthInfo = %+v, want server pid %d and no Process", cai, me)
			}

			cc.Close()
			<-h.ended
			if ai.Process.Alive() {
				t.Error("connection's Process still usable after the connection closed")
			}
			if _, err := ai.Process.Dup(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("Dup after connection close = %v, want os.ErrClosed", err)
			}
			if got := countPidfds(t); got != before {
				t.Errorf("%d pidfds open after the client disconnected, want %d", got, before)
			}
		})
	}
}

// TestTransportCredentialsManyConns opens and drops connections; none may leak a pidfd.
func TestTransportCredentialsManyConns(t *testing.T) {
	testutil.FDLeakCheck(t)
	h := startGRPC(t, NewTransportCredentials())
	before := countPidfds(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const n = 8
	for range n {
		cc := dial(t, h.path)
		if err := cc.Invoke(ctx, "/mmiobroker.test.Who/Who", &emptypb.Empty{}, &wrapperspb.StringValue{}); err != nil {
			t.Fatal(err)
		}
		<-h.seen
		cc.Close()
	}
	for range n {
		<-h.ended
	}
	if got := countPidfds(t); got != before {
		t.Errorf("%d pidfds open after %d clients came and went, want %d", got, n, before)
	}
}

func TestTransportCredentialsRejectNonUnix(t *testing.T) {
	testutil.FDLeakCheck(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	creds := NewTransportCredentials()
	if _, _, err := creds.ServerHandshake(s); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ServerHandshake(tcp) = %v, want ErrInvalidArgument", err)
	}
	if _, _, err := creds.ClientHandshake(context.Background(), "x", c); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ClientHandshake(tcp) = %v, want ErrInvalidArgument", err)
	}
}

func TestTransportCredentialsInfo(t *testing.T) {
	c := NewTransportCredentials()
	if got := c.Info().SecurityProtocol; got != AuthType {
		t.Errorf("SecurityProtocol = %q", got)
	}
	if c.Clone() == c {
		t.Error("Clone returned the receiver")
	}
	if _, ok := FromContext(context.Background()); ok {
		t.Error("FromContext on a bare context reported ok")
	}
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{}})
	if _, ok := FromContext(ctx); ok {
		t.Error("FromContext with foreign AuthInfo reported ok")
	}
}

// socketPair returns the two ends of a connected AF_UNIX stream socket pair.
func socketPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return mk(fds[0]), mk(fds[1])
}

// TestServerHandshakeTenant: with WithTenant the handshake reports the resolved tenant,
// counts connections per tenant (two VMs of one uid do not share a limit), and refuses a
// peer whose tenant cannot be resolved.
func TestServerHandshakeTenant(t *testing.T) {
	testutil.FDLeakCheck(t)
	next := []string{"uid=1,cgroup=/machine.slice/a.scope", "uid=1,cgroup=/machine.slice/b.scope", "uid=1,cgroup=/machine.slice/a.scope", ""}
	var gotCreds []Creds
	creds := NewTransportCredentials(WithTenant(func(c Creds, p *Process, rc syscall.RawConn) (string, error) {
		gotCreds = append(gotCreds, c)
		if p == nil || rc == nil {
			t.Error("tenant func without the process or the socket")
		}
		t1 := next[0]
		next = next[1:]
		if t1 == "" {
			return "", errors.New("no cgroup")
		}
		return t1, nil
	})).(*transportCredentials)
	creds.conns = newConnLimit(1, 100)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i, want := range []string{"uid=1,cgroup=/machine.slice/a.scope", "uid=1,cgroup=/machine.slice/b.scope", "limit", "refused"} {
		s, c := socketPair(t)
		conns = append(conns, c)
		conn, ai, err := creds.ServerHandshake(s)
		switch want {
		case "limit":
			if !errors.Is(err, errdefs.ErrResourceExhausted) {
				t.Fatalf("connection %d: second of tenant a: %v, want resource exhausted", i, err)
			}
			s.Close()
		case "refused":
			if err == nil || !strings.Contains(err.Error(), "no cgroup") {
				t.Fatalf("connection %d: unresolvable tenant: %v", i, err)
			}
			s.Close()
		default:
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			conns = append(conns, conn)
			if got := ai.(AuthInfo).Tenant; got != want {
				t.Fatalf("connection %d: tenant %q, want %q", i, got, want)
			}
		}
	}
	if len(gotCreds) != 4 || gotCreds[0].PID != int32(os.Getpid()) {
		t.Fatalf("tenant func saw %+v", gotCreds)
	}
}

// TestServerHandshakeConnLimit: a uid cannot open more server connections than the limit;
// closing one frees its place.
func TestServerHandshakeConnLimit(t *testing.T) {
	testutil.FDLeakCheck(t)
	creds := &transportCredentials{pin: pinPeerPidfd, conns: newConnLimit(2, 100)}
	var open []net.Conn
	pair := func() (server, client net.Conn) { return socketPair(t) }
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	var handshaken []net.Conn
	for i := range 3 {
		s, c := pair()
		open = append(open, c)
		conn, _, err := creds.ServerHandshake(s)
		if i < 2 {
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			handshaken = append(handshaken, conn)
			continue
		}
		s.Close()
		if !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("connection beyond the limit: %v, want resource exhausted", err)
		}
	}
	handshaken[0].Close()
	s, c := pair()
	open = append(open, c)
	conn, _, err := creds.ServerHandshake(s)
	if err != nil {
		t.Fatalf("after closing one: %v", err)
	}
	conn.Close()
	handshaken[1].Close()
}

// TestConnLimitTotal: besides the per-uid limit, all uids together are bounded.
func TestConnLimitTotal(t *testing.T) {
	l := newConnLimit(2, 3)
	for uid := range uint32(3) {
		if err := l.take(fmt.Sprint(uid), false); err != nil {
			t.Fatalf("uid %d: %v", uid, err)
		}
	}
	if err := l.take("9", false); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("a 4th connection (another uid) = %v, want resource exhausted", err)
	}
	// Root may still connect, up to its reserve, so that an administrator can reach a
	// daemon flooded by other uids.
	for i := range RootConnsReserve {
		if err := l.take(fmt.Sprintf("uid=0,vm%d", i), true); err != nil {
			t.Fatalf("root connection %d beyond the limit, within its reserve: %v", i+1, err)
		}
	}
	if err := l.take("uid=0,x", true); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("root beyond its reserve: %v, want resource exhausted", err)
	}
	for i := range RootConnsReserve {
		l.release(fmt.Sprintf("uid=0,vm%d", i))
	}
	l.release("0")
	if err := l.take("9", false); err != nil {
		t.Fatalf("after a release: %v", err)
	}
}

// TestWithMaxConns: the option sets the total, and the per-tenant limit never exceeds it;
// the stats report what the credentials enforce.
func TestWithMaxConns(t *testing.T) {
	for _, c := range []struct{ n, total, tenant int }{
		{0, MaxConns, MaxConnsPerTenant},
		{256, 256, MaxConnsPerTenant},
		{16, 16, 16},
	} {
		creds := NewTransportCredentials(WithMaxConns(c.n))
		st, ok := Stats(creds)
		if !ok || st.Limit != c.total || st.TenantLimit != c.tenant {
			t.Errorf("WithMaxConns(%d): stats %+v, want limit %d per tenant %d", c.n, st, c.total, c.tenant)
		}
		l := creds.(*transportCredentials).conns
		for i := range c.tenant {
			if err := l.take("t", false); err != nil {
				t.Fatalf("WithMaxConns(%d): connection %d of one tenant: %v", c.n, i+1, err)
			}
		}
		if err := l.take("t", false); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Errorf("WithMaxConns(%d): one more of the tenant = %v, want resource exhausted", c.n, err)
		}
	}
}
