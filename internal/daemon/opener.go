package daemon

import (
	"fmt"
	"log/slog"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/hostdev"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// HostOpener returns the broker's opener of real devices: internal/hostdev with each
// device's configured access mode, sysfs and /dev roots and managed binding, keeping
// their fds with keeper (nil: none kept).
func HostOpener(res *config.Resolved, log *slog.Logger, keeper vfio.Keeper) broker.Opener {
	return func(bdf string) (broker.Device, error) {
		o, ok := res.DeviceOpen(bdf)
		if !ok {
			return nil, fmt.Errorf("device %s: not configured: %w", bdf, errdefs.ErrNotFound)
		}
		d, err := hostdev.Open(o.Address, hostdev.Options{
			Mode:        o.AccessMode,
			Sysfs:       pci.Sysfs{Root: o.SysfsRoot},
			DevRoot:     o.DevRoot,
			ManagedBind: o.ManagedBind,
			Log:         log,
			Keeper:      keeper,
		})
		if err != nil {
			return nil, err // not a typed nil in the interface
		}
		return d, nil
	}
}
