package peercred

import (
	"context"
	"fmt"
	"net"
	"sync"
	"syscall"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// AuthType is what [AuthInfo.AuthType] returns.
const AuthType = "peercred"

// AuthInfo is the gRPC auth info of a connection over a unix socket: the peer's
// credentials and, on the server, the peer process pinned by a pidfd.
//
// Process belongs to the connection and is closed when the connection closes; it is nil
// on the client side. A handler that keeps the process beyond its RPC must [Process.Dup]
// it.
type AuthInfo struct {
	credentials.CommonAuthInfo
	// Creds are the peer's credentials from SO_PEERCRED and SO_PEERGROUPS.
	Creds Creds
	// Process is the peer process (server side only; borrowed from the connection).
	Process *Process
	// Tenant is the peer's tenant identity as the [TenantFunc] given with [WithTenant]
	// resolved it at connect time (server side only), or "uid=<uid>" without one.
	Tenant string
}

// TenantFunc resolves the tenant of a connecting peer from its credentials, its pinned
// process and its socket (for SO_PEERSEC). An error refuses the connection.
type TenantFunc func(c Creds, p *Process, rc syscall.RawConn) (string, error)

// Option configures [NewTransportCredentials].
type Option func(*transportCredentials)

// WithTenant makes the server handshake resolve each peer's tenant with f: it is put in
// [AuthInfo.Tenant], and the per-peer connection limit counts per tenant instead of per
// uid (the VMMs of a host often share one uid).
func WithTenant(f TenantFunc) Option {
	return func(c *transportCredentials) { c.tenant = f }
}

// AuthType returns [AuthType].
func (AuthInfo) AuthType() string { return AuthType }

// FromContext returns the [AuthInfo] of the connection an RPC arrived on, and false if
// the RPC did not arrive through credentials from [NewTransportCredentials].
func FromContext(ctx context.Context) (AuthInfo, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return AuthInfo{}, false
	}
	ai, ok := p.AuthInfo.(AuthInfo)
	return ai, ok
}

// NewTransportCredentials returns gRPC transport credentials for AF_UNIX sockets. They
// encrypt nothing (the bytes never leave the kernel) and authenticate the peer by its
// kernel-reported credentials.
//
// The server handshake reads the client's [Creds], pins its [Process] and rejects
// connections that are not AF_UNIX sockets. The connection it hands to gRPC closes the
// Process when gRPC closes the connection. (If gRPC fails between the handshake and
// setting up the transport, it closes only the raw socket; the Process is then closed when
// the garbage collector finds it unreachable, as every *os.File is.)
//
// The client handshake passes the connection through unchanged and reports the server's
// Creds (without a Process), so a client can check that it talks to the expected daemon;
// it too rejects connections that are not AF_UNIX sockets.
//
// The security level is [credentials.PrivacyAndIntegrity], as grpc's own local
// credentials report for unix sockets: nothing outside the kernel can read or change the
// traffic.
func NewTransportCredentials(opts ...Option) credentials.TransportCredentials {
	c := &transportCredentials{pin: pinPeerPidfd, conns: newConnLimit(MaxConnsPerTenant, MaxConns)}
	for _, o := range opts {
		o(c)
	}
	return c
}

// RootConnsReserve is how many connections beyond MaxConns uid 0 may still open, so that
// an administrator can always reach a daemon that other uids flood to its limit.
const RootConnsReserve = 16

// MaxConnsPerTenant bounds the connections one tenant (one uid without [WithTenant]) may
// have open to a server using [NewTransportCredentials]: each pins a pidfd, and the
// daemon's fds must not run out.
const MaxConnsPerTenant = 128

// MaxConns bounds the connections all uids together may have open, unless
// [WithMaxConns] sets another bound: per-uid limits alone let many uids exhaust the
// daemon's fds (each connection costs two), and a device cycle that cannot reopen its
// device for lack of an fd loses every lease of the device.
const MaxConns = 1024

// WithMaxConns bounds the connections all uids together may have open to n instead of
// [MaxConns] (n > 0); one tenant may have at most [MaxConnsPerTenant] of them, or n if
// that is less.
func WithMaxConns(n int) Option {
	return func(c *transportCredentials) {
		if n > 0 {
			c.conns = newConnLimit(min(MaxConnsPerTenant, n), n)
		}
	}
}

type transportCredentials struct {
	pin    pinMode    // pinFallback forces the pre-6.5 path (tests)
	conns  *connLimit // shared by clones
	tenant TenantFunc // nil: the tenant is the uid
}

// connLimit counts the open server connections of each tenant and of all.
type connLimit struct {
	max, maxTotal int
	mu            sync.Mutex
	byTenant      map[string]int // guarded by mu
	total         int            // guarded by mu
	refused       uint64         // connections refused at a limit; guarded by mu
}

func newConnLimit(max, maxTotal int) *connLimit {
	return &connLimit{max: max, maxTotal: maxTotal, byTenant: map[string]int{}}
}

// take counts a new connection of tenant, or says why it cannot be taken.
func (l *connLimit) take(tenant string, root bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	total := l.maxTotal
	if root {
		total += RootConnsReserve
	}
	switch {
	case l.byTenant[tenant] >= l.max:
		l.refused++
		return fmt.Errorf("tenant %s has %d connections open, the limit: %w", tenant, l.max, errdefs.ErrResourceExhausted)
	case l.total >= total:
		l.refused++
		return fmt.Errorf("the daemon has %d connections open, the limit: %w", l.maxTotal, errdefs.ErrResourceExhausted)
	}
	l.byTenant[tenant]++
	l.total++
	return nil
}

func (l *connLimit) release(tenant string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.byTenant[tenant]--; l.byTenant[tenant] <= 0 {
		delete(l.byTenant, tenant)
	}
}

// ConnStats counts the server connections of transport credentials from
// [NewTransportCredentials], against their limits ([Stats]).
type ConnStats struct {
	// Open is how many connections are open; Limit is [MaxConns].
	Open, Limit int
	// TenantMax is how many connections the tenant with the most has open; TenantLimit
	// is [MaxConnsPerTenant].
	TenantMax, TenantLimit int
	// Refused counts the connections refused at either limit.
	Refused uint64
}

// Stats returns the connection counts of c, transport credentials from
// [NewTransportCredentials] (or a clone); false for other credentials.
func Stats(c credentials.TransportCredentials) (ConnStats, bool) {
	tc, ok := c.(*transportCredentials)
	if !ok || tc.conns == nil {
		return ConnStats{}, false
	}
	l := tc.conns
	l.mu.Lock()
	defer l.mu.Unlock()
	st := ConnStats{Open: l.total, Limit: l.maxTotal, TenantLimit: l.max, Refused: l.refused}
	for _, n := range l.byTenant {
		st.TenantMax = max(st.TenantMax, n)
	}
	return st, true
}

func (*transportCredentials) common() credentials.CommonAuthInfo {
	return credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}
}

// ClientHandshake passes conn through and reports the server's credentials.
func (c *transportCredentials) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	creds, _, err := fromSyscallConn(conn, pinNone)
	if err != nil {
		return nil, nil, fmt.Errorf("peercred client handshake: %w", err)
	}
	return conn, AuthInfo{CommonAuthInfo: c.common(), Creds: creds}, nil
}

// ServerHandshake reads the client's credentials and pins its process.
func (c *transportCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	creds, proc, err := fromSyscallConn(conn, c.pin)
	if err != nil {
		return nil, nil, fmt.Errorf("peercred server handshake from %v: %w", conn.RemoteAddr(), err)
	}
	tenant := fmt.Sprintf("uid=%d", creds.UID)
	if c.tenant != nil {
		rc, err := conn.(syscall.Conn).SyscallConn() // fromSyscallConn checked it is one
		if err == nil {
			tenant, err = c.tenant(creds, proc, rc)
		}
		if err != nil {
			proc.Close()
			return nil, nil, fmt.Errorf("peercred server handshake: tenant of uid %d pid %d: %w", creds.UID, creds.PID, err)
		}
	}
	if c.conns != nil {
		if err := c.conns.take(tenant, creds.UID == 0); err != nil {
			proc.Close()
			return nil, nil, fmt.Errorf("peercred server handshake: %w", err)
		}
	}
	wrapped := &procConn{Conn: conn, proc: proc, tenant: tenant, conns: c.conns}
	return wrapped, AuthInfo{CommonAuthInfo: c.common(), Creds: creds, Process: proc, Tenant: tenant}, nil
}

// Info describes the protocol.
func (*transportCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: AuthType}
}

// Clone returns a copy.
func (c *transportCredentials) Clone() credentials.TransportCredentials {
	cc := *c
	return &cc
}

// OverrideServerName does nothing: unix sockets have no server name to verify.
func (*transportCredentials) OverrideServerName(string) error { return nil }

// procConn is a server connection that owns its peer's Process.
type procConn struct {
	net.Conn
	proc   *Process
	tenant string
	conns  *connLimit // nil: not counted
	once   sync.Once
	err    error
}

// Close closes the connection and then the peer's pidfd.
func (c *procConn) Close() error {
	c.once.Do(func() {
		c.err = c.Conn.Close()
		c.proc.Close()
		if c.conns != nil {
			c.conns.release(c.tenant)
		}
	})
	return c.err
}

// SyscallConn exposes the socket, as the unwrapped connection does.
func (c *procConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%T has no SyscallConn", c.Conn)
	}
	return sc.SyscallConn()
}
