package peercred

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Creds are the credentials of a unix socket's peer as the kernel recorded them when the
// peer connected (or created the socket pair). UID, GID and Groups are in the user
// namespace of the reader; PID is in the reader's PID namespace.
type Creds struct {
	// UID and GID are the peer's effective user and group IDs.
	UID, GID uint32
	// PID is the peer's process (thread-group) ID.
	PID int32
	// Groups are the peer's supplementary groups (SO_PEERGROUPS); nil if the kernel
	// does not report them.
	Groups []uint32
}

// InGroup reports whether gid is the peer's primary group or one of its supplementary
// groups.
func (c Creds) InGroup(gid uint32) bool {
	if c.GID == gid {
		return true
	}
	for _, g := range c.Groups {
		if g == gid {
			return true
		}
	}
	return false
}

// maxGroups bounds SO_PEERGROUPS (NGROUPS_MAX in include/uapi/linux/limits.h).
const maxGroups = 65536

// FromConn returns the credentials of c's peer and a [Process] pinned to it. The caller
// owns the Process and must close it.
//
// The pidfd comes from SO_PEERPIDFD (Linux 6.5+), which names exactly the process that
// connected, even if it has exited since (then [Process.Alive] is false). On older kernels
// FromConn falls back to pidfd_open(pid) and then checks that the peer has not closed the
// connection and that the pidfd's process is still running. Re-reading SO_PEERCRED would
// prove nothing there: the kernel records it once, at connect time. The residual race of the
// fallback: the peer exits while another process that shares its socket (inherited through
// fork or passed by SCM_RIGHTS) keeps it open, and the peer's PID is recycled, all between
// connect and pidfd_open. Recycling needs the PID counter to wrap around pid_max, and the
// process that gets the PID was never the peer, so the window is tiny but not zero.
func FromConn(c *net.UnixConn) (Creds, *Process, error) {
	if c == nil {
		return Creds{}, nil, fmt.Errorf("peer credentials: nil connection: %w", errdefs.ErrInvalidArgument)
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return Creds{}, nil, fmt.Errorf("peer credentials: %w", err)
	}
	return fromRawConn(rc, pinPeerPidfd, true) // a *net.UnixConn is AF_UNIX
}

// pinMode says whether and how to pin the peer with a pidfd.
type pinMode int

const (
	pinNone      pinMode = iota // credentials only
	pinPeerPidfd                // SO_PEERPIDFD, falling back to pidfd_open on old kernels
	pinFallback                 // pidfd_open + recheck even on new kernels (tests)
)

// fromSyscallConn is FromConn for any connection that exposes its socket (gRPC hands the
// credentials a net.Conn). With pinNone the returned Process is nil.
func fromSyscallConn(c net.Conn, mode pinMode) (Creds, *Process, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return Creds{}, nil, fmt.Errorf("peer credentials: %T is not a socket: %w", c, errdefs.ErrInvalidArgument)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return Creds{}, nil, fmt.Errorf("peer credentials: %w", err)
	}
	return fromRawConn(rc, mode, false)
}

// fromRawConn reads the peer credentials of the AF_UNIX socket behind rc and pins the
// peer as mode says. isUnix says the socket is known to be AF_UNIX (else it is checked).
func fromRawConn(rc syscall.RawConn, mode pinMode, isUnix bool) (Creds, *Process, error) {
	var (
		creds Creds
		pidfd = -1
		opErr error
	)
	err := rc.Control(func(fd uintptr) {
		creds, opErr = readCreds(int(fd), isUnix)
		if opErr == nil && mode != pinNone {
			pidfd, opErr = pin(int(fd), creds.PID, mode == pinPeerPidfd)
		}
	})
	if err == nil {
		err = opErr
	}
	if err != nil {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		return Creds{}, nil, fmt.Errorf("peer credentials: %w", err)
	}
	if mode == pinNone {
		return creds, nil, nil
	}
	p, err := newProcess(pidfd, creds.PID)
	if err != nil {
		return Creds{}, nil, fmt.Errorf("peer credentials: pid %d: %w", creds.PID, err)
	}
	return creds, p, nil
}

// readCreds does the credential getsockopt calls on socket s.
func readCreds(s int, isUnix bool) (Creds, error) {
	if !isUnix {
		domain, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_DOMAIN)
		if err != nil {
			return Creds{}, os.NewSyscallError("getsockopt SO_DOMAIN", err)
		}
		if domain != unix.AF_UNIX {
			return Creds{}, fmt.Errorf("socket family %d is not AF_UNIX: %w", domain, errdefs.ErrInvalidArgument)
		}
	}
	uc, err := unix.GetsockoptUcred(s, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return Creds{}, os.NewSyscallError("getsockopt SO_PEERCRED", err)
	}
	if uc.Pid <= 0 {
		// The peer lives in a PID namespace this process cannot see into.
		return Creds{}, fmt.Errorf("peer uid %d: pid not visible in this pid namespace: %w", uc.Uid, errdefs.ErrPermissionDenied)
	}
	groups, err := peerGroups(s)
	if err != nil {
		return Creds{}, err
	}
	return Creds{UID: uc.Uid, GID: uc.Gid, PID: uc.Pid, Groups: groups}, nil
}

// pin returns a pidfd for the peer of socket s, whose SO_PEERCRED pid is pid. The caller
// owns the pidfd when the error is nil.
func pin(s int, pid int32, usePeerPidfd bool) (int, error) {
	if usePeerPidfd {
		pidfd, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		if err == nil {
			return pidfd, nil
		}
		if !errors.Is(err, unix.ENOPROTOOPT) {
			return -1, fmt.Errorf("pid %d: %w", pid, os.NewSyscallError("getsockopt SO_PEERPIDFD", err))
		}
		// Kernel before 6.5: fall back.
	}
	pidfd, err := unix.PidfdOpen(int(pid), 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return -1, fmt.Errorf("pid %d exited: %w: %w", pid, os.NewSyscallError("pidfd_open", err), errdefs.ErrFailedPrecondition)
		}
		return -1, fmt.Errorf("pid %d: %w", pid, os.NewSyscallError("pidfd_open", err))
	}
	if err := recheck(s, pidfd); err != nil {
		unix.Close(pidfd)
		return -1, fmt.Errorf("pid %d: %w", pid, err)
	}
	return pidfd, nil
}

// recheck is the fallback's defence against PID reuse between connect and pidfd_open: the
// process behind pidfd must still run and the peer must still hold its end of socket s.
func recheck(s, pidfd int) error {
	exited, err := pollExited(pidfd)
	if err != nil {
		return err
	}
	if exited {
		return fmt.Errorf("process exited before it could be pinned: %w", errdefs.ErrFailedPrecondition)
	}
	fds := []unix.PollFd{{Fd: int32(s), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return os.NewSyscallError("poll socket", err)
		}
		break
	}
	if fds[0].Revents&unix.POLLHUP != 0 {
		return fmt.Errorf("peer closed the connection before it could be pinned: %w", errdefs.ErrFailedPrecondition)
	}
	return nil
}

// pollExited reports whether the process behind pidfd has exited, without blocking.
func pollExited(pidfd int) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, os.NewSyscallError("poll pidfd", err)
		}
		return fds[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0, nil
	}
}
