package vfio

import (
	"errors"
	"fmt"
	"os"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"golang.org/x/sys/unix"
)

// DMABufRevokeSupported reports whether the kernel can revoke one dma-buf of the device
// without touching the others ([Device.RevokeDMABuf]): nil, or a *[FeatureError]
// (errdefs.ErrNotSupported) saying why not. It probes
// PROBE|SET|VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE once per device; Linux 7.2 and every
// released kernel answer ENOTTY (feature 13 is an unmerged proposal). Other failures are
// returned as they are and not remembered.
func (d *Device) DMABufRevokeSupported() error {
	d.probeMu.Lock()
	defer d.probeMu.Unlock()
	if d.revokeProbed {
		return d.revokeProbeErr
	}
	var perr error
	err := d.use("probe-dma-buf-revoke", func(f *os.File) error {
		perr = probeFeature(f, VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE, VFIO_DEVICE_FEATURE_SET)
		return nil
	})
	if err != nil {
		return err
	}
	if perr != nil {
		perr = revokeFeatureError(d.bdf, d.pdev.Driver, perr)
		var fe *FeatureError
		if !errors.As(perr, &fe) {
			return opError("probe-dma-buf-revoke", d.bdf, perr)
		}
	}
	d.revokeProbed, d.revokeProbeErr = true, perr
	return perr
}

// revokeFeatureError turns the errno of a DMA_BUF_REVOKE probe into a *FeatureError, or
// returns err unchanged if the errno does not mean "not supported".
func revokeFeatureError(bdf, driver string, err error) error {
	switch {
	case errors.Is(err, unix.ENOTTY):
		return &FeatureError{BDF: bdf, Feature: "per-buffer dma-buf revoke",
			Reason: "kernel lacks VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE (proposed feature 13, in no released kernel; Linux 7.2 revokes per device only)",
			Err:    err}
	case errors.Is(err, unix.EOPNOTSUPP):
		return &FeatureError{BDF: bdf, Feature: "per-buffer dma-buf revoke",
			Reason: fmt.Sprintf("driver %s does not support it", driver), Err: err}
	case errors.Is(err, unix.EINVAL):
		// The feature exists but not with SET: not the interface this code speaks.
		return &FeatureError{BDF: bdf, Feature: "per-buffer dma-buf revoke",
			Reason: "the kernel's feature 13 does not accept SET (an interface other than the v3 proposal)", Err: err}
	}
	return err
}

// RevokeDMABuf revokes one dma-buf exported from this device, for good, leaving the
// device's other dma-bufs alone: VFIO_DEVICE_FEATURE with SET|
// VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE and struct { __s32 dmabuf_fd; }. buf is borrowed.
//
// This follows v3 (June 2026) of the unmerged series "vfio/pci: DMABUF mmap and explicit
// revoke" (docs/kernel.md §3.4): there, importers are invalidated synchronously, the fd
// stays open but dead, and the errors are EBADF or EINVAL for an fd that is not a dma-buf,
// ENODEV for another device's dma-buf and EBADFD for one already revoked for good. No
// released kernel has it, so beyond the probe this path is untested. Where
// [Device.DMABufRevokeSupported] says no, RevokeDMABuf returns that *[FeatureError]
// (errdefs.ErrNotSupported) without an ioctl: revoke per device instead (memory decode off
// and [Device.Reopen]).
func (d *Device) RevokeDMABuf(buf *os.File) error {
	if buf == nil {
		return opError("revoke-dma-buf", d.bdf, fmt.Errorf("nil dma-buf: %w", errdefs.ErrInvalidArgument))
	}
	if err := d.DMABufRevokeSupported(); err != nil {
		return err
	}
	return d.use("revoke-dma-buf", func(f *os.File) error {
		return ioctl.WithFD(buf, func(bfd int) error {
			arg := newFeatureDMABufRevoke(int32(bfd))
			if _, err := ioctl.Ioctl(f, "VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE, &arg); err != nil {
				return fmt.Errorf("dma-buf %s: %w", buf.Name(), err)
			}
			return nil
		})
	})
}
