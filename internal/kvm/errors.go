package kvm

import (
	"errors"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

// Error is a failed KVM operation. Its message reads "kvm /dev/kvm: get-api-version: …".
// Err keeps the cause, including the errno of a failed open or ioctl
// (errors.Is(err, unix.ENOENT) works).
//
// An Error matches exactly one errdefs class: Class when it is set, else the class of the
// errno in its chain (EINVAL is ErrInvalidArgument, ENOTTY and EOPNOTSUPP are
// ErrNotSupported, EPERM and EACCES are ErrPermissionDenied, ENOENT is ErrNotFound, EBUSY,
// EAGAIN and ENODEV are ErrUnavailable, ENOMEM, ENOSPC, EMFILE and ENFILE are
// ErrResourceExhausted). A missing /dev/kvm, for one, is ErrNotSupported and not
// ErrNotFound, though its errno is ENOENT.
type Error struct {
	Op    string // "open", "get-api-version", "create-vm", …
	Path  string // the KVM device node, "/dev/kvm"
	Class error  // the errdefs class; nil: the errno's
	Err   error
}

func (e *Error) Error() string {
	return "kvm " + e.Path + ": " + e.Op + ": " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is e's errdefs class.
func (e *Error) Is(target error) bool {
	if e.Class != nil {
		return target == e.Class
	}
	var errno unix.Errno
	if !errors.As(e.Err, &errno) {
		return false
	}
	c := errdefs.FromErrno(errno)
	return c != nil && c == target
}
