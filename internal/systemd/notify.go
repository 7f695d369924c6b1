package systemd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// MaxMessageSize is the largest notification systemd reads (NOTIFY_BUFFER_MAX, PIPE_BUF in
// src/core/manager.c); it drops longer datagrams without a word to the sender.
const MaxMessageSize = 4096

// MaxFDNameLen is the longest fd name systemd accepts (FDNAME_MAX).
const MaxFDNameLen = 255

// ValidateFDName reports whether name is usable as an fd store name: 1 to [MaxFDNameLen]
// bytes of printable ASCII without ':' (systemd's fdname_is_valid, except that systemd
// also accepts the empty name, which $LISTEN_FDNAMES cannot tell apart from no name).
func ValidateFDName(name string) error {
	if name == "" {
		return fmt.Errorf("empty fd name: %w", errdefs.ErrInvalidArgument)
	}
	if len(name) > MaxFDNameLen {
		return fmt.Errorf("fd name of %d bytes, at most %d allowed: %w", len(name), MaxFDNameLen, errdefs.ErrInvalidArgument)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < ' ' || c >= 0x7f || c == ':' {
			return fmt.Errorf("fd name %q: byte %#x at %d is not printable ASCII other than ':': %w",
				name, c, i, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// checkState rejects what systemd would drop: empty, over [MaxMessageSize], or with a NUL.
func checkState(state string) error {
	switch {
	case state == "":
		return fmt.Errorf("empty notification: %w", errdefs.ErrInvalidArgument)
	case len(state) > MaxMessageSize:
		return fmt.Errorf("notification of %d bytes, systemd reads at most %d: %w", len(state), MaxMessageSize, errdefs.ErrInvalidArgument)
	case strings.IndexByte(state, 0) >= 0:
		return fmt.Errorf("notification contains a NUL byte: %w", errdefs.ErrInvalidArgument)
	}
	return nil
}

// Notify sends state as one datagram: "READY=1", "STATUS=…", "WATCHDOG=1",
// "EXTEND_TIMEOUT_USEC=…", "STOPPING=1", "RELOADING=1\nMONOTONIC_USEC=…" and so on, with
// several assignments separated by newlines, as sd_notify(3). Outside a service manager it
// does nothing and returns nil. It waits (through the runtime poller) while systemd's
// receive queue is full. A nil error means the datagram was queued, not that systemd
// accepted it.
func (m *Manager) Notify(state string) error {
	if !m.Managed() {
		return nil
	}
	if err := checkState(state); err != nil {
		return opError("notify", "", err)
	}
	return opError("notify", "", m.send(context.Background(), state, nil))
}

// StoreFD sends "FDSTORE=1\nFDNAME=<name>\nFDPOLL=0" with a reference to f (SCM_RIGHTS).
// systemd takes its own reference; the caller keeps f and still owns it. name must pass
// [ValidateFDName]. Outside a service manager it does nothing and returns nil (the name is
// still checked).
//
// Nothing confirms the store: systemd silently drops the fd when the store is disabled or
// full, or when the same open file description is already stored (see the package
// documentation). FDPOLL=0 keeps systemd from polling the fd for hangups, which means
// nothing to VFIO device fds (not pollable) and would otherwise drop sockets and pipes
// whose peer went away.
func (m *Manager) StoreFD(name string, f *os.File) error {
	if err := ValidateFDName(name); err != nil {
		return opError("store-fd", name, err)
	}
	if f == nil {
		return opError("store-fd", name, fmt.Errorf("nil file: %w", errdefs.ErrInvalidArgument))
	}
	if !m.Managed() {
		return nil
	}
	state := "FDSTORE=1\nFDNAME=" + name + "\nFDPOLL=0"
	return opError("store-fd", name, withFD(f, func(fd int) error {
		return m.send(context.Background(), state, []int{fd})
	}))
}

// RemoveFD sends "FDSTOREREMOVE=1\nFDNAME=<name>", which removes every store entry named
// name, then waits for [Manager.Barrier]: when it returns nil, systemd has processed the
// removal and released its references. See the package documentation for the
// asynchronous close behind that release. Removing a name that is not stored is not an
// error (systemd does not say). Outside a service manager it does nothing and returns nil.
func (m *Manager) RemoveFD(ctx context.Context, name string) error {
	if err := ValidateFDName(name); err != nil {
		return opError("remove-fd", name, err)
	}
	if !m.Managed() {
		return nil
	}
	if err := m.send(ctx, "FDSTOREREMOVE=1\nFDNAME="+name, nil); err != nil {
		return opError("remove-fd", name, err)
	}
	return opError("remove-fd", name, m.barrier(ctx))
}

// Barrier implements sd_notify_barrier(3): it sends "BARRIER=1" with the write end of a
// fresh O_CLOEXEC pipe, closes its own copy of the write end and waits until the read end
// sees EOF, which happens when systemd has processed every earlier notification of this
// process and closed the fds of the barrier message. It waits through the runtime poller
// (no OS thread is blocked) until ctx is done; pass a ctx with a deadline, since a service
// manager that stopped reading would otherwise keep it waiting forever. Outside a service
// manager it returns nil at once.
func (m *Manager) Barrier(ctx context.Context) error {
	if !m.Managed() {
		return nil
	}
	return opError("barrier", "", m.barrier(ctx))
}

func (m *Manager) barrier(ctx context.Context) error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return os.NewSyscallError("pipe2", err)
	}
	// Only the read end is non-blocking, so that os.NewFile makes it pollable; the write
	// end goes to systemd as it is.
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return os.NewSyscallError("fcntl O_NONBLOCK", err)
	}
	r := os.NewFile(uintptr(p[0]), "barrier")
	defer r.Close()
	err := m.send(ctx, "BARRIER=1", []int{p[1]})
	unix.Close(p[1])
	if err != nil {
		return err
	}
	return waitEOF(ctx, r)
}

// waitEOF reads r until EOF, ctx's deadline or ctx's cancellation.
func waitEOF(ctx context.Context, r *os.File) error {
	if dl, ok := ctx.Deadline(); ok {
		if err := r.SetReadDeadline(dl); err != nil {
			return err
		}
	}
	stop := context.AfterFunc(ctx, func() { r.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var buf [64]byte
	for {
		_, err := r.Read(buf[:]) // systemd writes nothing; anything read is ignored
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("waiting for the service manager: %w", contextError(ctx, err))
		}
	}
}

// send sends state with fds (may be nil) as one datagram on a new socket connected to
// the notify socket. The socket is connected so that the kernel reports it writable only
// when the manager's receive queue has room; a send that finds the queue full waits
// through the runtime poller, bounded by ctx. (net.UnixConn refuses WriteMsgUnix on a
// connected datagram socket, hence the raw socket.)
func (m *Manager) send(ctx context.Context, state string, fds []int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return os.NewSyscallError("socket", err)
	}
	s := os.NewFile(uintptr(fd), "notify") // non-blocking, hence pollable
	defer s.Close()
	rc, err := s.SyscallConn()
	if err != nil {
		return err
	}
	// x/sys/unix turns a leading '@' into the NUL of an abstract address.
	sa := &unix.SockaddrUnix{Name: m.addr}
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		for {
			cerr = unix.Connect(int(fd), sa)
			if cerr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("connect %s: %w", m.addr, os.NewSyscallError("connect", cerr))
	}

	if dl, ok := ctx.Deadline(); ok {
		if err := s.SetWriteDeadline(dl); err != nil {
			return err
		}
	}
	stop := context.AfterFunc(ctx, func() { s.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	b := []byte(state)
	var n int
	var serr error
	werr := rc.Write(func(fd uintptr) bool {
		for {
			n, serr = unix.SendmsgN(int(fd), b, oob, nil, unix.MSG_NOSIGNAL)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN // EAGAIN: wait until the queue has room
			}
		}
	})
	if werr != nil {
		return contextError(ctx, werr)
	}
	if serr != nil {
		return fmt.Errorf("send to %s: %w", m.addr, os.NewSyscallError("sendmsg", serr))
	}
	if n != len(b) {
		return fmt.Errorf("send to %s: short datagram, %d of %d bytes", m.addr, n, len(b))
	}
	return nil
}

// contextError returns ctx's error for a deadline error: the only deadlines set here come
// from ctx, and the poller's timer may fire a moment before ctx's own, so a deadline
// error with ctx not yet done means ctx's deadline has passed.
func contextError(ctx context.Context, err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return context.DeadlineExceeded
}

// withFD calls fn with f's descriptor number while f is kept open.
func withFD(f syscall.Conn, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return fmt.Errorf("%w (%w)", os.ErrClosed, err)
	}
	return ferr
}
