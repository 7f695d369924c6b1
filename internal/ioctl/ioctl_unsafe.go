package ioctl

import (
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ioctl issues ioctl(fd, req, arg) on the descriptor behind c, where arg points to a
// mirrored kernel struct that the kernel may read and write. name is the kernel's name of
// the request (e.g. "VFIO_DEVICE_GET_INFO") and appears in errors.
//
// It returns the ioctl's non-negative return value (some requests return a new fd). On
// failure the error is an *os.SyscallError for "ioctl NAME" wrapping the errno. EINTR is
// retried. arg must not contain Go pointers unless the caller pins their targets
// (runtime.Pinner) for the duration of the call.
func Ioctl[T any](c syscall.Conn, name string, req uintptr, arg *T) (uintptr, error) {
	var r uintptr
	err := control(c, name, func(fd uintptr) syscall.Errno {
		for {
			r1, _, e := unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(arg)))
			if e != unix.EINTR {
				r = r1
				return e
			}
		}
	})
	runtime.KeepAlive(arg)
	return r, err
}

// Value issues ioctl(fd, req, v) for requests whose argument is an integer passed by
// value (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) or absent (pass 0). Errors and EINTR are
// handled as in [Ioctl].
func Value(c syscall.Conn, name string, req, v uintptr) (uintptr, error) {
	var r uintptr
	err := control(c, name, func(fd uintptr) syscall.Errno {
		for {
			r1, _, e := unix.Syscall(unix.SYS_IOCTL, fd, req, v)
			if e != unix.EINTR {
				r = r1
				return e
			}
		}
	})
	return r, err
}

// Bytes issues ioctl(fd, req, &buf[0]) for variable-length requests that are built in a
// byte slice (a header followed by an array, such as VFIO_DEVICE_FEATURE with
// VFIO_DEVICE_FEATURE_DMA_BUF, or a NUL-terminated string). The kernel may write into buf.
// buf must not be empty. Errors and EINTR are handled as in [Ioctl].
func Bytes(c syscall.Conn, name string, req uintptr, buf []byte) (uintptr, error) {
	if len(buf) == 0 {
		return 0, os.NewSyscallError("ioctl "+name, unix.EINVAL)
	}
	var r uintptr
	err := control(c, name, func(fd uintptr) syscall.Errno {
		for {
			r1, _, e := unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(&buf[0])))
			if e != unix.EINTR {
				r = r1
				return e
			}
		}
	})
	runtime.KeepAlive(buf)
	return r, err
}

// control runs call with the raw descriptor of c and turns its errno into an error.
func control(c syscall.Conn, name string, call func(fd uintptr) syscall.Errno) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("ioctl %s: %w", name, err)
	}
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) { errno = call(fd) }); err != nil {
		return controlError("ioctl "+name, err)
	}
	if errno != 0 {
		return os.NewSyscallError("ioctl "+name, errno)
	}
	return nil
}
