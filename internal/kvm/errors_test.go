package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

func TestErrorMessageAndChain(t *testing.T) {
	var err error = &Error{Op: "create-vm", Path: "/dev/kvm", Err: os.NewSyscallError("ioctl KVM_CREATE_VM", unix.ENOMEM)}
	if got, want := err.Error(), "kvm /dev/kvm: create-vm: ioctl KVM_CREATE_VM: cannot allocate memory"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	wrapped := fmt.Errorf("host facts: %w", err)
	if !errors.Is(wrapped, unix.ENOMEM) || !errors.Is(wrapped, errdefs.ErrResourceExhausted) {
		t.Errorf("errno or class lost through wrapping: %v", wrapped)
	}
	var ke *Error
	if !errors.As(wrapped, &ke) || ke.Op != "create-vm" || ke.Path != "/dev/kvm" {
		t.Errorf("errors.As(*Error) = %+v", ke)
	}
}

// TestErrorClasses: the error type is its errno's errdefs class.
func TestErrorClasses(t *testing.T) {
	for _, tt := range []struct {
		errno unix.Errno
		class error
	}{
		// The whole errno table is errdefs.FromErrno's (tested there); these show that
		// the error type classifies through it and keeps the errno.
		{unix.EINVAL, errdefs.ErrInvalidArgument},
		{unix.EBUSY, errdefs.ErrUnavailable},
	} {
		err := &Error{Op: "op", Path: "/dev/kvm", Err: os.NewSyscallError("ioctl X", tt.errno)}
		if !errors.Is(err, tt.class) {
			t.Errorf("%v: not %v", tt.errno, tt.class)
		}
		if !errors.Is(err, tt.errno) {
			t.Errorf("%v: errno lost", tt.errno)
		}
		if errors.Is(err, errdefs.ErrDeadlineExceeded) {
			t.Errorf("%v: matches an unrelated class", tt.errno)
		}
	}
	if errors.Is(&Error{Op: "op", Path: "p", Err: unix.EIO}, errdefs.ErrInvalidArgument) {
		t.Error("EIO classified")
	}
	if errors.Is(&Error{Op: "op", Path: "p", Err: errors.New("no errno")}, errdefs.ErrNotSupported) {
		t.Error("error without errno classified")
	}
}

// An explicit class replaces the errno's: a missing /dev/kvm is "not supported", not
// "not found", so the daemon's status mapping has one answer.
func TestErrorClassOverridesErrno(t *testing.T) {
	err := &Error{Op: "open", Path: "/dev/kvm", Class: errdefs.ErrNotSupported,
		Err: &fs.PathError{Op: "open", Path: "/dev/kvm", Err: unix.ENOENT}}
	if !errors.Is(err, errdefs.ErrNotSupported) {
		t.Error("explicit class not matched")
	}
	if errors.Is(err, errdefs.ErrNotFound) {
		t.Error("errno class matched despite an explicit class")
	}
	if !errors.Is(err, unix.ENOENT) || !errors.Is(err, fs.ErrNotExist) {
		t.Error("errno lost")
	}
}

func TestOpenError(t *testing.T) {
	for _, tt := range []struct {
		errno unix.Errno
		class error
		hint  string
	}{
		{unix.ENOENT, errdefs.ErrNotSupported, "no KVM on this host"},
		{unix.ENXIO, errdefs.ErrNotSupported, "no KVM driver"},
		{unix.ENODEV, errdefs.ErrNotSupported, "no KVM driver"},
		{unix.EACCES, errdefs.ErrPermissionDenied, "kvm group"},
		{unix.EPERM, errdefs.ErrPermissionDenied, "DeviceAllow=/x/kvm rw"},
		{unix.EMFILE, errdefs.ErrResourceExhausted, "too many open files"},
	} {
		t.Run(tt.errno.Error(), func(t *testing.T) {
			err := openError("/x/kvm", &fs.PathError{Op: "open", Path: "/x/kvm", Err: tt.errno})
			if !errors.Is(err, tt.class) || !errors.Is(err, tt.errno) {
				t.Errorf("openError = %v; want class %v and errno %v", err, tt.class, tt.errno)
			}
			if msg := err.Error(); !strings.Contains(msg, "/x/kvm") || !strings.Contains(msg, tt.hint) {
				t.Errorf("message %q lacks the path or %q", msg, tt.hint)
			}
		})
	}
}
