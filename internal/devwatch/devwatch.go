// Package devwatch keeps the broker's view of its devices in step with the kernel. It
// turns kobject uevents of the configured PCI devices into broker calls — removal and
// driver unbind end the device's leases (reason device_lost), a bind to a VFIO PCI driver
// (vfio-pci or a vfio variant, [pci.Device.VFIOBound]) makes the device leasable again, a
// bind to any other driver keeps it lost — and resyncs from sysfs when the uevent socket
// overflowed and events were lost.
//
// The kernel's own request to release a device (VFIO_PCI_REQ_IRQ_INDEX, which blocks an
// unbind or hot-unplug until the device fd is closed) reaches the broker directly from
// the device (broker.Notifier); the uevents seen here follow once the unbind or removal
// has happened, and catch what bypasses VFIO (a device that was never opened, a rebind).
package devwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sync"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/uevent"
)

// Source yields uevents; *uevent.Listener is one. Next returns an error wrapping
// uevent.ErrOverflow when events were lost.
type Source interface {
	Next(ctx context.Context) (uevent.Event, error)
}

// Broker is what devwatch needs of *broker.Broker.
type Broker interface {
	Devices() []broker.DeviceStatus
	DeviceLost(bdf string, cause error) error
	DeviceAvailable(bdf string) (broker.DeviceStatus, error)
	TSMChanged(bdf string) (int, error)
}

// Watcher applies device events to a broker.
type Watcher struct {
	Source Source
	Broker Broker
	// Sysfs is read on a bind event, to tell a VFIO driver by its vfio-dev entry, and to
	// resync after an overflow.
	Sysfs pci.Sysfs
	Log   *slog.Logger
	// ResyncInterval, if positive, resyncs from sysfs that often besides on overflows:
	// the TSM state of a device (tsm/bound) may change without a uevent.
	ResyncInterval time.Duration
}

// Run applies events until ctx ends (it then returns nil) or the source fails for another
// reason than an overflow.
func (w *Watcher) Run(ctx context.Context) error {
	log := w.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if w.ResyncInterval > 0 {
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			t := time.NewTicker(w.ResyncInterval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					w.Resync(log)
				}
			}
		})
	}
	for {
		ev, err := w.Source.Next(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, uevent.ErrOverflow):
			log.Warn("uevents were lost; resyncing devices from sysfs", "err", err)
			w.Resync(log)
			continue
		case errors.Is(err, uevent.ErrMalformed):
			log.Warn("malformed uevent ignored", "err", err)
			continue
		case err != nil:
			return fmt.Errorf("device events: %w", err)
		}
		w.Apply(ev, log)
	}
}

// configured returns the configured devices by BDF.
func (w *Watcher) configured() map[string]broker.DeviceStatus {
	out := map[string]broker.DeviceStatus{}
	for _, d := range w.Broker.Devices() {
		out[d.Policy.BDF] = d
	}
	return out
}

// Apply acts on one uevent.
func (w *Watcher) Apply(ev uevent.Event, log *slog.Logger) {
	if ev.Subsystem != "pci" {
		return
	}
	bdf := ev.PCISlotName
	if bdf == "" {
		bdf = path.Base(ev.DevPath)
	}
	if _, ok := w.configured()[bdf]; !ok {
		return
	}
	switch ev.Action {
	case "remove":
		w.lost(bdf, errors.New("device removed (hot-unplug)"), log)
	case "unbind":
		w.lost(bdf, errors.New("device unbound from its driver"), log)
	case "change":
		// The TSM state (tsm/bound) may have changed: private leases need it bound.
		w.tsm(bdf, log)
	case "bind":
		// The event names the driver; sysfs tells whether it is a VFIO one (its vfio-dev
		// entry exists by the time the kernel sends the event) and what is bound now. A
		// device gone meanwhile is judged by the event's driver name; its remove follows.
		dev := pci.Device{Driver: ev.Driver}
		if addr, err := pci.ParseAddress(bdf); err == nil {
			if d, err := w.Sysfs.Device(addr); err == nil {
				dev = d
			}
		}
		if !dev.VFIOBound() {
			w.lost(bdf, notVFIO(dev), log)
			return
		}
		w.available(bdf, log)
	}
}

// notVFIO says why dev, not bound to a VFIO driver, cannot be leased.
func notVFIO(dev pci.Device) error {
	if dev.Driver == "" {
		return errors.New("device not bound to a driver")
	}
	return fmt.Errorf("device bound to %s, not a VFIO driver (vfio-pci or a vfio variant)", dev.Driver)
}

// Resync compares every configured device with sysfs: a device bound to a VFIO PCI driver
// ([pci.Device.VFIOBound]) is made available, any other is lost.
func (w *Watcher) Resync(log *slog.Logger) {
	for bdf, st := range w.configured() {
		addr, err := pci.ParseAddress(bdf)
		if err != nil {
			continue
		}
		dev, err := w.Sysfs.Device(addr)
		switch {
		case err != nil:
			if st.Err == nil {
				w.lost(bdf, fmt.Errorf("device gone from sysfs: %w", err), log)
			}
		case !dev.VFIOBound():
			if st.Err == nil {
				w.lost(bdf, notVFIO(dev), log)
			}
		case st.Err != nil:
			w.available(bdf, log)
		default:
			w.tsm(bdf, log)
		}
	}
}

// tsm has the broker check the device's TSM state again.
func (w *Watcher) tsm(bdf string, log *slog.Logger) {
	if _, err := w.Broker.TSMChanged(bdf); err != nil {
		log.Error("revoking private leases of a device that left the TSM-bound state failed", "bdf", bdf, "err", err)
	}
}

func (w *Watcher) lost(bdf string, cause error, log *slog.Logger) {
	log.Warn("device went away", "bdf", bdf, "cause", cause)
	if err := w.Broker.DeviceLost(bdf, cause); err != nil {
		log.Error("ending the leases of a lost device failed", "bdf", bdf, "err", err)
	}
}

func (w *Watcher) available(bdf string, log *slog.Logger) {
	if _, err := w.Broker.DeviceAvailable(bdf); err != nil {
		log.Warn("device bound to a VFIO driver but not usable", "bdf", bdf, "err", err)
		return
	}
	log.Info("device available again", "bdf", bdf)
}
