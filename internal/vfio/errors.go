package vfio

import (
	"errors"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

// Error is a failed operation on a VFIO device. Its message reads
// "vfio 0000:00:03.0: export-dma-buf: …". Err keeps the cause, including the errno of a
// failed ioctl (errors.Is(err, unix.ENODEV) works).
//
// Besides its chain, an Error matches the errdefs class of its errno: EINVAL is
// ErrInvalidArgument, ENOTTY and EOPNOTSUPP are ErrNotSupported, EPERM and EACCES are
// ErrPermissionDenied, ENOENT is ErrNotFound, EBUSY, EAGAIN and ENODEV are ErrUnavailable,
// ENOMEM, ENOSPC, EMFILE and ENFILE are ErrResourceExhausted.
type Error struct {
	Op  string // "open", "export-dma-buf", "set-memory-enable", …
	BDF string // "0000:00:03.0"
	Err error
}

func (e *Error) Error() string {
	return "vfio " + e.BDF + ": " + e.Op + ": " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is the errdefs class of the errno in e's chain.
func (e *Error) Is(target error) bool {
	var errno unix.Errno
	if !errors.As(e.Err, &errno) {
		return false
	}
	c := errdefs.FromErrno(errno)
	return c != nil && c == target
}

// opError wraps err as an *Error; it returns nil for nil.
func opError(op, bdf string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, BDF: bdf, Err: err}
}

// FeatureError reports that a VFIO feature is missing on this kernel or driver. It
// matches errdefs.ErrNotSupported and keeps the errno of the probe.
type FeatureError struct {
	BDF     string
	Feature string // "dma-buf export"
	// Reason says why, e.g. "kernel lacks VFIO dma-buf export (needs Linux 6.19+ with
	// PCI_P2PDMA)".
	Reason string
	// MinKernel is the first Linux release with the feature, e.g. "6.19"; "" if the
	// kernel is not the reason.
	MinKernel string
	Err       error // the probe's error (errno kept)
}

func (e *FeatureError) Error() string {
	s := "vfio " + e.BDF + ": " + e.Feature + " not supported: " + e.Reason
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the probe's error.
func (e *FeatureError) Unwrap() error { return e.Err }

// Is reports whether target is errdefs.ErrNotSupported.
func (e *FeatureError) Is(target error) bool { return target == errdefs.ErrNotSupported }
