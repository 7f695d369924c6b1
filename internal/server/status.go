package server

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// classes maps the errdefs classes to gRPC codes: the one place where they meet.
var classes = []struct {
	err  error
	code codes.Code
}{
	{errdefs.ErrNotFound, codes.NotFound},
	{errdefs.ErrAlreadyExists, codes.AlreadyExists},
	{errdefs.ErrInvalidArgument, codes.InvalidArgument},
	{errdefs.ErrPermissionDenied, codes.PermissionDenied},
	{errdefs.ErrResourceExhausted, codes.ResourceExhausted},
	{errdefs.ErrFailedPrecondition, codes.FailedPrecondition},
	{errdefs.ErrUnavailable, codes.Unavailable},
	{errdefs.ErrNotSupported, codes.Unimplemented},
	{errdefs.ErrDeadlineExceeded, codes.DeadlineExceeded},
}

// code returns the gRPC code of err's class; codes.Internal for an unclassified error (a
// failure of the daemon or the kernel that no class describes) and codes.OK for nil.
func code(err error) codes.Code {
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

// toStatus converts err into a gRPC status error whose code is err's class and whose
// message is err's full text. It returns nil for nil and leaves status errors as they are.
// The interceptors apply it to every handler's error.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(code(err), err.Error())
}
