package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// fakeClaimer calls claim and records deliveries.
type fakeClaimer struct {
	claim func(ctx context.Context, req Request, peer Peer) (Grant, *os.File, error)

	mu        sync.Mutex
	delivered []error // guarded by mu
}

func (c *fakeClaimer) Claim(ctx context.Context, req Request, peer Peer) (Grant, *os.File, error) {
	return c.claim(ctx, req, peer)
}

func (c *fakeClaimer) Delivered(_ Request, _ Grant, _ Peer, err error) {
	c.mu.Lock()
	c.delivered = append(c.delivered, err)
	c.mu.Unlock()
}

func (c *fakeClaimer) deliveries() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]error(nil), c.delivered...)
}

// neverClaimer fails the test if the server asks it anything.
func neverClaimer(t *testing.T) *fakeClaimer {
	return &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
		t.Error("the claimer was asked about an invalid request")
		return Grant{}, nil, errdefs.ErrInvalidArgument
	}}
}

type testServer struct {
	path string
	srv  *Server
	stop func() error // cancels Serve and returns its result; idempotent
}

func startServer(t testing.TB, c Claimer, opt Options) *testServer {
	t.Helper()
	return serveOn(t, listenTest(t), c, opt)
}

// listenTest creates a claim socket in a temporary directory.
func listenTest(t testing.TB) *net.UnixListener {
	t.Helper()
	l, err := Listen(testutil.ShortTempDir(t)+"/fd.sock", 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// serveOn runs Serve on l until the test ends.
func serveOn(t testing.TB, l *net.UnixListener, c Claimer, opt Options) *testServer {
	t.Helper()
	path := l.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(c, opt)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, l) }()
	ts := &testServer{path: path, srv: srv, stop: sync.OnceValue(func() error {
		cancel()
		return <-errc
	})}
	t.Cleanup(func() {
		if err := ts.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestClaimSuccess(t *testing.T) {
	testutil.FDLeakCheck(t)
	const content = "bar contents"
	buf := memfd(t, content)
	fc := &fakeClaimer{claim: func(_ context.Context, req Request, peer Peer) (Grant, *os.File, error) {
		if req != exampleRequest {
			t.Errorf("claimer got %+v, want %+v", req, exampleRequest)
		}
		if peer.PID != int32(os.Getpid()) || peer.UID != uint32(os.Geteuid()) || peer.GID != uint32(os.Getegid()) {
			t.Errorf("peer = %+v, want this process (pid %d uid %d)", peer, os.Getpid(), os.Geteuid())
		}
		if peer.Process == nil || peer.Process.PID() != peer.PID || !peer.Process.Alive() {
			t.Errorf("peer.Process does not pin the live peer")
		}
		f, err := dup(buf)
		return Grant{Generation: 3, Size: 4096, BDF: "0000:00:03.0", BAR: 2}, f, err
	}}
	ts := startServer(t, fc, Options{})
	f, rep, err := Claim(testCtx(t), ts.path, exampleRequest.LeaseID, exampleRequest.Token)
	if err != nil {
		t.Fatalf("Claim: %v", err)
	}
	defer f.Close()
	want := Reply{Code: CodeOK, LeaseID: exampleRequest.LeaseID, Generation: 3, Size: 4096,
		Inode: inodeOf(t, buf), BDF: "0000:00:03.0", BAR: 2}
	if diff := cmp.Diff(want, rep); diff != "" {
		t.Errorf("reply (-want +got):\n%s", diff)
	}
	got := make([]byte, len(content))
	if _, err := f.ReadAt(got, 0); err != nil || string(got) != content {
		t.Errorf("received fd reads %q, %v; want %q", got, err, content)
	}
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("received fd flags %#x, %v: want FD_CLOEXEC", fl, err)
	}
	ts.stop()
	if d := fc.deliveries(); len(d) != 1 || d[0] != nil {
		t.Errorf("Delivered reports = %v, want one nil", d)
	}
}

func TestClaimErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, "x")
	type result struct {
		grant Grant
		file  bool
		err   error
	}
	for _, tc := range []struct {
		name     string
		res      result
		code     Code
		class    error
		msgPart  string
		reported bool // Delivered is called (a file was granted)
	}{
		{"not found", result{err: fmt.Errorf("lease L: %w", errdefs.ErrNotFound)}, CodeNotFound, errdefs.ErrNotFound, "lease L", false},
		{"bad token", result{err: WithCode(CodeBadToken, errors.New("token mismatch"))}, CodeBadToken, errdefs.ErrPermissionDenied, "token mismatch", false},
		{"token used", result{err: fmt.Errorf("claimed already: %w", errdefs.ErrAlreadyExists)}, CodeBadToken, errdefs.ErrPermissionDenied, "claimed already", false},
		{"expired", result{err: fmt.Errorf("token expired: %w", errdefs.ErrDeadlineExceeded)}, CodeExpired, errdefs.ErrDeadlineExceeded, "token expired", false},
		{"wrong process", result{err: fmt.Errorf("pid 7 is not the holder: %w", errdefs.ErrPermissionDenied)}, CodePermissionDenied, errdefs.ErrPermissionDenied, "pid 7", false},
		{"lease ended", result{err: fmt.Errorf("lease revoked: %w", errdefs.ErrFailedPrecondition)}, CodeFailedPrecondition, errdefs.ErrFailedPrecondition, "revoked", false},
		{"invalid", result{err: fmt.Errorf("bad id: %w", errdefs.ErrInvalidArgument)}, CodeInvalidRequest, errdefs.ErrInvalidArgument, "bad id", false},
		{"exhausted", result{err: fmt.Errorf("limit: %w", errdefs.ErrResourceExhausted)}, CodeResourceExhausted, errdefs.ErrResourceExhausted, "limit", false},
		{"unavailable", result{err: fmt.Errorf("device gone: %w", errdefs.ErrUnavailable)}, CodeUnavailable, errdefs.ErrUnavailable, "device gone", false},
		{"internal", result{err: errors.New("secret detail")}, CodeInternal, nil, "internal error", false},
		{"error and file", result{file: true, err: errdefs.ErrNotFound}, CodeNotFound, errdefs.ErrNotFound, "not found", true},
		{"no file", result{}, CodeInternal, nil, "internal error", false},
		{"inode mismatch", result{grant: Grant{Inode: 1}, file: true}, CodeInternal, nil, "internal error", true},
		{"bad bdf", result{grant: Grant{BDF: "has space"}, file: true}, CodeInternal, nil, "internal error", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc := &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
				var f *os.File
				if tc.res.file {
					var err error
					if f, err = dup(buf); err != nil {
						t.Fatal(err)
					}
				}
				return tc.res.grant, f, tc.res.err
			}}
			ts := startServer(t, fc, Options{})
			f, rep, err := Claim(testCtx(t), ts.path, "L", "T")
			if f != nil {
				f.Close()
				t.Fatal("Claim returned a file")
			}
			re, ok := errors.AsType[*ReplyError](err)
			if !ok {
				t.Fatalf("err = %v, want a *ReplyError", err)
			}
			if re.Code != tc.code || rep.Code != tc.code {
				t.Errorf("code = %s (reply %s), want %s", re.Code, rep.Code, tc.code)
			}
			if tc.class != nil && !errors.Is(err, tc.class) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.class)
			}
			if !strings.Contains(rep.Message, tc.msgPart) || strings.Contains(rep.Message, "secret") {
				t.Errorf("message %q, want it to contain %q (and no internals)", rep.Message, tc.msgPart)
			}
			if rep.LeaseID != "L" {
				t.Errorf("error reply lease id %q, want the request's", rep.LeaseID)
			}
			ts.stop()
			if d := fc.deliveries(); (len(d) == 1) != tc.reported || (len(d) == 1 && d[0] == nil) {
				t.Errorf("Delivered reports = %v, want reported=%v with an error", d, tc.reported)
			}
		})
	}
}

// rawConn dials the claim socket without the client library.
func rawConn(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return c
}

// readReply reads one reply and fails if it carries fds.
func readReply(t *testing.T, c *net.UnixConn) (Reply, error) {
	t.Helper()
	buf := make([]byte, MaxReplySize+1)
	oob := make([]byte, unix.CmsgSpace(4*maxReplyFDs))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if fds := ParseRights(oob[:oobn]); len(fds) > 0 {
		closeRights(oob[:oobn])
		t.Errorf("reply carries %d fds", len(fds))
	}
	if err != nil {
		return Reply{}, err
	}
	return DecodeReply(buf[:n])
}

func TestServerRejectsMalformed(t *testing.T) {
	testutil.FDLeakCheck(t)
	ts := startServer(t, neverClaimer(t), Options{})
	good, _ := EncodeRequest(Request{LeaseID: "L", Token: "T"})
	v2 := req(Magic, 2, TypeRequest, -1, 0, 1, 1, "LT")
	for _, tc := range []struct {
		name string
		msg  []byte
		code Code
	}{
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n"), CodeInvalidRequest},
		{"one byte", []byte{0}, CodeInvalidRequest},
		{"bad magic", append([]byte("XXXX"), good[4:]...), CodeInvalidRequest},
		{"reply type", func() []byte { b, _ := EncodeReply(Reply{Code: CodeInternal}); return b }(), CodeInvalidRequest},
		{"version 2", v2, CodeUnsupportedVersion},
		{"oversized", append(good, make([]byte, 4096)...), CodeInvalidRequest},
		{"oversized 64k", make([]byte, 65536), CodeInvalidRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rawConn(t, ts.path)
			if _, err := c.Write(tc.msg); err != nil {
				t.Fatal(err)
			}
			rep, err := readReply(t, c)
			if err != nil {
				t.Fatalf("reading the reply: %v", err)
			}
			if rep.Code != tc.code {
				t.Errorf("code %s (%q), want %s", rep.Code, rep.Message, tc.code)
			}
		})
	}
	t.Run("empty message", func(t *testing.T) {
		// A zero-length datagram reads as end of file: the server hangs up.
		c := rawConn(t, ts.path)
		if _, err := c.Write(nil); err != nil {
			t.Fatal(err)
		}
		if _, err := readReply(t, c); !errors.Is(err, io.EOF) {
			t.Errorf("read = %v, want EOF", err)
		}
	})
	ts.stop()
}

// withoutPassRights makes a server behave as on a kernel without SO_PASSRIGHTS.
func withoutPassRights(o Options) Options {
	o.noPassRights = true
	return o
}

// setPassRights sets SO_PASSRIGHTS on a listener.
func setPassRights(l *net.UnixListener, v int) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSRIGHTS, v) }); err != nil {
		return err
	}
	return serr
}

// kernelHasPassRights reports whether the kernel knows SO_PASSRIGHTS (Linux 6.16+).
func kernelHasPassRights(t testing.TB) bool {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSRIGHTS, 0) == nil
}

// A client that attaches fds to its request gets the documented answer (EPERM from its
// own sendmsg with SO_PASSRIGHTS, INVALID_REQUEST without), and the server holds none of
// them: the pipe's read end sees EOF once the client closes its write end.
func TestServerRefusesClientFds(t *testing.T) {
	good, _ := EncodeRequest(Request{LeaseID: "L", Token: "T"})
	for _, tc := range []struct {
		name     string
		fallback bool
	}{
		{"passrights", false},
		{"no-passrights", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.fallback && !kernelHasPassRights(t) {
				t.Skip("the kernel has no SO_PASSRIGHTS (Linux 6.16+)")
			}
			testutil.FDLeakCheck(t)
			opt := Options{}
			if tc.fallback {
				opt = withoutPassRights(opt)
			}
			asked := 0
			fc := &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
				asked++
				return Grant{}, nil, errdefs.ErrNotFound
			}}
			l := listenTest(t)
			if tc.fallback {
				// As on a kernel without SO_PASSRIGHTS: Listen set it, undo that.
				if err := setPassRights(l, 1); err != nil && kernelHasPassRights(t) {
					t.Fatal(err)
				}
			}
			ts := serveOn(t, l, fc, opt)
			for i := range 3 { // more than one, and with several fds
				r, w, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				c := rawConn(t, ts.path)
				_, _, err = c.WriteMsgUnix(good, unix.UnixRights(int(w.Fd()), int(w.Fd()), int(r.Fd())), nil)
				w.Close()
				if !tc.fallback {
					if !errors.Is(err, unix.EPERM) {
						t.Errorf("request %d: sendmsg with SCM_RIGHTS = %v, want EPERM", i, err)
					}
				} else {
					if err != nil {
						t.Fatalf("request %d: sendmsg: %v", i, err)
					}
					rep, err := readReply(t, c)
					if err != nil || rep.Code != CodeInvalidRequest || !strings.Contains(rep.Message, "fds") {
						t.Errorf("request %d: reply %v %q, %v; want INVALID_REQUEST about fds", i, rep.Code, rep.Message, err)
					}
				}
				r.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := r.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
					t.Errorf("request %d: pipe read = %d, %v; want EOF (the server holds the write end)", i, n, err)
				}
				r.Close()
				c.Close()
			}
			// The server still serves claims, and asked the claimer about none of the above.
			if _, _, err := Claim(testCtx(t), ts.path, "L", "T"); !errors.Is(err, errdefs.ErrNotFound) {
				t.Errorf("honest claim: %v, want NOT_FOUND from the claimer", err)
			}
			ts.stop()
			if asked != 1 {
				t.Errorf("the claimer was asked %d times, want once (the honest claim)", asked)
			}
		})
	}
}

func TestServerReadTimeout(t *testing.T) {
	testutil.FDLeakCheck(t)
	ts := startServer(t, neverClaimer(t), Options{ReadTimeout: 50 * time.Millisecond})
	c := rawConn(t, ts.path)
	// Silent client: the server gives up and hangs up without a reply.
	if _, err := readReply(t, c); !errors.Is(err, io.EOF) {
		t.Errorf("read = %v, want EOF", err)
	}
}

func TestServerShutdownWithClients(t *testing.T) {
	testutil.FDLeakCheck(t)
	entered := make(chan struct{})
	fc := &fakeClaimer{claim: func(ctx context.Context, _ Request, _ Peer) (Grant, *os.File, error) {
		close(entered)
		<-ctx.Done()
		return Grant{}, nil, ctx.Err()
	}}
	ts := startServer(t, fc, Options{ReadTimeout: time.Hour, WriteTimeout: time.Hour})
	var silent []*net.UnixConn
	for range 4 {
		silent = append(silent, rawConn(t, ts.path))
	}
	claimErr := make(chan error, 1)
	go func() {
		_, _, err := Claim(testCtx(t), ts.path, "L", "T")
		claimErr <- err
	}()
	<-entered

	served := make(chan error, 1)
	go func() { served <- ts.stop() }()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve = %v, want nil after cancellation", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Serve did not return after cancellation with clients connected")
	}
	if err := <-claimErr; !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("claim in progress at shutdown: %v, want ErrUnavailable", err)
	}
	for i, c := range silent {
		if _, err := readReply(t, c); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("silent client %d: read = %v, want the connection closed", i, err)
		}
	}
	if _, _, err := Claim(testCtx(t), ts.path, "L", "T"); err == nil {
		t.Error("Claim after shutdown succeeded")
	}
}

func TestServerMaxConns(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, "x")
	entered, release := make(chan struct{}), make(chan struct{})
	fc := &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
		close(entered)
		<-release
		f, err := dup(buf)
		return Grant{}, f, err
	}}
	ts := startServer(t, fc, Options{MaxConns: 1})
	first := make(chan error, 1)
	go func() {
		f, _, err := Claim(testCtx(t), ts.path, "L", "T")
		if f != nil {
			f.Close()
		}
		first <- err
	}()
	<-entered
	_, rep, err := Claim(testCtx(t), ts.path, "L2", "T2")
	if !errors.Is(err, errdefs.ErrResourceExhausted) || rep.Code != CodeResourceExhausted {
		t.Errorf("claim beyond MaxConns: %v (code %s), want RESOURCE_EXHAUSTED", err, rep.Code)
	}
	close(release)
	if err := <-first; err != nil {
		t.Errorf("first claim: %v", err)
	}
}

// holdFirstClaim starts a server with opt and a claim of lease "L" that holds its claim
// slot until finish is called; finish returns that claim's error.
func holdFirstClaim(t *testing.T, opt Options) (ts *testServer, finish func() error) {
	t.Helper()
	buf := memfd(t, "x")
	entered, release := make(chan struct{}), make(chan struct{})
	fc := &fakeClaimer{claim: func(_ context.Context, req Request, _ Peer) (Grant, *os.File, error) {
		if req.LeaseID == "L" {
			close(entered)
			<-release
		}
		f, err := dup(buf)
		return Grant{}, f, err
	}}
	ts = startServer(t, fc, opt)
	first := make(chan error, 1)
	go func() {
		f, _, err := Claim(testCtx(t), ts.path, "L", "T")
		if f != nil {
			f.Close()
		}
		first <- err
	}()
	<-entered
	return ts, func() error {
		close(release)
		return <-first
	}
}

// TestServerTenantShare: a tenant takes free slots beyond its share only while more than
// a share's worth stays free: alone on a server of 4 slots with a share of 1 it gets 3
// claims at once, its 4th is refused, and another tenant still gets the last slot.
func TestServerTenantShare(t *testing.T) {
	testutil.FDLeakCheck(t)
	var tenant atomic.Value
	tenant.Store("A")
	buf := memfd(t, "x")
	var entered sync.WaitGroup
	release := make(chan struct{})
	fc := &fakeClaimer{claim: func(_ context.Context, req Request, _ Peer) (Grant, *os.File, error) {
		if strings.HasPrefix(req.LeaseID, "hold") {
			entered.Done()
			<-release
		}
		f, err := dup(buf)
		return Grant{}, f, err
	}}
	ts := startServer(t, fc, Options{MaxConns: 4, MaxConnsPerTenant: 1,
		TenantOf: func(uint32, int32) string { return tenant.Load().(string) }})
	held := make(chan error, 3)
	for i := range 3 {
		entered.Add(1)
		go func() {
			f, _, err := Claim(testCtx(t), ts.path, fmt.Sprintf("hold%d", i), "T")
			if f != nil {
				f.Close()
			}
			held <- err
		}()
		entered.Wait() // tenant A's claim i is in progress: slot taken
	}
	_, rep, err := Claim(testCtx(t), ts.path, "A4", "T")
	if !errors.Is(err, errdefs.ErrResourceExhausted) || rep.Code != CodeResourceExhausted || !strings.Contains(rep.Message, "beyond 1 per tenant") {
		t.Errorf("tenant A's 4th claim with one slot left: %v (code %s, %q), want RESOURCE_EXHAUSTED", err, rep.Code, rep.Message)
	}
	if st := ts.srv.Stats(); st.InProgress != 3 || st.TenantMax != 3 || st.Rejected != 1 {
		t.Errorf("stats %+v, want 3 in progress, 3 for tenant A, 1 rejected", st)
	}
	tenant.Store("B")
	f, _, err := Claim(testCtx(t), ts.path, "B1", "T")
	if err != nil {
		t.Errorf("tenant B's claim on the last slot: %v", err)
	} else {
		f.Close()
	}
	close(release)
	for range 3 {
		if err := <-held; err != nil {
			t.Errorf("held claim: %v", err)
		}
	}
}

// TestServerShareAtTheLimit: with 2 slots and a share of 1, a tenant holding one claim may
// not take the last slot (it is the others' share).
func TestServerShareAtTheLimit(t *testing.T) {
	testutil.FDLeakCheck(t)
	ts, finish := holdFirstClaim(t, Options{MaxConns: 2, MaxConnsPerTenant: 1})
	_, rep, err := Claim(testCtx(t), ts.path, "L2", "T2")
	if !errors.Is(err, errdefs.ErrResourceExhausted) || rep.Code != CodeResourceExhausted {
		t.Errorf("second claim of the same uid with one slot left: %v (code %s, %q), want RESOURCE_EXHAUSTED", err, rep.Code, rep.Message)
	}
	if err := finish(); err != nil {
		t.Errorf("first claim: %v", err)
	}
}

// TestServerTenantOf: with TenantOf, two tenants of one uid (two VMs of the qemu user)
// each get their own claim slots.
func TestServerTenantOf(t *testing.T) {
	testutil.FDLeakCheck(t)
	var mu sync.Mutex
	calls := 0
	tenantOf := func(uid uint32, pid int32) string {
		mu.Lock()
		defer mu.Unlock()
		calls++
		return fmt.Sprintf("uid=%d,cgroup=/machine.slice/vm%d.scope", uid, calls)
	}
	ts, finish := holdFirstClaim(t, Options{MaxConns: 8, MaxConnsPerTenant: 1, TenantOf: tenantOf})
	f, _, err := Claim(testCtx(t), ts.path, "L2", "T2")
	if err != nil {
		t.Errorf("claim of another tenant of the same uid while the first holds its only slot: %v", err)
	} else {
		f.Close()
	}
	if err := finish(); err != nil {
		t.Errorf("first claim: %v", err)
	}
}

func TestServeRejectsStreamSocket(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := testutil.ShortTempDir(t) + "/stream.sock"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	err = NewServer(neverClaimer(t), Options{}).Serve(context.Background(), l)
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Serve(stream listener) = %v, want ErrInvalidArgument", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("listener still open after Serve returned: %v", err)
	}
}

func TestServeListenerClosed(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := testutil.ShortTempDir(t) + "/fd.sock"
	l, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := NewServer(neverClaimer(t), Options{}).Serve(context.Background(), l); err == nil {
		t.Error("Serve on a closed listener returned nil")
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := testutil.ShortTempDir(t) + "/fd.sock"
	l1, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, 0o600); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Listen over a live socket: %v, want ErrAlreadyExists", err)
	}
	l1.SetUnlinkOnClose(false)
	l1.Close()
	l2, err := Listen(path, 0o660)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l2.Close()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, %v; want 0660", fi.Mode(), err)
	}
	// A regular file is not removed.
	reg := testutil.ShortTempDir(t) + "/file"
	if err := os.WriteFile(reg, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if l, err := Listen(reg, 0o600); err == nil {
		l.Close()
		t.Error("Listen replaced a regular file")
	}
}

// TestDeliveryToVanishedClient: the client hangs up while the claimer works; the
// server's sendmsg fails, the Claimer hears about it, and the fd is closed.
func TestDeliveryToVanishedClient(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, "x")
	entered, release := make(chan struct{}), make(chan struct{})
	fc := &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
		close(entered)
		<-release
		f, err := dup(buf)
		return Grant{}, f, err
	}}
	ts := startServer(t, fc, Options{})
	c := rawConn(t, ts.path)
	good, _ := EncodeRequest(Request{LeaseID: "L", Token: "T"})
	if _, err := c.Write(good); err != nil {
		t.Fatal(err)
	}
	<-entered
	c.Close()
	close(release)
	ts.stop()
	if d := fc.deliveries(); len(d) != 1 || d[0] == nil {
		t.Errorf("Delivered reports = %v, want one error", d)
	}
}

func TestConcurrentClaims(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, "x")
	ino := inodeOf(t, buf)
	fc := &fakeClaimer{claim: func(_ context.Context, req Request, _ Peer) (Grant, *os.File, error) {
		f, err := dup(buf)
		return Grant{Generation: uint64(len(req.LeaseID))}, f, err
	}}
	ts := startServer(t, fc, Options{})
	const n = 16
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			id := strings.Repeat("L", i+1)
			f, rep, err := Claim(testCtx(t), ts.path, id, "T")
			if err != nil {
				t.Errorf("claim %d: %v", i, err)
				return
			}
			f.Close()
			if rep.Inode != ino || rep.Generation != uint64(i+1) || rep.LeaseID != id {
				t.Errorf("claim %d: reply %+v", i, rep)
			}
		})
	}
	wg.Wait()
}

func TestCodeOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Code
	}{
		{nil, CodeOK},
		{context.Canceled, CodeUnavailable},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), CodeUnavailable},
		{WithCode(CodeExpired, errdefs.ErrNotFound), CodeExpired},
		{fmt.Errorf("wrapped: %w", WithCode(CodeBadToken, errors.New("t"))), CodeBadToken},
		{errdefs.ErrNotSupported, CodeInternal},
		{ErrUnsupportedVersion, CodeUnsupportedVersion},
	} {
		if got := CodeOf(tc.err); got != tc.want {
			t.Errorf("CodeOf(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
	if WithCode(CodeInternal, nil) != nil {
		t.Error("WithCode(_, nil) != nil")
	}
	if got := Code(77).String(); got != "CODE_77" {
		t.Errorf("Code(77) = %q", got)
	}
	unknown := &ReplyError{Code: 77}
	for _, class := range []error{errdefs.ErrNotFound, errdefs.ErrInvalidArgument, errdefs.ErrPermissionDenied} {
		if errors.Is(unknown, class) {
			t.Errorf("unknown code matches %v", class)
		}
	}
}
