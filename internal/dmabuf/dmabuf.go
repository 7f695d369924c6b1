package dmabuf

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
)

// Kernel constants (include/uapi/linux/dma-buf.h, include/uapi/linux/magic.h, Linux 7.2).
const (
	// DMA_BUF_MAGIC is statfs(2) f_type of the dmabuf pseudo-filesystem.
	DMA_BUF_MAGIC = 0x444d4142
	// DMA_BUF_SET_NAME_B is _IOW('b', 1, __u64), equal to DMA_BUF_SET_NAME on 64-bit.
	DMA_BUF_SET_NAME_B = 0x40086201
	// DMA_BUF_NAME_LEN is the kernel's name buffer size; names are at most 31 bytes.
	DMA_BUF_NAME_LEN = 32
)

// MaxNameLen is the longest name [Buffer.SetName] accepts, in bytes.
const MaxNameLen = DMA_BUF_NAME_LEN - 1

// Buffer owns one dma-buf file descriptor. Its methods are safe for concurrent use.
type Buffer struct {
	ino  uint64
	size uint64

	mu sync.Mutex
	f  *os.File // guarded by mu; nil once closed or disowned
}

// New takes ownership of f and returns a Buffer for it, after checking that f is a dma-buf
// (statfs f_type is [DMA_BUF_MAGIC]). On error New closes f; an f that is not a dma-buf
// gives an error wrapping [errdefs.ErrInvalidArgument].
func New(f *os.File) (*Buffer, error) {
	if f == nil {
		return nil, fmt.Errorf("dma-buf: nil file: %w", errdefs.ErrInvalidArgument)
	}
	b, err := newBuffer(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

func newBuffer(f *os.File) (*Buffer, error) {
	var (
		sfs unix.Statfs_t
		st  unix.Stat_t
	)
	err := control(f, "fstatfs", func(fd int) error { return unix.Fstatfs(fd, &sfs) })
	if err != nil {
		return nil, fmt.Errorf("dma-buf %s: %w", f.Name(), err)
	}
	if sfs.Type != DMA_BUF_MAGIC {
		return nil, fmt.Errorf("dma-buf %s: not a dma-buf (filesystem magic %#x, want %#x): %w",
			f.Name(), uint64(sfs.Type), DMA_BUF_MAGIC, errdefs.ErrInvalidArgument)
	}
	if err := control(f, "fstat", func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return nil, fmt.Errorf("dma-buf %s: %w", f.Name(), err)
	}
	b := &Buffer{ino: st.Ino, size: uint64(st.Size), f: f}
	if st.Size <= 0 {
		// Older kernels left st_size 0; lseek(SEEK_END) has always reported the size.
		var end int64
		err := control(f, "lseek", func(fd int) error {
			var err error
			if end, err = unix.Seek(fd, 0, unix.SEEK_END); err != nil {
				return err
			}
			_, err = unix.Seek(fd, 0, unix.SEEK_SET)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("dma-buf ino %d: size: %w", st.Ino, err)
		}
		b.size = uint64(end)
	}
	return b, nil
}

// Inode returns the dma-buf's inode number: unique per dma-buf for the boot and never
// reused, the same in every process holding it.
func (b *Buffer) Inode() uint64 { return b.ino }

// Size returns the size of the dma-buf in bytes.
func (b *Buffer) Size() uint64 { return b.size }

// File returns the owned file, borrowed: do not close it, and do not use it after
// [Buffer.Close]. It returns nil once the Buffer is closed.
func (b *Buffer) File() *os.File {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.f
}

// Dup returns a new O_CLOEXEC descriptor for the same dma-buf (fcntl F_DUPFD_CLOEXEC),
// owned by the caller, e.g. to send with SCM_RIGHTS and close.
func (b *Buffer) Dup() (*os.File, error) {
	var nfd int
	err := b.do("dup", func(fd int) error {
		var err error
		nfd, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(nfd), "dmabuf:"+strconv.FormatUint(b.ino, 10)), nil
}

// SetName sets the dma-buf's name (DMA_BUF_SET_NAME), which shows in fdinfo "name:", in
// readlink /proc/PID/fd/N ("/dmabuf:<name>") and in debugfs bufinfo. Any holder of the
// dma-buf can rename it at any time. Names longer than [MaxNameLen] bytes, or containing
// NUL or a newline (which would corrupt fdinfo), give [errdefs.ErrInvalidArgument] without
// a syscall.
func (b *Buffer) SetName(name string) error {
	if len(name) > MaxNameLen {
		return fmt.Errorf("dma-buf ino %d: set name %q: longer than %d bytes: %w",
			b.ino, name, MaxNameLen, errdefs.ErrInvalidArgument)
	}
	if strings.ContainsAny(name, "\x00\n") {
		return fmt.Errorf("dma-buf ino %d: set name %q: contains NUL or newline: %w",
			b.ino, name, errdefs.ErrInvalidArgument)
	}
	buf := append([]byte(name), 0)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return b.closedError("set name")
	}
	if _, err := ioctl.Bytes(b.f, "DMA_BUF_SET_NAME_B", DMA_BUF_SET_NAME_B, buf); err != nil {
		return fmt.Errorf("dma-buf ino %d: set name %q: %w", b.ino, name, err)
	}
	return nil
}

// Info reads and parses /proc/self/fdinfo for the owned descriptor.
func (b *Buffer) Info() (FDInfo, error) {
	var info FDInfo
	err := b.do("fdinfo", func(fd int) error {
		// Inside Control the descriptor cannot be closed, so the number is still ours.
		text, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
		if err != nil {
			return err
		}
		info, err = ParseFDInfo(string(text))
		return err
	})
	if err != nil {
		return FDInfo{}, err
	}
	return info, nil
}

// Disown gives up ownership: it returns the file, which the caller now owns, and leaves the
// Buffer closed. It returns nil if the Buffer was closed already.
func (b *Buffer) Disown() *os.File {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.f
	b.f = nil
	return f
}

// Close closes the owned descriptor. Only the first call does anything; later calls return
// nil. It revokes nothing (see the package documentation).
func (b *Buffer) Close() error {
	b.mu.Lock()
	f := b.f
	b.f = nil
	b.mu.Unlock()
	if f == nil {
		return nil
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("dma-buf ino %d: close: %w", b.ino, err)
	}
	return nil
}

// do runs fn with the raw descriptor while holding mu, so Close waits for it.
func (b *Buffer) do(op string, fn func(fd int) error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		return b.closedError(op)
	}
	if err := control(b.f, op, fn); err != nil {
		return fmt.Errorf("dma-buf ino %d: %w", b.ino, err)
	}
	return nil
}

func (b *Buffer) closedError(op string) error {
	return fmt.Errorf("dma-buf ino %d: %s: %w", b.ino, op, os.ErrClosed)
}

// control runs fn with f's descriptor through SyscallConn().Control and keeps the errno
// (wrapped in an *os.SyscallError naming op).
func control(f *os.File, op string, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return fmt.Errorf("%s: %w (%w)", op, os.ErrClosed, err)
	}
	if ferr != nil {
		if errno, ok := ferr.(unix.Errno); ok {
			return os.NewSyscallError(op, errno)
		}
		return fmt.Errorf("%s: %w", op, ferr)
	}
	return nil
}
