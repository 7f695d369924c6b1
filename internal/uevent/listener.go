package uevent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

// kernelGroup is the netlink multicast group of the kernel's uevents (udevd re-broadcasts
// in libudev format on group 2).
const kernelGroup = 1

// DefaultReceiveBuffer is the socket receive buffer [Listen] asks for when
// Options.ReceiveBuffer is 0: room for thousands of uevents (one is at most a few KiB),
// e.g. a burst of SR-IOV virtual functions appearing.
const DefaultReceiveBuffer = 8 << 20

// Options configures [Listen].
type Options struct {
	// ReceiveBuffer is the socket receive buffer in bytes; 0 means
	// [DefaultReceiveBuffer]. It is set with SO_RCVBUFFORCE when the process has
	// CAP_NET_ADMIN, else with SO_RCVBUF, which the kernel caps at net.core.rmem_max.
	ReceiveBuffer int
}

// Listener receives kernel uevents. It owns its netlink socket. [Listener.Next] is meant
// for one goroutine at a time (calls are serialized); [Listener.Close] may be called from
// any goroutine and ends a waiting Next.
type Listener struct {
	f  *os.File // the netlink socket; owned
	rc syscall.RawConn

	mu  sync.Mutex // serializes Next; guards buf
	buf []byte

	closeOnce sync.Once
	closeErr  error
}

// Listen opens a uevent socket bound to the kernel's multicast group.
func Listen(opt Options) (*Listener, error) {
	size := opt.ReceiveBuffer
	if size < 0 {
		return nil, fmt.Errorf("uevent: receive buffer %d: %w", size, errdefs.ErrInvalidArgument)
	}
	if size == 0 {
		size = DefaultReceiveBuffer
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, fmt.Errorf("uevent: %w", os.NewSyscallError("socket", err))
	}
	if err := setReceiveBuffer(fd, size); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uevent: receive buffer %d: %w", size, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: kernelGroup}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uevent: %w", os.NewSyscallError("bind", err))
	}
	// The descriptor is non-blocking, so os.NewFile registers it with the runtime poller.
	f := os.NewFile(uintptr(fd), "netlink-uevent")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("uevent: %w", err)
	}
	// One byte more than Parse accepts, so that an oversized message shows as such.
	return &Listener{f: f, rc: rc, buf: make([]byte, MaxMessageSize+1)}, nil
}

// setReceiveBuffer sets SO_RCVBUFFORCE, or SO_RCVBUF without CAP_NET_ADMIN.
func setReceiveBuffer(fd, size int) error {
	err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
	if errors.Is(err, unix.EPERM) {
		err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
		if err != nil {
			return os.NewSyscallError("setsockopt SO_RCVBUF", err)
		}
		return nil
	}
	if err != nil {
		return os.NewSyscallError("setsockopt SO_RCVBUFFORCE", err)
	}
	return nil
}

// ReceiveBuffer returns the socket's receive buffer size as the kernel reports it
// (SO_RCVBUF, which counts bookkeeping overhead: about twice what was asked for).
func (l *Listener) ReceiveBuffer() (int, error) {
	var n int
	var serr error
	err := l.rc.Control(func(fd uintptr) { n, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
	if err != nil {
		return 0, fmt.Errorf("uevent: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("uevent: %w", os.NewSyscallError("getsockopt SO_RCVBUF", serr))
	}
	return n, nil
}

// Next waits for the next uevent from the kernel and returns it. Datagrams not sent by
// the kernel are skipped. It returns:
//
//   - ctx's error when ctx ends first;
//   - an error matching [ErrOverflow] when the kernel dropped events because the
//     receive buffer was full: resynchronise from sysfs and keep calling Next (the kernel
//     sends nothing new until the queued events have been read);
//   - an error matching [ErrMalformed] for a kernel message that does not parse (see
//     [Parse]); the caller may log it and call Next again;
//   - an error matching os.ErrClosed once the Listener is closed.
func (l *Listener) Next(ctx context.Context) (Event, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return Event{}, err
	}
	// Clear a deadline left by an earlier cancelled call, then let ctx set one.
	if err := l.f.SetReadDeadline(time.Time{}); err != nil {
		return Event{}, fmt.Errorf("uevent: %w", closedError(err))
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		l.f.SetReadDeadline(time.Unix(1, 0)) // in the past: wakes a waiting read
	})
	defer func() {
		if !stop() {
			<-fired // the deadline is set; clear it at the next call, not after
		}
	}()
	for {
		n, sender, err := l.recv()
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil:
				return Event{}, ctx.Err()
			case errors.Is(err, unix.ENOBUFS):
				return Event{}, fmt.Errorf("uevent: receive: %w (%w)", ErrOverflow, err)
			}
			return Event{}, fmt.Errorf("uevent: receive: %w", err)
		}
		if sender != 0 {
			continue // not the kernel
		}
		if n > len(l.buf) {
			return Event{}, malformed("message of %d bytes exceeds %d", n, MaxMessageSize)
		}
		return Parse(l.buf[:n])
	}
}

// recv receives one datagram into l.buf through the runtime poller. n is the datagram's
// full length (MSG_TRUNC), which exceeds len(l.buf) if it was truncated; sender is the
// sender's netlink port id (0: the kernel; -1: unknown).
func (l *Listener) recv() (n int, sender int64, err error) {
	var rerr error
	sender = -1
	err = l.rc.Read(func(fd uintptr) bool {
		var from unix.Sockaddr
		n, from, rerr = unix.Recvfrom(int(fd), l.buf, unix.MSG_TRUNC)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			return false // wait for the poller
		}
		if sa, ok := from.(*unix.SockaddrNetlink); ok {
			sender = int64(sa.Pid)
		}
		return true
	})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, -1, err
		}
		return 0, -1, closedError(err)
	}
	if rerr != nil {
		return 0, -1, os.NewSyscallError("recvfrom", rerr)
	}
	return n, sender, nil
}

// Close closes the socket; a waiting [Listener.Next] returns an error matching
// os.ErrClosed. It is idempotent: later calls return the first call's result.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.f.Close() })
	return l.closeErr
}

// closedError adds os.ErrClosed to err: the runtime reports a closed file to RawConn and
// SetReadDeadline with an internal error value ("use of closed file").
func closedError(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return err
	}
	return fmt.Errorf("%w (%w)", os.ErrClosed, err)
}
