// Package errdefs defines the error classes every mmiobroker package wraps its errors in.
// It imports only the standard library.
//
// Domain and kernel packages wrap a class with context:
//
//	fmt.Errorf("device %s bar %d: %w", bdf, bar, errdefs.ErrInvalidArgument)
//
// and only internal/server turns them into gRPC statuses, once, in its interceptors.
package errdefs

import (
	"errors"
	"syscall"
)

// The error classes. Test with errors.Is.
var (
	// ErrNotFound: the named device, lease or object does not exist.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: the object to create exists already.
	ErrAlreadyExists = errors.New("already exists")
	// ErrInvalidArgument: the request is malformed or out of range.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrPermissionDenied: the caller may not do this.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrResourceExhausted: a limit was reached.
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrFailedPrecondition: the system is not in a state that allows the request
	// (device not bound to a VFIO driver, not TSM-bound, lease already ended, …).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrUnavailable: the service or device is temporarily unavailable.
	ErrUnavailable = errors.New("unavailable")
	// ErrNotSupported: the kernel or device lacks the feature.
	ErrNotSupported = errors.New("not supported")
	// ErrDeadlineExceeded: something expired (a claim token, a deadline).
	ErrDeadlineExceeded = errors.New("deadline exceeded")
)

// FromErrno returns the class of a kernel errno, nil if it has none: EINVAL is
// ErrInvalidArgument; ENOTTY and EOPNOTSUPP ErrNotSupported; EPERM and EACCES
// ErrPermissionDenied; ENOENT ErrNotFound; EBUSY, EAGAIN and ENODEV ErrUnavailable;
// ENOMEM, ENOSPC, EMFILE and ENFILE ErrResourceExhausted. Kernel packages' error types use
// it so that an ioctl's errno classifies the same everywhere.
func FromErrno(errno syscall.Errno) error {
	switch errno {
	case syscall.EINVAL:
		return ErrInvalidArgument
	case syscall.ENOTTY, syscall.EOPNOTSUPP:
		return ErrNotSupported
	case syscall.EPERM, syscall.EACCES:
		return ErrPermissionDenied
	case syscall.ENOENT:
		return ErrNotFound
	case syscall.EBUSY, syscall.EAGAIN, syscall.ENODEV:
		return ErrUnavailable
	case syscall.ENOMEM, syscall.ENOSPC, syscall.EMFILE, syscall.ENFILE:
		return ErrResourceExhausted
	}
	return nil
}
