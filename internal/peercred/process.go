package peercred

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// pidfsMagic is PID_FS_MAGIC (include/uapi/linux/magic.h): pidfds live on pidfs since
// Linux 6.9, where each process has its own inode.
const pidfsMagic = 0x50494446

// Process is a process pinned by a pidfd it owns. The pidfd keeps naming the same process
// after it exits, so a recycled PID cannot be mistaken for it. All methods are safe for
// concurrent use.
type Process struct {
	pid int32
	// f is the pidfd (O_CLOEXEC), not registered with the runtime poller: pinning a peer
	// costs no epoll_ctl. Only the duplicates that Wait blocks on are (dupFile).
	f *os.File

	mu      sync.Mutex
	closed  bool                  // guarded by mu
	waiters map[*os.File]struct{} // guarded by mu; pidfd dups that Wait calls block on
}

// Open pins the running process pid with pidfd_open(2). Prefer [FromConn] for socket
// peers: Open cannot tell whether pid still names the process the caller had in mind.
func Open(pid int32) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pidfd_open pid %d: %w", pid, errdefs.ErrInvalidArgument)
	}
	fd, err := unix.PidfdOpen(int(pid), 0)
	if err != nil {
		err = fmt.Errorf("pid %d: %w", pid, os.NewSyscallError("pidfd_open", err))
		if errors.Is(err, unix.ESRCH) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
		}
		return nil, err
	}
	return newProcess(fd, pid)
}

// newProcess takes ownership of pidfd (closed on error too).
func newProcess(pidfd int, pid int32) (*Process, error) {
	// Without O_NONBLOCK (pidfds from SO_PEERPIDFD and pidfd_open without
	// PIDFD_NONBLOCK come without it) os.NewFile leaves the fd out of the runtime poller:
	// every use of it here is a non-blocking poll(2) or fstat(2) through Control.
	f := os.NewFile(uintptr(pidfd), "pidfd:"+strconv.Itoa(int(pid)))
	if f == nil {
		unix.Close(pidfd)
		return nil, fmt.Errorf("pidfd %d: invalid fd: %w", pidfd, errdefs.ErrInvalidArgument)
	}
	return &Process{pid: pid, f: f}, nil
}

// PID returns the process ID the process had when it was pinned (in the PID namespace of
// this process).
func (p *Process) PID() int32 { return p.pid }

// Alive reports whether the process has not exited yet. It never blocks. It reports
// false after [Process.Close].
func (p *Process) Alive() bool {
	exited, err := p.exited(p.f)
	return err == nil && !exited
}

func (p *Process) exited(f *os.File) (bool, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return false, err
	}
	var (
		exited bool
		perr   error
	)
	if err := rc.Control(func(fd uintptr) { exited, perr = pollExited(int(fd)) }); err != nil {
		return false, err
	}
	return exited, perr
}

// Wait blocks until the process exits, ctx is done or p is closed. It returns nil once
// the process has exited (at once if it has exited already), ctx.Err() if ctx ended first,
// and an error wrapping [os.ErrClosed] if p was closed. The wait happens in the runtime
// poller: no goroutine sits in a system call. Any number of Waits may run at once; each
// holds a duplicate of the pidfd while it waits.
func (p *Process) Wait(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	w, err := p.addWaiter()
	if err != nil {
		return err
	}
	defer p.removeWaiter(w)

	stop := context.AfterFunc(ctx, func() { w.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	rc, err := w.SyscallConn()
	if err != nil {
		return fmt.Errorf("wait pid %d: %w", p.pid, err)
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		var exited bool
		exited, perr = pollExited(int(fd))
		return exited || perr != nil
	})
	if err == nil {
		err = perr
	}
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return fmt.Errorf("wait pid %d: %w", p.pid, os.ErrClosed)
	}
	return fmt.Errorf("wait pid %d: %w", p.pid, err)
}

func (p *Process) addWaiter() (*os.File, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("wait pid %d: %w", p.pid, os.ErrClosed)
	}
	f, err := p.dupFile()
	if err != nil {
		return nil, fmt.Errorf("wait pid %d: %w", p.pid, err)
	}
	if p.waiters == nil {
		p.waiters = make(map[*os.File]struct{})
	}
	p.waiters[f] = struct{}{}
	return f, nil
}

func (p *Process) removeWaiter(f *os.File) {
	p.mu.Lock()
	delete(p.waiters, f)
	p.mu.Unlock()
	f.Close()
}

// dupFile returns a new pollable *os.File on a duplicate of the pidfd.
func (p *Process) dupFile() (*os.File, error) {
	rc, err := p.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	// O_NONBLOCK makes os.NewFile register the dup with the runtime poller, so that Wait
	// blocks there rather than in a system call. The flag belongs to the open file
	// description that p.f shares, which changes nothing for p.f (never read), and it only
	// changes waitid(P_PIDFD), which is unused.
	if err := unix.SetNonblock(nfd, true); err != nil {
		unix.Close(nfd)
		return nil, os.NewSyscallError("fcntl pidfd O_NONBLOCK", err)
	}
	f := os.NewFile(uintptr(nfd), p.f.Name())
	if f == nil {
		unix.Close(nfd)
		return nil, fmt.Errorf("pidfd dup %d: invalid fd", nfd)
	}
	return f, nil
}

// Dup returns a new Process with its own pidfd for the same process. The caller owns it.
func (p *Process) Dup() (*Process, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("dup pidfd of pid %d: %w", p.pid, os.ErrClosed)
	}
	f, err := p.dupFile()
	if err != nil {
		return nil, fmt.Errorf("dup pidfd of pid %d: %w", p.pid, err)
	}
	return &Process{pid: p.pid, f: f}, nil
}

// Same reports whether p and q pin the same process. On pidfs (Linux 6.9+) it compares
// the pidfds' inodes, which identify a process for the lifetime of the system. On older
// kernels it falls back to equal PIDs with both processes still running: a PID is not
// reused while its process runs, so two running pinned processes with one PID are one.
func (p *Process) Same(q *Process) (bool, error) {
	if p == q {
		return true, nil
	}
	if p.pid != q.pid {
		return false, nil
	}
	pi, pok, err := pidfsInode(p.f)
	if err != nil {
		return false, fmt.Errorf("compare pid %d: %w", p.pid, err)
	}
	qi, qok, err := pidfsInode(q.f)
	if err != nil {
		return false, fmt.Errorf("compare pid %d: %w", q.pid, err)
	}
	if pok && qok {
		return pi == qi, nil
	}
	return p.Alive() && q.Alive(), nil
}

// pidfsInode returns the inode of a pidfd and whether it lives on pidfs.
func pidfsInode(f *os.File) (ino uint64, onPidfs bool, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, false, err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		var sfs unix.Statfs_t
		if serr = unix.Fstatfs(int(fd), &sfs); serr != nil {
			serr = os.NewSyscallError("fstatfs pidfd", serr)
			return
		}
		if sfs.Type != pidfsMagic {
			return
		}
		var st unix.Stat_t
		if serr = unix.Fstat(int(fd), &st); serr != nil {
			serr = os.NewSyscallError("fstat pidfd", serr)
			return
		}
		ino, onPidfs = st.Ino, true
	})
	if err == nil {
		err = serr
	}
	return ino, onPidfs, err
}

// Close closes the pidfd and makes pending [Process.Wait] calls return. It is
// idempotent and safe to call concurrently with the other methods.
func (p *Process) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	for w := range p.waiters {
		w.SetReadDeadline(time.Unix(1, 0))
	}
	p.mu.Unlock()
	return p.f.Close()
}
