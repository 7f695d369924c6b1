package vfio

import (
	"errors"
	"fmt"
	"os"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"golang.org/x/sys/unix"
)

// irqIndexName names a vfio-pci IRQ index for errors and logs.
func irqIndexName(index uint32) string {
	switch index {
	case VFIO_PCI_INTX_IRQ_INDEX:
		return "intx"
	case VFIO_PCI_MSI_IRQ_INDEX:
		return "msi"
	case VFIO_PCI_MSIX_IRQ_INDEX:
		return "msix"
	case VFIO_PCI_ERR_IRQ_INDEX:
		return "err"
	case VFIO_PCI_REQ_IRQ_INDEX:
		return "req"
	}
	return fmt.Sprintf("%d", index)
}

// getIRQInfo runs VFIO_DEVICE_GET_IRQ_INFO for index on the device fd f.
func getIRQInfo(f *os.File, index uint32) (IRQInfo, error) {
	arg := newIRQInfo(index)
	if _, err := ioctl.Ioctl(f, "VFIO_DEVICE_GET_IRQ_INFO", VFIO_DEVICE_GET_IRQ_INFO, &arg); err != nil {
		return IRQInfo{}, fmt.Errorf("irq index %d (%s): %w", index, irqIndexName(index), err)
	}
	return IRQInfo{Index: int(index), Flags: arg.Flags, Count: arg.Count}, nil
}

// eventfdIRQ checks that the device offers IRQ index with an eventfd, before
// VFIO_DEVICE_SET_IRQS: index below NumIRQs, GET_IRQ_INFO answering with count > 0 and
// VFIO_IRQ_INFO_EVENTFD. A device without it gets a *FeatureError saying why.
// d.mu is held for reading.
func (d *Device) eventfdIRQ(f *os.File, index uint32) error {
	if index >= d.info.NumIRQs {
		return fmt.Errorf("irq index %d (%s): the device has %d irq indexes: %w",
			index, irqIndexName(index), d.info.NumIRQs, errdefs.ErrInvalidArgument)
	}
	feature := fmt.Sprintf("irq index %d (%s)", index, irqIndexName(index))
	info, err := getIRQInfo(f, index)
	switch {
	case err == nil:
	case index == VFIO_PCI_ERR_IRQ_INDEX && errors.Is(err, unix.EINVAL):
		// vfio_pci_ioctl_get_irq_info refuses the ERR index for conventional PCI devices.
		return &FeatureError{BDF: d.bdf, Feature: "AER error notifier (VFIO_PCI_ERR_IRQ_INDEX)",
			Reason: "vfio-pci offers it only for PCI Express devices, and this one is conventional PCI", Err: err}
	default:
		return err
	}
	if info.Count == 0 {
		return &FeatureError{BDF: d.bdf, Feature: feature,
			Reason: fmt.Sprintf("the driver reports 0 interrupts at this index (flags %#x)", info.Flags)}
	}
	if info.Flags&VFIO_IRQ_INFO_EVENTFD == 0 {
		return &FeatureError{BDF: d.bdf, Feature: feature,
			Reason: fmt.Sprintf("the driver cannot signal it through an eventfd (flags %#x)", info.Flags)}
	}
	return nil
}

// SetIRQEventfd has the kernel signal ev, an eventfd, for IRQ index (VFIO_DEVICE_SET_IRQS
// with DATA_EVENTFD|ACTION_TRIGGER, start 0, count 1), replacing any eventfd set before.
// It is meant for the single-vector indexes VFIO_PCI_REQ_IRQ_INDEX and
// VFIO_PCI_ERR_IRQ_INDEX. It first checks with VFIO_DEVICE_GET_IRQ_INFO that the device
// has the index; if not, the error is a *[FeatureError] (errdefs.ErrNotSupported) saying
// why: a conventional PCI device has no ERR index.
//
// The kernel takes its own reference to the eventfd: ev stays the caller's, and closing it
// does not unregister it. The registration ends with [Device.ClearIRQ] and with the close
// of the device fd, so it does not survive [Device.Reopen]: set it again afterwards.
func (d *Device) SetIRQEventfd(index uint32, ev *os.File) error {
	if ev == nil {
		return opError("set-irqs", d.bdf, fmt.Errorf("irq index %d (%s): nil eventfd: %w", index, irqIndexName(index), errdefs.ErrInvalidArgument))
	}
	var ferr error
	err := d.use("set-irqs", func(f *os.File) error {
		if err := d.eventfdIRQ(f, index); err != nil {
			var fe *FeatureError
			if errors.As(err, &fe) {
				ferr = err
				return nil
			}
			return err
		}
		err := ioctl.WithFD(ev, func(efd int) error {
			arg := newIRQSetEventfd(index, int32(efd))
			_, err := ioctl.Ioctl(f, "VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS, &arg)
			return err
		})
		if err != nil {
			return fmt.Errorf("irq index %d (%s): eventfd: %w", index, irqIndexName(index), err)
		}
		return nil
	})
	if ferr != nil {
		return ferr // a *FeatureError names the device itself
	}
	return err
}

// ClearIRQ disables IRQ index as a whole (VFIO_DEVICE_SET_IRQS with
// DATA_NONE|ACTION_TRIGGER, count 0): for REQ and ERR, the kernel drops the eventfd set
// by [Device.SetIRQEventfd]. Clearing an index that has no eventfd fails with EINVAL.
func (d *Device) ClearIRQ(index uint32) error {
	return d.use("set-irqs", func(f *os.File) error {
		if index >= d.info.NumIRQs {
			return fmt.Errorf("irq index %d (%s): the device has %d irq indexes: %w",
				index, irqIndexName(index), d.info.NumIRQs, errdefs.ErrInvalidArgument)
		}
		arg := newIRQSetNone(index)
		if _, err := ioctl.Ioctl(f, "VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS, &arg); err != nil {
			return fmt.Errorf("irq index %d (%s): clear: %w", index, irqIndexName(index), err)
		}
		return nil
	})
}
