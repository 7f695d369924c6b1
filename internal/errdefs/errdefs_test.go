package errdefs

import (
	"syscall"
	"testing"
)

func TestFromErrno(t *testing.T) {
	for errno, want := range map[syscall.Errno]error{
		syscall.EINVAL: ErrInvalidArgument, syscall.ENOTTY: ErrNotSupported, syscall.EOPNOTSUPP: ErrNotSupported,
		syscall.EPERM: ErrPermissionDenied, syscall.EACCES: ErrPermissionDenied, syscall.ENOENT: ErrNotFound,
		syscall.EBUSY: ErrUnavailable, syscall.EAGAIN: ErrUnavailable, syscall.ENODEV: ErrUnavailable,
		syscall.ENOMEM: ErrResourceExhausted, syscall.ENOSPC: ErrResourceExhausted, syscall.EMFILE: ErrResourceExhausted,
		syscall.ENFILE: ErrResourceExhausted, syscall.EIO: nil, syscall.EFAULT: nil,
	} {
		if got := FromErrno(errno); got != want {
			t.Errorf("FromErrno(%v) = %v, want %v", errno, got, want)
		}
	}
}
