package daemon

import (
	"context"
	"sync"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/host"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/server"
)

// claimSlots is how many claims the claim socket serves at once: fdpass.Options' default
// MaxConns, which the daemon keeps (claimConns counts these and as many reject slots).
const claimSlots = claimConns / 2

// hostReport answers GetHost: the host's probes (internal/host, on the configured sysfs
// and dev roots), the configured devices as the broker holds them, and the daemon's
// limits.
type hostReport struct {
	prober *host.Prober
	limits host.Limits

	mu     sync.Mutex
	opened map[string]broker.Device // guarded by mu; the device the opener last returned, by BDF
}

// newHostReport prepares the report of a daemon running res with RLIMIT_NOFILE fdLimit.
func newHostReport(c *config.Config, res *config.Resolved, fdLimit uint64) *hostReport {
	need, _ := fdBudget(res)
	bc := res.Broker.WithDefaults()
	return &hostReport{
		prober: host.New(host.Options{SysfsRoot: c.Daemon.SysfsRoot, DevRoot: c.Daemon.DevRoot}),
		limits: host.Limits{
			MaxLeases:               bc.Limits.MaxLeases,
			MaxLeasesPerHolder:      bc.Limits.MaxLeasesPerHolder,
			MaxRangesPerLease:       bc.Limits.MaxRangesPerLease,
			ClaimTimeout:            bc.ClaimTimeout,
			RevokeWithin:            bc.RevokeWithin,
			TenantCycleInterval:     bc.TenantCycleInterval,
			TenantCycleBudget:       bc.TenantCycleBudget,
			MinTTL:                  bc.MinTTL,
			MaxConnections:          res.MaxConnections,
			MaxConnectionsPerTenant: min(peercred.MaxConnsPerTenant, res.MaxConnections),
			MaxConcurrentClaims:     claimSlots,
			FDLimit:                 fdLimit,
			FDBudget:                uint64(need),
			TenantsBy:               res.Tenants.Mode.String(),
		},
		opened: map[string]broker.Device{},
	}
}

// track returns open, remembering every device it opens: per-buffer revoke is a property
// of an open device that the broker does not report.
func (h *hostReport) track(open broker.Opener) broker.Opener {
	return func(bdf string) (broker.Device, error) {
		d, err := open(bdf)
		if err == nil {
			h.mu.Lock()
			h.opened[bdf] = d
			h.mu.Unlock()
		}
		return d, err
	}
}

// source returns the server's GetHost source for the daemon's broker b.
func (h *hostReport) source(b *broker.Broker) server.HostFunc {
	return func(context.Context) (host.Report, error) {
		r := h.prober.Report(h.devices(b))
		r.Limits = h.limits
		return r, nil
	}
}

// devices describes b's devices for the host probes.
func (h *hostReport) devices(b *broker.Broker) []host.Device {
	sts := b.Devices()
	devs := make([]host.Device, len(sts))
	for i, st := range sts {
		d := host.Device{
			BDF:        st.Policy.BDF,
			Err:        st.Err,
			Mode:       st.Info.Mode,
			DMABuf:     st.Info.DMABuf,
			Unattested: st.Policy.AllowUnattestedPrivate,
			TSMPresent: st.Info.TSM.Present,
			TSMConnect: st.Info.TSM.Connect,
			TSMBound:   st.Info.TSM.Bound,
		}
		for _, k := range st.Policy.Kinds {
			d.Private = d.Private || k == broker.KindPrivate
		}
		h.mu.Lock()
		dev := h.opened[d.BDF]
		h.mu.Unlock()
		if r, ok := dev.(broker.BufferRevoker); ok && st.Err == nil {
			d.RevokeBuffers = r.CanRevokeBuffers()
		}
		devs[i] = d
	}
	return devs
}
