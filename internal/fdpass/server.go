package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// DefaultSocketPath is where mmiobrokerd listens for claims.
const DefaultSocketPath = "/run/mmiobroker/fd.sock"

// Peer is the process that sent a claim, as the kernel identifies it.
type Peer struct {
	// UID, GID and Groups are the peer's credentials at connect time.
	UID, GID uint32
	Groups   []uint32
	// PID is the peer's process ID.
	PID int32
	// Process pins the peer by pidfd. It is borrowed: valid only during the Claim call;
	// Dup it to keep it.
	Process *peercred.Process
}

// Grant describes the fd a Claimer hands out. LeaseID may be left empty (the request's
// is used) and so may Inode (the server fills it from fstat of the fd).
type Grant struct {
	LeaseID    string
	Generation uint64
	Size       uint64
	Inode      uint64
	BDF        string
	BAR        uint32
}

// Claimer decides claims. The broker implements it through a small adapter; fdpass
// knows nothing about leases.
type Claimer interface {
	// Claim checks req against the lease and peer (same process that allocated the
	// lease, token valid and unused, lease claimable) and returns the fd to deliver. The
	// server takes ownership of the returned file, also when err is not nil, and closes
	// it after sending. Classify errors with errdefs classes or [WithCode]; see [CodeOf].
	// ctx ends when the server shuts down.
	Claim(ctx context.Context, req Request, peer Peer) (Grant, *os.File, error)
}

// DeliveryReporter may be implemented by a Claimer to learn whether a granted fd left
// the broker: err is nil once sendmsg handed the fd to the kernel for the peer, and says
// why not otherwise (then the peer did not get the fd and the claim can be undone).
type DeliveryReporter interface {
	Delivered(req Request, grant Grant, peer Peer, err error)
}

// Options tune a [Server]. Zero values take the defaults.
type Options struct {
	// Log receives one line per claim; nil discards.
	Log *slog.Logger
	// ReadTimeout bounds the wait for a client's request after it connects (default 5 s).
	ReadTimeout time.Duration
	// WriteTimeout bounds sending the reply (default 5 s).
	WriteTimeout time.Duration
	// MaxConns bounds the claims served at once (default 64); clients beyond it get
	// RESOURCE_EXHAUSTED.
	MaxConns int
	// MaxConnsPerTenant is each tenant's share of the claim slots (default MaxConns/4, at
	// least 1): a tenant may always have that many claims in progress while a slot is free.
	// Beyond its share a tenant takes free slots only while more than a share's worth stays
	// free, so that one tenant's connections (idle or not) cannot starve the others, and a
	// burst of one tenant's VMs starting at once (many VMs under one uid, with tenants by
	// uid) is not refused while the server is idle.
	MaxConnsPerTenant int
	// TenantOf names the tenant of a connecting peer (uid and pid from SO_PEERCRED) for
	// MaxConnsPerTenant. Nil: the tenant is the uid ("uid=N"). It only counts slots: the
	// claim itself is decided by the Claimer for the pidfd-pinned process.
	TenantOf func(uid uint32, pid int32) string

	// noPassRights makes Serve behave as on a kernel without SO_PASSRIGHTS (tests).
	noPassRights bool
}

// Server serves claims on SOCK_SEQPACKET unix sockets.
type Server struct {
	claimer Claimer
	log     *slog.Logger
	opt     Options
	rejects chan struct{} // one token per busy-rejection in progress

	tenantMu sync.Mutex
	inUse    int            // claims in progress, across all Serve calls; guarded by tenantMu
	byTenant map[string]int // claims in progress per peer tenant; guarded by tenantMu

	rejected atomic.Uint64 // connections answered RESOURCE_EXHAUSTED (busy)
	dropped  atomic.Uint64 // connections hung up at once (flooded)
}

// Stats is a snapshot of a [Server]'s claim slots against its limits, for metrics.
type Stats struct {
	// InProgress is how many claims are being served; MaxConns is Options.MaxConns.
	InProgress, MaxConns int
	// TenantMax is how many claims the tenant with the most has in progress;
	// TenantLimit is Options.MaxConnsPerTenant (a tenant's share; see Options).
	TenantMax, TenantLimit int
	// Rejected counts the connections answered RESOURCE_EXHAUSTED because every slot (or
	// the tenant's share) was taken; Dropped those hung up at once because even the
	// rejection slots were.
	Rejected, Dropped uint64
}

// Stats returns a snapshot of the server's claim slots.
func (s *Server) Stats() Stats {
	st := Stats{MaxConns: s.opt.MaxConns, TenantLimit: s.opt.MaxConnsPerTenant,
		Rejected: s.rejected.Load(), Dropped: s.dropped.Load()}
	s.tenantMu.Lock()
	defer s.tenantMu.Unlock()
	st.InProgress = s.inUse
	for _, n := range s.byTenant {
		st.TenantMax = max(st.TenantMax, n)
	}
	return st
}

// takeSlot counts a claim of tenant in progress if the limits allow it: a slot is free,
// and the tenant is within its share or more than a share's worth of slots stays free for
// the others (Options.MaxConnsPerTenant).
func (s *Server) takeSlot(tenant string) bool {
	s.tenantMu.Lock()
	defer s.tenantMu.Unlock()
	free, share := s.opt.MaxConns-s.inUse, s.opt.MaxConnsPerTenant
	if free <= 0 || (s.byTenant[tenant] >= share && free <= share) {
		return false
	}
	s.inUse++
	s.byTenant[tenant]++
	return true
}

func (s *Server) releaseSlot(tenant string) {
	s.tenantMu.Lock()
	defer s.tenantMu.Unlock()
	s.inUse--
	if s.byTenant[tenant]--; s.byTenant[tenant] <= 0 {
		delete(s.byTenant, tenant)
	}
}

// unidentified is the slot tenant of peers whose credentials could not be read (their
// claims are answered with the reason and count against one shared share).
const unidentified = "unidentified"

// peerTenant names the tenant of a peer with credentials creds (Options.TenantOf).
func (s *Server) peerTenant(creds peercred.Creds) string {
	if s.opt.TenantOf != nil {
		return s.opt.TenantOf(creds.UID, creds.PID)
	}
	return "uid=" + strconv.FormatUint(uint64(creds.UID), 10)
}

// NewServer returns a server that asks c about each claim.
func NewServer(c Claimer, opt Options) *Server {
	if opt.ReadTimeout <= 0 {
		opt.ReadTimeout = 5 * time.Second
	}
	if opt.WriteTimeout <= 0 {
		opt.WriteTimeout = 5 * time.Second
	}
	if opt.MaxConns <= 0 {
		opt.MaxConns = 64
	}
	if opt.MaxConnsPerTenant <= 0 {
		opt.MaxConnsPerTenant = max(opt.MaxConns/4, 1)
	}
	log := opt.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{claimer: c, log: log, opt: opt, byTenant: map[string]int{},
		rejects: make(chan struct{}, opt.MaxConns)}
}

// Listen creates a SOCK_SEQPACKET unix socket at path with the given permission bits. A
// stale socket file left by a previous run is removed; a socket somebody still listens on
// is not (errdefs.ErrAlreadyExists).
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("claim socket %s: another process listens on it: %w", path, errdefs.ErrAlreadyExists)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("claim socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("claim socket %s: %w", path, err)
	}
	// As early as possible: connections made before Serve runs inherit the flag too.
	// Serve sets it again (a listener from systemd) and logs when the kernel lacks it.
	_ = refuseRights(l)
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("claim socket %s: %w", path, err)
	}
	return l, nil
}

// Serve accepts claims on l until ctx ends or l fails, then closes l and returns once
// every claim in progress has finished (ctx's end cancels them). It returns nil when ctx
// ended, and the error otherwise. l must be a SOCK_SEQPACKET unix listener.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	defer l.Close()
	if err := checkSeqpacket(l); err != nil {
		return err
	}
	refusing := s.refuseListenerRights(l)
	var wg sync.WaitGroup
	defer wg.Wait()
	// Closing l wakes Accept. Serve must not return before that close has finished (the
	// fd would outlive Serve), hence the wait when the AfterFunc has started.
	closed := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(closed)
		l.Close()
	})
	defer func() {
		if !stop() {
			<-closed
		}
	}()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !retryAccept(err) {
				return fmt.Errorf("claim socket %s: accept: %w", l.Addr(), err)
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("claim socket accept failed; retrying", "error", err, "backoff", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil
			}
			continue
		}
		backoff = 0
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			continue
		}
		if refusing {
			// Inherited from the listener at connect already (see refuseRights); this
			// only guards against a kernel that would not copy the flag.
			_ = refuseRights(uc)
		}
		// Pin the peer at once (with the pidfd_open fallback, the earlier the better); its
		// credentials also name its tenant for the slots.
		creds, proc, perr := peercred.FromConn(uc)
		tenant := unidentified
		if perr == nil {
			tenant = s.peerTenant(creds)
		}
		if s.takeSlot(tenant) {
			wg.Go(func() {
				defer s.releaseSlot(tenant)
				s.handle(ctx, uc, creds, proc, perr)
			})
			continue
		}
		if proc != nil {
			proc.Close()
		}
		select {
		case s.rejects <- struct{}{}:
			s.rejected.Add(1)
			wg.Go(func() {
				defer func() { <-s.rejects }()
				s.reject(ctx, uc)
			})
		default:
			// Flooded: hang up at once.
			s.dropped.Add(1)
			s.log.Warn("claim socket overloaded; dropping connection", "max_conns", s.opt.MaxConns)
			uc.Close()
		}
	}
}

// retryAccept reports whether an accept error is worth retrying (resource shortage or a
// client that gave up), as opposed to a dead listener.
func retryAccept(err error) bool {
	for _, e := range []error{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED, unix.EINTR, unix.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// checkSeqpacket makes sure a unix listener is SOCK_SEQPACKET, the only type the protocol
// is defined for. Listeners without a socket (test doubles) pass.
func checkSeqpacket(l net.Listener) error {
	sc, ok := l.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("claim socket %s: %w", l.Addr(), err)
	}
	var typ int
	var gerr error
	if err := rc.Control(func(fd uintptr) { typ, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE) }); err != nil {
		return fmt.Errorf("claim socket %s: %w", l.Addr(), err)
	}
	if gerr != nil {
		return fmt.Errorf("claim socket %s: %w", l.Addr(), os.NewSyscallError("getsockopt SO_TYPE", gerr))
	}
	if typ != unix.SOCK_SEQPACKET {
		return fmt.Errorf("claim socket %s: socket type %d is not SOCK_SEQPACKET: %w", l.Addr(), typ, errdefs.ErrInvalidArgument)
	}
	return nil
}

// reject answers a client that arrived while MaxConns claims were in progress: it
// reads the request (so that closing does not reset the connection under the reply) and
// replies RESOURCE_EXHAUSTED.
func (s *Server) reject(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	stop := stopDeadlines(ctx, c, min(s.opt.ReadTimeout, time.Second))
	defer stop()
	req, answer, _ := s.readRequest(ctx, c, s.log)
	if !answer {
		return
	}
	msg := fmt.Sprintf("too many claims in progress (at most %d; beyond %d per tenant only while %d more stay free); retry later",
		s.opt.MaxConns, s.opt.MaxConnsPerTenant, s.opt.MaxConnsPerTenant)
	s.log.Warn("claim rejected", "lease_id", req.LeaseID, "code", CodeResourceExhausted.String(), "reason", msg)
	s.writeError(ctx, c, CodeResourceExhausted, req.LeaseID, msg)
}

// stopDeadlines sets c's read deadline readTimeout from now and makes the end of ctx (the
// server stopping) put every deadline of c in the past, which wakes a blocked read or
// write. The read deadline is set first: set after, it could undo a stop that came in
// between. The returned func unregisters the stop.
func stopDeadlines(ctx context.Context, c *net.UnixConn, readTimeout time.Duration) func() bool {
	c.SetReadDeadline(time.Now().Add(readTimeout))
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
}

// setWriteDeadline sets c's write deadline timeout from now, unless the server is stopping
// (see stopDeadlines): ctx.Err is set before the stop's AfterFunc runs, so a stop is never
// undone.
func setWriteDeadline(ctx context.Context, c *net.UnixConn, timeout time.Duration) {
	c.SetWriteDeadline(time.Now().Add(timeout))
	if ctx.Err() != nil {
		c.SetDeadline(time.Unix(1, 0))
	}
}

func (s *Server) writeError(ctx context.Context, c *net.UnixConn, code Code, leaseID, msg string) {
	b, err := EncodeReply(Reply{Code: code, LeaseID: leaseID, Message: TruncateMessage(msg)})
	if err != nil {
		// leaseID came from a decoded request, msg was truncated: cannot happen.
		b, _ = EncodeReply(Reply{Code: code, Message: TruncateMessage(msg)})
	}
	setWriteDeadline(ctx, c, s.opt.WriteTimeout)
	c.Write(b)
}

// readRequest reads and decodes one request. answer is false when there is nobody to
// reply to (the client hung up, timed out or the server is stopping); otherwise err says
// what is wrong with the request, if anything.
//
// It receives without a control buffer, so no fd a client attaches is ever installed in
// this process: on a kernel without SO_PASSRIGHTS the kernel drops them (and sets
// MSG_CTRUNC), and nothing here calls close(2) on a client's file. See the package
// documentation, "Fds from clients".
func (s *Server) readRequest(ctx context.Context, c *net.UnixConn, log *slog.Logger) (req Request, answer bool, err error) {
	buf := make([]byte, MaxRequestSize+1)
	n, _, flags, _, err := c.ReadMsgUnix(buf, nil)
	if err != nil {
		switch {
		case errors.Is(err, io.EOF):
			log.Debug("claim client hung up without a request")
		case ctx.Err() != nil:
		case errors.Is(err, os.ErrDeadlineExceeded):
			log.Warn("claim client sent no request in time", "timeout", s.opt.ReadTimeout)
		default:
			log.Warn("claim request read failed", "error", err)
		}
		return Request{}, false, nil
	}
	switch {
	case flags&unix.MSG_CTRUNC != 0:
		return Request{}, true, invalid("request carries ancillary data (fds); the claim socket accepts none")
	case n > MaxRequestSize || flags&unix.MSG_TRUNC != 0:
		return Request{}, true, invalid("request larger than %d bytes", MaxRequestSize)
	}
	req, err = DecodeRequest(buf[:n])
	return req, true, err
}

// handle serves one connection of a peer with credentials creds, pinned by proc (which it
// closes), or perr why the peer could not be identified: one request, one reply.
func (s *Server) handle(ctx context.Context, c *net.UnixConn, creds peercred.Creds, proc *peercred.Process, perr error) {
	defer c.Close()
	stop := stopDeadlines(ctx, c, s.opt.ReadTimeout)
	defer stop()

	log := s.log
	if perr == nil {
		defer proc.Close()
		log = log.With("client_pid", creds.PID, "uid", creds.UID)
	}
	req, answer, err := s.readRequest(ctx, c, log)
	if !answer {
		return
	}
	if perr != nil {
		log.Warn("claim peer not identified", "lease_id", req.LeaseID, "error", perr)
		s.writeError(ctx, c, CodeOf(perr), req.LeaseID, "cannot identify the connecting process: "+perr.Error())
		return
	}
	if err != nil {
		log.Warn("claim request malformed", "error", err)
		s.writeError(ctx, c, CodeOf(err), "", err.Error())
		return
	}
	log = log.With("lease_id", req.LeaseID)

	peer := Peer{UID: creds.UID, GID: creds.GID, Groups: creds.Groups, PID: creds.PID, Process: proc}
	grant, f, err := s.claimer.Claim(ctx, req, peer)
	if f != nil {
		defer f.Close()
	}
	if err == nil && f == nil {
		err = fmt.Errorf("lease %s: claimer granted no fd", req.LeaseID)
	}
	var reply []byte
	if err == nil {
		reply, err = encodeGrant(&grant, req, f)
	}
	if err == nil && !proc.Alive() {
		err = fmt.Errorf("lease %s: client pid %d exited before delivery: %w", req.LeaseID, creds.PID, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		code := CodeOf(err)
		msg := err.Error()
		if code == CodeInternal {
			msg = "internal error; see the broker log"
		}
		log.Warn("claim refused", "code", code.String(), "error", err)
		s.writeError(ctx, c, code, req.LeaseID, msg)
		s.reportDelivery(req, grant, peer, err, f != nil)
		return
	}

	err = s.send(ctx, c, reply, grant.LeaseID, f)
	s.reportDelivery(req, grant, peer, err, true)
	if err != nil {
		log.Warn("claim fd delivery failed", "error", err, "generation", grant.Generation)
		return
	}
	log.Info("claim delivered", "generation", grant.Generation, "inode", grant.Inode,
		"size", grant.Size, "bdf", grant.BDF, "bar", grant.BAR)
}

// reportDelivery tells a DeliveryReporter about a claim whose fd was granted.
func (s *Server) reportDelivery(req Request, grant Grant, peer Peer, err error, granted bool) {
	if r, ok := s.claimer.(DeliveryReporter); ok && granted {
		r.Delivered(req, grant, peer, err)
	}
}

// encodeGrant fills the grant's lease id and inode, checks the inode against the fd and
// encodes the success reply.
func encodeGrant(g *Grant, req Request, f *os.File) ([]byte, error) {
	if g.LeaseID == "" {
		g.LeaseID = req.LeaseID
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("lease %s: fstat granted fd: %w", req.LeaseID, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil, fmt.Errorf("lease %s: fstat granted fd: no inode", req.LeaseID)
	}
	if g.Inode == 0 {
		g.Inode = st.Ino
	}
	if g.Inode != st.Ino {
		return nil, fmt.Errorf("lease %s: grant names inode %d but the fd is inode %d", req.LeaseID, g.Inode, st.Ino)
	}
	b, err := EncodeReply(Reply{Code: CodeOK, LeaseID: g.LeaseID, Generation: g.Generation,
		Size: g.Size, Inode: g.Inode, BDF: g.BDF, BAR: g.BAR})
	if err != nil {
		// Not the client's fault: report INTERNAL, not INVALID_REQUEST.
		return nil, fmt.Errorf("lease %s: grant does not encode: %s", req.LeaseID, err)
	}
	return b, nil
}

// send writes the success reply with f attached by SCM_RIGHTS.
func (s *Server) send(ctx context.Context, c *net.UnixConn, reply []byte, leaseID string, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("lease %s: %w", leaseID, err)
	}
	setWriteDeadline(ctx, c, s.opt.WriteTimeout)
	var werr error
	if err := rc.Control(func(fd uintptr) {
		_, _, werr = c.WriteMsgUnix(reply, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return fmt.Errorf("lease %s: %w", leaseID, err)
	}
	if werr != nil {
		return fmt.Errorf("lease %s: send fd: %w", leaseID, werr)
	}
	return nil
}

// refuseListenerRights sets SO_PASSRIGHTS to 0 on the claim listener, so that the
// kernel refuses any client's sendmsg that attaches fds (EPERM) and no client's file
// ever reaches this process. It reports whether the flag is set; without it (Linux
// before 6.16, or a listener without a socket) requests are still read without a
// control buffer (readRequest).
func (s *Server) refuseListenerRights(l net.Listener) bool {
	if _, ok := l.(syscall.Conn); !ok || s.opt.noPassRights {
		return false // a listener without a socket (test doubles), or forced off (tests)
	}
	err := refuseRights(l)
	switch {
	case err == nil:
		return true
	case errors.Is(err, errNoPassRights):
		s.log.Warn("claim socket: the kernel has no SO_PASSRIGHTS (Linux 6.16+); fds that clients attach are dropped unread, "+
			"but a file whose final release blocks can still hold up a claim slot", "addr", l.Addr())
	default:
		s.log.Warn("claim socket: cannot refuse clients' fds with SO_PASSRIGHTS; they are dropped unread", "addr", l.Addr(), "error", err)
	}
	return false
}

// errNoPassRights says the kernel does not know SO_PASSRIGHTS.
var errNoPassRights = errors.New("SO_PASSRIGHTS not supported by the kernel")

// refuseRights sets SO_PASSRIGHTS to 0 on a unix socket (a listener or a connection).
//
// SO_PASSRIGHTS (Linux 6.16, commit "af_unix: Introduce SO_PASSRIGHTS"; 83 in
// include/uapi/asm-generic/socket.h, unix.SO_PASSRIGHTS) is a per-socket flag, 1 by
// default. net/core/sock.c sk_setsockopt sets sk->sk_scm_rights for AF_UNIX sockets
// (EOPNOTSUPP for others); older kernels answer ENOPROTOOPT for the unknown option. With
// it 0, net/unix/af_unix.c fails the peer's sendmsg with EPERM when the message carries
// SCM_RIGHTS (unix_dgram_sendmsg, which also serves SOCK_SEQPACKET, unix_stream_sendmsg,
// queue_oob): the message is not queued and the sender keeps its fds. An accepted socket
// inherits the listener's flags when the client connects (unix_stream_connect copies
// sk_scm_recv_flags into the embryo socket; "af_unix: Inherit sk_flags at connect()",
// same series), so the flag on the listener covers a request sent before accept.
func refuseRights(c any) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return errNoPassRights
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSRIGHTS, 0) }); err != nil {
		return err
	}
	if errors.Is(serr, unix.ENOPROTOOPT) || errors.Is(serr, unix.EINVAL) {
		return errNoPassRights
	}
	if serr != nil {
		return os.NewSyscallError("setsockopt SO_PASSRIGHTS", serr)
	}
	return nil
}
