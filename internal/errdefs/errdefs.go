// Package errdefs defines the error classes every mmiobroker package wraps its errors in,
// and the single place where those classes become gRPC status codes.
//
// Domain and kernel packages wrap a class with context:
//
//	fmt.Errorf("device %s bar %d: %w", bdf, bar, errdefs.ErrInvalidArgument)
//
// and only internal/server turns them into statuses with [ToGRPC].
package errdefs

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

var classes = []struct {
	err  error
	code codes.Code
}{
	{ErrNotFound, codes.NotFound},
	{ErrAlreadyExists, codes.AlreadyExists},
	{ErrInvalidArgument, codes.InvalidArgument},
	{ErrPermissionDenied, codes.PermissionDenied},
	{ErrResourceExhausted, codes.ResourceExhausted},
	{ErrFailedPrecondition, codes.FailedPrecondition},
	{ErrUnavailable, codes.Unavailable},
	{ErrNotSupported, codes.Unimplemented},
	{ErrDeadlineExceeded, codes.DeadlineExceeded},
}

// Code returns the gRPC code of err's class; codes.Internal for an unclassified error (a
// failure of the daemon or the kernel that no class describes) and codes.OK for nil.
func Code(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	for _, c := range classes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return codes.Internal
}

// ToGRPC converts err into a gRPC status error whose code is err's class and whose message
// is err's full text. It returns nil for nil and leaves status errors as they are.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(Code(err), err.Error())
}
