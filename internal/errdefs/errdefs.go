// Package errdefs defines the error classes every mmiobroker package wraps its errors in.
// It imports only the standard library.
//
// Domain and kernel packages wrap a class with context:
//
//	fmt.Errorf("device %s bar %d: %w", bdf, bar, errdefs.ErrInvalidArgument)
//
// and only internal/server turns them into gRPC statuses, once, in its interceptors.
package errdefs

import "errors"

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
