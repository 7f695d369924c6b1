package broker

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Defaults applied by [Config.WithDefaults].
const (
	DefaultClaimTimeout       = 30 * time.Second
	DefaultMaxRangesPerLease  = 16
	DefaultMaxLeasesPerHolder = 64
	DefaultMaxLeases          = 4096
	DefaultEventBacklog       = 1024
	DefaultPageSize           = 4096
)

// Config is the broker's configuration.
type Config struct {
	Devices []DeviceConfig
	Limits  Limits
	// ClaimTimeout is how long a claim token of a new lease stays valid; an unclaimed
	// lease is then released. Zero means DefaultClaimTimeout.
	ClaimTimeout time.Duration
	// EventBacklog is how many past events [Broker.Subscribe] can replay.
	EventBacklog int
	// PageSize is the alignment of lease ranges. Zero means DefaultPageSize.
	PageSize uint64
	// RevokeWithin is the bound R of the revocation model: a lease that its tenant ended
	// (release, holder exit, ttl expiry) after its fd left the broker is ended-but-live
	// until its device's next cycle, which comes at the latest RevokeWithin after the end.
	// Zero: the device cycles at once on every such end.
	RevokeWithin time.Duration
	// TenantCycleInterval is the bound C: device cycles that tenants cause happen at most
	// once per TenantCycleInterval per device. At most RevokeWithin/2. Zero: no limit.
	TenantCycleInterval time.Duration
	// TenantCycleBudget bounds the device cycles one tenant may cause on demand (an
	// allocation that must not share ranges of ended-but-live leases) per hour, over all
	// devices. Zero: no budget.
	TenantCycleBudget int
	// MinTTL is the shortest time to live a tenant may ask for (admins are exempt). Zero:
	// no minimum.
	MinTTL time.Duration
	// PeerUnits says the claim path resolves the cgroup unit of claiming processes
	// (Peer.Unit; tenants by cgroup), which delegated leases need.
	PeerUnits bool
}

// DeviceConfig is the policy of one configured device.
type DeviceConfig struct {
	// BDF is the device's PCI address, e.g. 0000:00:03.0.
	BDF string
	// BARs lists the BAR indexes that may be leased; empty means every memory BAR.
	BARs []int
	// Kinds lists the lease kinds allowed; empty means shared only.
	Kinds []Kind
	// UIDs and GIDs may lease the device (besides admins). Both empty: admins only.
	UIDs []uint32
	GIDs []uint32
	// AllowUnattestedPrivate grants private leases on a device that is not TSM-bound. For
	// test rigs; such leases are marked Unattested.
	AllowUnattestedPrivate bool
}

// Limits bound what clients can hold.
type Limits struct {
	// MaxLeasesPerHolder bounds the live leases of one uid. Zero means the default.
	MaxLeasesPerHolder int
	// MaxLeases bounds the live leases of the broker. Zero means the default.
	MaxLeases int
	// MaxRangesPerLease bounds the ranges of one lease (at most 16). Zero means 16.
	MaxRangesPerLease int
}

// WithDefaults returns c with every zero setting that has a default set to it, as the
// broker runs it.
func (c Config) WithDefaults() Config {
	if c.ClaimTimeout == 0 {
		c.ClaimTimeout = DefaultClaimTimeout
	}
	if c.EventBacklog == 0 {
		c.EventBacklog = DefaultEventBacklog
	}
	if c.PageSize == 0 {
		c.PageSize = DefaultPageSize
	}
	if c.Limits.MaxLeasesPerHolder == 0 {
		c.Limits.MaxLeasesPerHolder = DefaultMaxLeasesPerHolder
	}
	if c.Limits.MaxLeases == 0 {
		c.Limits.MaxLeases = DefaultMaxLeases
	}
	if c.Limits.MaxRangesPerLease == 0 {
		c.Limits.MaxRangesPerLease = DefaultMaxRangesPerLease
	}
	for i := range c.Devices {
		if len(c.Devices[i].Kinds) == 0 {
			c.Devices[i].Kinds = []Kind{KindShared}
		}
	}
	return c
}

// Validate reports every problem of c, each naming the device or field at fault.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...))
	}
	seen := map[string]bool{}
	for i, d := range c.Devices {
		if d.BDF == "" {
			bad("device #%d: no PCI address", i+1)
			continue
		}
		if seen[d.BDF] {
			bad("device %s: configured twice", d.BDF)
		}
		seen[d.BDF] = true
		for _, b := range d.BARs {
			if b < 0 || b > 5 {
				bad("device %s: bar %d: only memory BARs 0-5 can be leased", d.BDF, b)
			}
		}
		for _, k := range d.Kinds {
			if k != KindShared && k != KindPrivate {
				bad("device %s: unknown lease kind %d", d.BDF, int(k))
			}
		}
		if d.AllowUnattestedPrivate && len(d.Kinds) > 0 && !slices.Contains(d.Kinds, KindPrivate) {
			bad("device %s: allow_unattested_private set but private leases are not allowed", d.BDF)
		}
	}
	if c.ClaimTimeout < 0 {
		bad("claim timeout %v is negative", c.ClaimTimeout)
	}
	if c.RevokeWithin < 0 || c.TenantCycleInterval < 0 || c.MinTTL < 0 || c.TenantCycleBudget < 0 {
		bad("revoke within %v, tenant cycle interval %v, min ttl %v and tenant cycle budget %d must not be negative",
			c.RevokeWithin, c.TenantCycleInterval, c.MinTTL, c.TenantCycleBudget)
	}
	if c.TenantCycleInterval > c.RevokeWithin/2 {
		bad("tenant cycle interval (C) %v is longer than half of revoke within (R) %v: ended leases could not be revoked within R (their cycle starts R/2 after the end)", c.TenantCycleInterval, c.RevokeWithin)
	}
	if c.EventBacklog < 0 {
		bad("event backlog %d is negative", c.EventBacklog)
	}
	if c.PageSize != 0 && c.PageSize&(c.PageSize-1) != 0 {
		bad("page size %d is not a power of two", c.PageSize)
	}
	l := c.Limits
	if l.MaxLeasesPerHolder < 0 || l.MaxLeases < 0 {
		bad("lease limits must not be negative")
	}
	if l.MaxRangesPerLease < 0 || l.MaxRangesPerLease > DefaultMaxRangesPerLease {
		bad("max ranges per lease %d is outside 1-%d", l.MaxRangesPerLease, DefaultMaxRangesPerLease)
	}
	return errors.Join(errs...)
}
