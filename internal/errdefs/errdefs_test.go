package errdefs

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestToGRPC(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("device 0000:00:03.0 bar 7: %w", ErrInvalidArgument), codes.InvalidArgument},
		{fmt.Errorf("lease x: %w", ErrNotFound), codes.NotFound},
		{fmt.Errorf("export: %w: %w", ErrNotSupported, unix.ENOTTY), codes.Unimplemented},
		{fmt.Errorf("wrapped twice: %w", fmt.Errorf("inner: %w", ErrFailedPrecondition)), codes.FailedPrecondition},
		{ErrResourceExhausted, codes.ResourceExhausted},
		{ErrPermissionDenied, codes.PermissionDenied},
		{ErrAlreadyExists, codes.AlreadyExists},
		{ErrUnavailable, codes.Unavailable},
		{ErrDeadlineExceeded, codes.DeadlineExceeded},
		{context.Canceled, codes.Canceled},
		{errors.New("plain"), codes.Internal},
		{status.Error(codes.Aborted, "already a status"), codes.Aborted},
	} {
		got := ToGRPC(tc.err)
		s, ok := status.FromError(got)
		if !ok {
			t.Fatalf("ToGRPC(%v) = %v, not a status", tc.err, got)
		}
		if s.Code() != tc.code {
			t.Errorf("ToGRPC(%v) code = %v, want %v", tc.err, s.Code(), tc.code)
		}
		if s.Message() != tc.err.Error() && tc.code != codes.Aborted {
			t.Errorf("ToGRPC(%v) message = %q, want the error text", tc.err, s.Message())
		}
	}
	if ToGRPC(nil) != nil {
		t.Fatal("ToGRPC(nil) != nil")
	}
}
