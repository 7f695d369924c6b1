package server

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestToStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("device 0000:00:03.0 bar 7: %w", errdefs.ErrInvalidArgument), codes.InvalidArgument},
		{fmt.Errorf("lease x: %w", errdefs.ErrNotFound), codes.NotFound},
		{fmt.Errorf("export: %w: %w", errdefs.ErrNotSupported, unix.ENOTTY), codes.Unimplemented},
		{fmt.Errorf("wrapped twice: %w", fmt.Errorf("inner: %w", errdefs.ErrFailedPrecondition)), codes.FailedPrecondition},
		{errdefs.ErrResourceExhausted, codes.ResourceExhausted},
		{errdefs.ErrPermissionDenied, codes.PermissionDenied},
		{errdefs.ErrAlreadyExists, codes.AlreadyExists},
		{errdefs.ErrUnavailable, codes.Unavailable},
		{errdefs.ErrDeadlineExceeded, codes.DeadlineExceeded},
		{context.Canceled, codes.Canceled},
		{errors.New("plain"), codes.Internal},
		{status.Error(codes.Aborted, "already a status"), codes.Aborted},
	} {
		got := toStatus(tc.err)
		s, ok := status.FromError(got)
		if !ok {
			t.Fatalf("toStatus(%v) = %v, not a status", tc.err, got)
		}
		if s.Code() != tc.code {
			t.Errorf("toStatus(%v) code = %v, want %v", tc.err, s.Code(), tc.code)
		}
		if s.Message() != tc.err.Error() && tc.code != codes.Aborted {
			t.Errorf("toStatus(%v) message = %q, want the error text", tc.err, s.Message())
		}
	}
	if toStatus(nil) != nil {
		t.Fatal("toStatus(nil) != nil")
	}
}
