package vfio

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"golang.org/x/sys/unix"
)

func TestErrorMessageAndChain(t *testing.T) {
	err := opError("export-dma-buf", "0000:00:03.0", unix.EINVAL)
	if got, want := err.Error(), "vfio 0000:00:03.0: export-dma-buf: invalid argument"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	wrapped := fmt.Errorf("lease x: %w", opError("export-dma-buf", "0000:00:03.0",
		fmt.Errorf("bar 0: %w", os.NewSyscallError("ioctl VFIO_DEVICE_FEATURE", unix.ENODEV))))
	if !errors.Is(wrapped, unix.ENODEV) {
		t.Error("errno lost through wrapping")
	}
	var ve *Error
	if !errors.As(wrapped, &ve) || ve.BDF != "0000:00:03.0" || ve.Op != "export-dma-buf" {
		t.Errorf("errors.As(*Error) = %+v", ve)
	}
	if opError("x", "y", nil) != nil {
		t.Error("opError(nil) != nil")
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
		err := opError("op", "0000:00:03.0", os.NewSyscallError("ioctl X", tt.errno))
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
	if errors.Is(opError("op", "b", unix.EIO), errdefs.ErrInvalidArgument) {
		t.Error("EIO classified")
	}
	if errors.Is(opError("op", "b", errors.New("no errno")), errdefs.ErrNotSupported) {
		t.Error("error without errno classified")
	}
}

func TestFeatureError(t *testing.T) {
	cause := fmt.Errorf("feature 11 flags 0x10000: %w", os.NewSyscallError("ioctl VFIO_DEVICE_FEATURE", unix.ENOTTY))
	var err error = &FeatureError{BDF: "0000:00:03.0", Feature: "dma-buf export", MinKernel: "6.19",
		Reason: "kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA)", Err: cause}
	if !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) {
		t.Errorf("FeatureError chain: NotSupported %v, ENOTTY %v", errors.Is(err, errdefs.ErrNotSupported), errors.Is(err, unix.ENOTTY))
	}
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Error("FeatureError matches ErrInvalidArgument")
	}
	want := "vfio 0000:00:03.0: dma-buf export not supported: kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA): " +
		"feature 11 flags 0x10000: ioctl VFIO_DEVICE_FEATURE: inappropriate ioctl for device"
	if err.Error() != want {
		t.Errorf("Error() = %q\nwant      %q", err.Error(), want)
	}
}
