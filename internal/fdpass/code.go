package fdpass

import (
	"context"
	"errors"
	"fmt"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Code is the status of a claim reply. The numbers are part of the wire format and never
// change meaning.
type Code uint32

// The reply codes (docs/claim-protocol.md, "Error codes").
const (
	// CodeOK: the fd is attached.
	CodeOK Code = 0
	// CodeInvalidRequest: the request is malformed (bad magic, lengths, characters,
	// ancillary data attached, too large).
	CodeInvalidRequest Code = 1
	// CodeUnsupportedVersion: the request's protocol version is not spoken here.
	CodeUnsupportedVersion Code = 2
	// CodeNotFound: no such lease.
	CodeNotFound Code = 3
	// CodeBadToken: the token is wrong or was used already.
	CodeBadToken Code = 4
	// CodeExpired: the token expired before the claim.
	CodeExpired Code = 5
	// CodePermissionDenied: the caller is not the process that allocated the lease.
	CodePermissionDenied Code = 6
	// CodeFailedPrecondition: the lease cannot be claimed in its state (ended, revoked).
	CodeFailedPrecondition Code = 7
	// CodeResourceExhausted: too many concurrent claims; retry later.
	CodeResourceExhausted Code = 8
	// CodeUnavailable: the broker is shutting down or the device is unavailable.
	CodeUnavailable Code = 9
	// CodeInternal: a broker bug or an unexpected failure.
	CodeInternal Code = 10
)

var codeNames = [...]string{
	CodeOK:                 "OK",
	CodeInvalidRequest:     "INVALID_REQUEST",
	CodeUnsupportedVersion: "UNSUPPORTED_VERSION",
	CodeNotFound:           "NOT_FOUND",
	CodeBadToken:           "BAD_TOKEN",
	CodeExpired:            "EXPIRED",
	CodePermissionDenied:   "PERMISSION_DENIED",
	CodeFailedPrecondition: "FAILED_PRECONDITION",
	CodeResourceExhausted:  "RESOURCE_EXHAUSTED",
	CodeUnavailable:        "UNAVAILABLE",
	CodeInternal:           "INTERNAL",
}

// String returns the code's name as in the protocol document, or CODE_<n> for codes
// this version does not know.
func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

// class returns the errdefs class a code corresponds to (nil for CodeOK).
func (c Code) class() error {
	switch c {
	case CodeOK:
		return nil
	case CodeInvalidRequest, CodeUnsupportedVersion:
		return errdefs.ErrInvalidArgument
	case CodeNotFound:
		return errdefs.ErrNotFound
	case CodeBadToken, CodePermissionDenied:
		return errdefs.ErrPermissionDenied
	case CodeExpired:
		return errdefs.ErrDeadlineExceeded
	case CodeFailedPrecondition:
		return errdefs.ErrFailedPrecondition
	case CodeResourceExhausted:
		return errdefs.ErrResourceExhausted
	case CodeUnavailable:
		return errdefs.ErrUnavailable
	default:
		return nil
	}
}

// codeError is an error with an explicit reply code; see [WithCode].
type codeError struct {
	code Code
	err  error
}

func (e *codeError) Error() string { return e.err.Error() }
func (e *codeError) Unwrap() error { return e.err }

// WithCode attaches an explicit reply code to err, overriding the errdefs class mapping
// of [CodeOf]. A Claimer uses it for the one code that has no errdefs class:
// WithCode(CodeBadToken, err). It returns nil for nil.
func WithCode(code Code, err error) error {
	if err == nil {
		return nil
	}
	return &codeError{code: code, err: err}
}

// CodeOf returns the reply code for a Claimer's error. This is the one place that maps
// errdefs classes to claim codes:
//
//	WithCode(c, …)                      c
//	ErrUnsupportedVersion               UNSUPPORTED_VERSION
//	errdefs.ErrNotFound                 NOT_FOUND
//	errdefs.ErrAlreadyExists            BAD_TOKEN (the single-use token was used)
//	errdefs.ErrDeadlineExceeded         EXPIRED
//	errdefs.ErrPermissionDenied         PERMISSION_DENIED
//	errdefs.ErrFailedPrecondition       FAILED_PRECONDITION
//	errdefs.ErrInvalidArgument          INVALID_REQUEST
//	errdefs.ErrResourceExhausted        RESOURCE_EXHAUSTED
//	errdefs.ErrUnavailable, ctx errors  UNAVAILABLE
//	anything else                       INTERNAL
func CodeOf(err error) Code {
	if err == nil {
		return CodeOK
	}
	if ce, ok := errors.AsType[*codeError](err); ok {
		return ce.code
	}
	switch {
	case errors.Is(err, ErrUnsupportedVersion):
		return CodeUnsupportedVersion
	case errors.Is(err, errdefs.ErrNotFound):
		return CodeNotFound
	case errors.Is(err, errdefs.ErrAlreadyExists):
		return CodeBadToken
	case errors.Is(err, errdefs.ErrDeadlineExceeded):
		return CodeExpired
	case errors.Is(err, errdefs.ErrPermissionDenied):
		return CodePermissionDenied
	case errors.Is(err, errdefs.ErrFailedPrecondition):
		return CodeFailedPrecondition
	case errors.Is(err, errdefs.ErrInvalidArgument):
		return CodeInvalidRequest
	case errors.Is(err, errdefs.ErrResourceExhausted):
		return CodeResourceExhausted
	case errors.Is(err, errdefs.ErrUnavailable),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return CodeUnavailable
	default:
		return CodeInternal
	}
}

// ReplyError is the error [Claim] returns for an error reply. errors.Is matches it
// against the errdefs class of its code (BAD_TOKEN and PERMISSION_DENIED both match
// errdefs.ErrPermissionDenied; EXPIRED matches errdefs.ErrDeadlineExceeded).
type ReplyError struct {
	Code    Code
	LeaseID string
	Message string
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("claim lease %s: %s: %s", e.LeaseID, e.Code, e.Message)
}

// Is reports whether target is the errdefs class of e.Code.
func (e *ReplyError) Is(target error) bool {
	c := e.Code.class()
	return c != nil && c == target
}
