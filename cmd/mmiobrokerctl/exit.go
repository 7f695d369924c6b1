package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Exit codes; docs/cli.md documents them. With -exec, once the command has started, the
// exit code is the command's.
const (
	exitOK                 = 0
	exitError              = 1 // any other error
	exitUsage              = 2 // bad command line
	exitNotFound           = 3
	exitPermissionDenied   = 4
	exitFailedPrecondition = 5
	exitInvalidArgument    = 6
	exitResourceExhausted  = 7
	exitUnavailable        = 8 // daemon not running or shutting down
	exitDeadlineExceeded   = 9 // -timeout elapsed, claim token expired
	exitLeaseEnded         = 10
	exitCannotExec         = 127 // -exec: the command could not be started
)

// usageError is a bad command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// leaseEndedError reports that a held lease ended by someone else's doing.
type leaseEndedError struct{ msg string }

func (e *leaseEndedError) Error() string { return e.msg }

// exitStatus is an exit status chosen by a command (-exec: the child's status).
type exitStatus struct {
	code int
	err  error // printed if not nil
}

func (e *exitStatus) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("exit status %d", e.code)
}

// exitCode returns the exit code for err.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var es *exitStatus
	if errors.As(err, &es) {
		return es.code
	}
	var ue *usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	var le *leaseEndedError
	if errors.As(err, &le) {
		return exitLeaseEnded
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return exitDeadlineExceeded
	}
	st, ok := status.FromError(err)
	if !ok {
		return exitError
	}
	switch st.Code() {
	case codes.NotFound:
		return exitNotFound
	case codes.PermissionDenied, codes.Unauthenticated:
		return exitPermissionDenied
	case codes.FailedPrecondition:
		return exitFailedPrecondition
	case codes.InvalidArgument, codes.OutOfRange:
		return exitInvalidArgument
	case codes.ResourceExhausted:
		return exitResourceExhausted
	case codes.Unavailable:
		return exitUnavailable
	case codes.DeadlineExceeded:
		return exitDeadlineExceeded
	}
	return exitError
}

// printError writes err as "mmiobrokerctl: <code>: <message>" for errors with a gRPC
// status, and "mmiobrokerctl: <message>" otherwise.
func printError(w io.Writer, err error) {
	var es *exitStatus
	if errors.As(err, &es) && es.err == nil {
		return // the command's own status: nothing to say
	}
	if es != nil {
		err = es.err
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(w, "mmiobrokerctl: %s\nRun 'mmiobrokerctl -help' for usage.\n", ue.msg)
		return
	}
	if st, ok := status.FromError(err); ok && st.Code() != codes.OK && st.Code() != codes.Unknown {
		fmt.Fprintf(w, "mmiobrokerctl: %s: %s\n", st.Code(), st.Message())
		return
	}
	fmt.Fprintf(w, "mmiobrokerctl: %v\n", err)
}
