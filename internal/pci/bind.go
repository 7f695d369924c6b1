package pci

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// BindVFIO binds device a to vfio-pci and returns the driver it was bound to before ("" if
// it was unbound), for [Sysfs.RestoreDriver].
//
// If a is already bound to a VFIO PCI driver, vfio-pci or a vfio variant such as
// mlx5_vfio_pci ([Device.VFIOBound]), BindVFIO changes nothing and returns "vfio-pci"
// ([VFIODriver]), which tells the caller and RestoreDriver that there is nothing to undo:
// VFIO opens the device as it is, and moving it from its variant to vfio-pci would only
// lose the variant's features. Otherwise it writes "vfio-pci" to driver_override, unbinds a from its current driver
// (driver/unbind), asks the kernel to probe it again (bus/pci/drivers_probe) and checks that
// vfio-pci took it. If any step fails it tries to put the device back where it was and
// returns the error, which names the device and the sysfs file. If the vfio-pci driver is
// not loaded the error wraps [errdefs.ErrFailedPrecondition] and nothing is written.
//
// Unbinding a device from its driver cuts off whatever used it; callers decide whether that
// is acceptable. BindVFIO moves only a: for the VFIO group path every other member of a's
// IOMMU group must be unbound or bound to vfio-pci too (see [Sysfs.GroupMembers]).
func (s Sysfs) BindVFIO(a Address) (previous string, err error) {
	d, err := s.Device(a)
	if err != nil {
		return "", err
	}
	if d.VFIOBound() {
		return VFIODriver, nil
	}
	if _, err := os.Stat(s.DriverPath(VFIODriver)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("pci device %s: bind to vfio-pci: driver not loaded (try: modprobe vfio-pci): %w: %w",
				a, errdefs.ErrFailedPrecondition, err)
		}
		return "", devError(a, err)
	}
	previous = d.Driver
	dir := s.DevicePath(a)

	if err := s.write(a, filepath.Join(dir, "driver_override"), VFIODriver); err != nil {
		return "", err
	}
	if previous != "" {
		if err := s.write(a, filepath.Join(dir, "driver", "unbind"), a.String()); err != nil {
			return "", errors.Join(err, s.undoOverride(a, previous))
		}
	}
	if err := s.write(a, filepath.Join(s.root(), "bus", "pci", "drivers_probe"), a.String()); err != nil {
		return "", errors.Join(err, s.undoOverride(a, previous))
	}
	now, err := s.Device(a)
	if err != nil {
		return "", err
	}
	if now.Driver != VFIODriver {
		err := fmt.Errorf("pci device %s: bind to vfio-pci: after drivers_probe the driver is %q (see dmesg): %w",
			a, now.Driver, errdefs.ErrFailedPrecondition)
		return "", errors.Join(err, s.undoOverride(a, previous))
	}
	return previous, nil
}

// RestoreDriver undoes [Sysfs.BindVFIO]: given the driver BindVFIO returned, it unbinds a
// from vfio-pci, clears driver_override and binds a to previous again (by writing to
// bus/pci/drivers/<previous>/bind, or through drivers_probe if that driver has no
// directory). With previous "" the device is left unbound; with previous "vfio-pci" (BindVFIO
// found the device bound to vfio-pci or a vfio variant already) RestoreDriver does nothing. A driver_override that
// was set before BindVFIO is not brought back: RestoreDriver leaves it cleared.
//
// If a is bound to a driver other than vfio-pci and previous, someone else moved it and
// RestoreDriver returns an error wrapping [errdefs.ErrFailedPrecondition] without writing.
//
// Call it only after every VFIO file descriptor of the device is closed: while one is open,
// the kernel's unbind from vfio-pci blocks (it signals the device request eventfd and waits
// for the holder to let go).
func (s Sysfs) RestoreDriver(a Address, previous string) error {
	if previous == VFIODriver {
		return nil
	}
	d, err := s.Device(a)
	if err != nil {
		return err
	}
	switch d.Driver {
	case VFIODriver:
		if err := s.write(a, filepath.Join(s.DevicePath(a), "driver", "unbind"), a.String()); err != nil {
			return err
		}
	case previous:
		// Already back (or never left); still clear the override below.
	case "":
	default:
		return fmt.Errorf("pci device %s: restore driver %q: device is bound to %q now, leaving it: %w",
			a, previous, d.Driver, errdefs.ErrFailedPrecondition)
	}
	if err := s.clearOverride(a); err != nil {
		return err
	}
	if previous == "" {
		return nil
	}
	now, err := s.Device(a)
	if err != nil {
		return err
	}
	if now.Driver == previous {
		return nil
	}
	if now.Driver == "" {
		if err := s.bindTo(a, previous); err != nil {
			return err
		}
		if now, err = s.Device(a); err != nil {
			return err
		}
	}
	if now.Driver != previous {
		return fmt.Errorf("pci device %s: restore driver %q: device is bound to %q instead (see dmesg): %w",
			a, previous, now.Driver, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// undoOverride is BindVFIO's best-effort rollback after a failed step.
func (s Sysfs) undoOverride(a Address, previous string) error {
	d, err := s.Device(a)
	if err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	if d.Driver == VFIODriver {
		// Probe succeeded after all; leave it to RestoreDriver.
		return s.RestoreDriver(a, previous)
	}
	if err := s.clearOverride(a); err != nil {
		return fmt.Errorf("rollback: %w", err)
	}
	if d.Driver == "" && previous != "" {
		if err := s.bindTo(a, previous); err != nil {
			return fmt.Errorf("rollback: %w", err)
		}
	}
	return nil
}

// bindTo binds the unbound device a to driver by writing to its bind attribute, or asks the
// kernel to probe a if that driver has no directory (its module is not loaded).
func (s Sysfs) bindTo(a Address, driver string) error {
	target := filepath.Join(s.DriverPath(driver), "bind")
	if _, err := os.Stat(target); err != nil {
		target = filepath.Join(s.root(), "bus", "pci", "drivers_probe")
	}
	return s.write(a, target, a.String())
}

func (s Sysfs) clearOverride(a Address) error {
	return s.write(a, filepath.Join(s.DevicePath(a), "driver_override"), "\n")
}

// write writes val to the sysfs attribute path in one write(2). The attribute must exist:
// sysfs files cannot be created.
func (s Sysfs) write(a Address, path, val string) error {
	var err error
	if s.Writer != nil {
		err = s.Writer.WriteAttr(path, []byte(val))
	} else {
		err = writeAttr(path, []byte(val))
	}
	if err != nil {
		return fmt.Errorf("pci device %s: write %q to %s: %w", a, val, path, err)
	}
	return nil
}

func writeAttr(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return unwrapPath(err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return unwrapPath(err)
}

// unwrapPath drops the *fs.PathError around an errno: the caller names the path already.
func unwrapPath(err error) error {
	if pe, ok := errors.AsType[*fs.PathError](err); ok {
		return os.NewSyscallError(pe.Op, pe.Err)
	}
	return err
}
