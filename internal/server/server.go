package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/holders"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// maxStreamsPerConn bounds the concurrent RPCs of one client connection.
const maxStreamsPerConn = 64

// DefaultSocket is the conventional path of the control socket.
const DefaultSocket = "/run/mmiobroker/control.sock"

// Options configure a [Server]. The zero value works, but real daemons set ClaimSocket.
type Options struct {
	// ClaimSocket is the path of the claim socket that AllocateLease tells clients to claim
	// their fd on.
	ClaimSocket string
	// AdminGroups are the gids whose members (primary or supplementary) are admins, besides
	// uid 0. Empty: only uid 0 is an admin.
	AdminGroups []uint32
	// Log receives one line per RPC and the panics of handlers. Nil discards.
	Log *slog.Logger
	// UnaryInterceptors and StreamInterceptors wrap every RPC, outermost first, outside
	// the server's own interceptor (caller identification, panic recovery, the log line,
	// domain errors to status codes): they see the status code each client gets. The
	// daemon's gRPC metrics (go-grpc-middleware's providers/prometheus) come in here.
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
	// Identify resolves callers. Nil means [IdentifyPeer] (peer credentials); tests
	// replace it to act as several users over one socket.
	Identify IdentifyFunc
	// Tenant resolves each connecting peer's tenant (internal/tenant) for [IdentifyPeer]
	// and the per-tenant connection limit. Nil: the tenant is the uid.
	Tenant peercred.TenantFunc
	// MaxConns bounds the open connections of all uids together (peercred.WithMaxConns);
	// 0: peercred.MaxConns.
	MaxConns int
	// Host reports the host for GetHost ([HostFunc]). Nil: GetHost is Unimplemented.
	Host HostFunc
	// Holders scans /proc for who holds the leases' dma-bufs (ScanHolders, GetLease with
	// include_holders). Nil: those are Unimplemented.
	Holders *holders.Checker
}

// Server serves the mmiobroker.v1.Broker service, the gRPC health service (SERVING for ""
// and "mmiobroker.v1.Broker" until [Server.Stop]) and server reflection over unix
// sockets, authenticating callers by their peer credentials.
type Server struct {
	g        *grpc.Server
	health   *health.Server
	log      *slog.Logger
	identify IdentifyFunc
	creds    credentials.TransportCredentials // for Conns

	stopOnce sync.Once
	stopping chan struct{} // closed by Stop: ends WatchEvents streams
}

// gRPC server limits (docs/api.md, "Limits").
const (
	maxRecvMsgSize    = 64 << 10
	connectionTimeout = 5 * time.Second
	maxConnectionIdle = 15 * time.Minute
)

// New returns a server for b. Serve it with [Server.Serve]; stop it with [Server.Stop]
// before closing b.
func New(b *broker.Broker, opt Options) *Server {
	s := &Server{
		log:      opt.Log,
		identify: opt.Identify,
		stopping: make(chan struct{}),
		health:   health.NewServer(),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.identify == nil {
		s.identify = IdentifyPeer
	}
	s.creds = peercred.NewTransportCredentials(append(tenantOption(opt.Tenant), peercred.WithMaxConns(opt.MaxConns))...)
	s.g = grpc.NewServer(
		grpc.Creds(s.creds),
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		// Requests are small (the largest, an AllocateLease with 16 ranges, is well under
		// 1 KiB); a client cannot make the daemon buffer more.
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		// A connection must finish its handshake promptly, may not ping more often than
		// every 10 s, and one with no RPC for 15 minutes is closed (a held lease keeps its
		// event stream open, so holders are not idle).
		grpc.ConnectionTimeout(connectionTimeout),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: maxConnectionIdle}),
		grpc.ChainUnaryInterceptor(append(slices.Clone(opt.UnaryInterceptors), s.unaryInterceptor)...),
		grpc.ChainStreamInterceptor(append(slices.Clone(opt.StreamInterceptors), s.streamInterceptor)...),
	)
	brokerv1.RegisterBrokerServer(s.g, &service{
		b:           b,
		adminGroups: append([]uint32(nil), opt.AdminGroups...),
		claimSocket: opt.ClaimSocket,
		stopping:    s.stopping,
		host:        opt.Host,
		holders:     opt.Holders,
	})
	healthpb.RegisterHealthServer(s.g, s.health)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(brokerv1.Broker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	reflection.Register(s.g)
	return s
}

// Conns returns the server's open connections against their limits.
func (s *Server) Conns() peercred.ConnStats {
	st, _ := peercred.Stats(s.creds)
	return st
}

// Serve accepts connections on l until [Server.Stop]; it then returns nil (also when Stop
// came first). It closes l before returning. l must be a unix socket listener (see
// [Listen]): callers are identified by peer credentials. Serve may be called on several
// listeners at once.
func (s *Server) Serve(l net.Listener) error {
	err := s.g.Serve(l)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// Stop stops the server: health turns NOT_SERVING, listeners close, WatchEvents streams
// end with codes.Unavailable, and in-flight unary RPCs may finish until ctx is done, when
// the remaining connections are closed. It returns ctx.Err() if it had to cut RPCs off.
// Stop is idempotent.
func (s *Server) Stop(ctx context.Context) error {
	var err error
	s.stopOnce.Do(func() {
		s.health.Shutdown()
		close(s.stopping)
		done := make(chan struct{})
		go func() {
			s.g.GracefulStop()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			s.g.Stop()
			<-done
			err = ctx.Err()
		}
	})
	return err
}

// Listen listens on a new unix stream socket at path and sets its permissions to perm
// (e.g. 0o660; who may connect is also bounded by the directory's permissions). Until the
// chmod, the socket has the mode the process umask leaves (connecting needs write
// permission, so under the usual umask 022 only the owner can connect meanwhile). A stale
// socket file left by a dead daemon is replaced; a socket with a live listener, or a file
// that is not a socket, is an error wrapping errdefs.ErrAlreadyExists. The socket file is
// removed when the listener closes.
func Listen(path string, perm os.FileMode) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("listen on %s: the file exists and is not a socket: %w", path, errdefs.ErrAlreadyExists)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		switch {
		case err == nil:
			c.Close()
			return nil, fmt.Errorf("listen on %s: another server is listening there: %w", path, errdefs.ErrAlreadyExists)
		case errors.Is(err, syscall.ECONNREFUSED):
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("listen on %s: remove stale socket: %w", path, err)
			}
		default:
			return nil, fmt.Errorf("listen on %s: probe existing socket: %w", path, err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, perm); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return l, nil
}

// unaryInterceptor identifies the caller, recovers from handler panics and logs the RPC.
func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	start := time.Now()
	var id Identity
	identified := false
	defer func() {
		if r := recover(); r != nil {
			resp, err = nil, s.panicked(info.FullMethod, r)
		}
		s.logRPC(info.FullMethod, id, identified, start, err)
	}()
	id, err = s.identify(ctx)
	if err != nil {
		return nil, unauthenticated(err)
	}
	identified = true
	resp, err = handler(context.WithValue(ctx, identityKey{}, id), req)
	return resp, toStatus(err)
}

// streamInterceptor is unaryInterceptor for streams.
func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	start := time.Now()
	var id Identity
	identified := false
	defer func() {
		if r := recover(); r != nil {
			err = s.panicked(info.FullMethod, r)
		}
		s.logRPC(info.FullMethod, id, identified, start, err)
	}()
	id, err = s.identify(ss.Context())
	if err != nil {
		return unauthenticated(err)
	}
	identified = true
	return toStatus(handler(srv, &identityStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), identityKey{}, id)}))
}

// identityStream is a server stream whose context carries the caller's Identity.
type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

func unauthenticated(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codes.Unauthenticated, err.Error())
}

// panicked logs a handler panic and returns the status the client gets instead.
func (s *Server) panicked(method string, r any) error {
	s.log.Error("panic in rpc handler", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	return status.Errorf(codes.Internal, "internal error in %s; the daemon logged the details", method)
}

// logRPC writes the one log line of an RPC: Error for server faults, Info for the other
// failures, Debug for successful calls. What a successful call changed has its own line
// from the broker ("lease allocated", "lease ended", …) and every call is counted by
// method and code in the metrics (grpc_server_handled_total), so an Info line per
// successful call would only double the log (and cost the lease path a write each).
func (s *Server) logRPC(method string, id Identity, identified bool, start time.Time, err error) {
	code := status.Code(err)
	level := slog.LevelInfo
	switch {
	case code == codes.Internal, code == codes.Unknown, code == codes.DataLoss:
		level = slog.LevelError
	case code == codes.OK:
		level = slog.LevelDebug
	}
	if !s.log.Enabled(context.Background(), level) {
		return
	}
	attrs := []slog.Attr{
		slog.String("method", method),
		slog.String("code", code.String()),
		slog.Duration("duration", time.Since(start)),
	}
	if identified {
		attrs = append(attrs, slog.Int64("uid", int64(id.UID)), slog.Int64("client_pid", int64(id.PID)))
	}
	if err != nil {
		attrs = append(attrs, slog.String("err", status.Convert(err).Message()))
	}
	s.log.LogAttrs(context.Background(), level, "rpc", attrs...)
}

// tenantOption is the peercred option for f, none if f is nil.
func tenantOption(f peercred.TenantFunc) []peercred.Option {
	if f == nil {
		return nil
	}
	return []peercred.Option{peercred.WithTenant(f)}
}
