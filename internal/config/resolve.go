package config

import (
	"errors"
	"fmt"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
	"os/user"
	"slices"
	"strconv"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// Lookup resolves user and group names to ids.
type Lookup interface {
	LookupUser(name string) (uid uint32, err error)
	LookupGroup(name string) (gid uint32, err error)
}

// OSLookup returns a [Lookup] backed by os/user (the user and group databases).
func OSLookup() Lookup { return osLookup{} }

type osLookup struct{}

func (osLookup) LookupUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if errors.As(err, new(user.UnknownUserError)) {
		return 0, errors.New("no such user")
	}
	if err != nil {
		return 0, err
	}
	return parseID(u.Uid)
}

func (osLookup) LookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if errors.As(err, new(user.UnknownGroupError)) {
		return 0, errors.New("no such group")
	}
	if err != nil {
		return 0, err
	}
	return parseID(g.Gid)
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("id %q is not a number", s)
	}
	return uint32(n), nil
}

// Resolved is a validated configuration with every name resolved, in the form the daemon's
// parts take it.
type Resolved struct {
	// Broker is the broker's configuration: devices (by canonical address), limits.
	Broker broker.Config
	// SocketGID is the group given to both sockets, or -1 to keep the daemon's group.
	SocketGID int
	// AdminGID is the group whose members are administrators, or -1 for root only.
	AdminGID int
	// Devices holds how to open each device, in configuration order.
	Devices []DeviceOpen
	// Tenants resolves callers' tenant identities.
	Tenants tenant.Resolver
	// Metrics says where the daemon serves its metrics.
	Metrics MetricsListen
	// MaxConnections bounds the control socket's connections ([limits] max_connections).
	MaxConnections int
}

// MetricsListen is the [metrics] table resolved.
type MetricsListen struct {
	// Socket is the metrics socket's absolute path, "" for none; SocketMode its
	// permission bits; SocketGID its group, -1 to keep the daemon's.
	Socket     string
	SocketMode FileMode
	SocketGID  int
	// Listen is a loopback TCP address, "" for none.
	Listen string
}

// DeviceOpen says how to open one device.
type DeviceOpen struct {
	Address pci.Address
	// AccessMode is "auto", "group" or "cdev".
	AccessMode string
	SysfsRoot  string
	DevRoot    string
	// ManagedBind lets the opener bind the device to vfio-pci and restore its driver later.
	ManagedBind bool
}

// DeviceOpen returns how to open the device at bdf (canonical form).
func (r *Resolved) DeviceOpen(bdf string) (DeviceOpen, bool) {
	for _, d := range r.Devices {
		if d.Address.String() == bdf {
			return d, true
		}
	}
	return DeviceOpen{}, false
}

// Resolve validates c, resolves user and group names with look, and converts the result.
// Every problem is reported at once, as by [Config.Validate].
func (c *Config) Resolve(look Lookup) (*Resolved, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	v := validator{c: c}
	mode, _ := tenant.ParseMode(c.Tenants.By) // validated
	r := &Resolved{
		Tenants:        tenant.Resolver{Mode: mode, Units: append([]string{}, c.Tenants.Units...)},
		MaxConnections: c.Limits.MaxConnections,
		SocketGID:      v.gid(look, "daemon.socket_group", c.Daemon.SocketGroup),
		AdminGID:       v.gid(look, "daemon.admin_group", c.Daemon.AdminGroup),
		Metrics: MetricsListen{Socket: c.MetricsSocket(), SocketMode: c.Metrics.SocketMode,
			SocketGID: v.gid(look, "metrics.socket_group", c.Metrics.SocketGroup), Listen: c.Metrics.Listen},
		Broker: broker.Config{
			Limits: broker.Limits{
				MaxLeasesPerHolder: c.Limits.MaxLeasesPerHolder,
				MaxLeases:          c.Limits.MaxLeases,
				MaxRangesPerLease:  c.Limits.MaxRangesPerLease,
			},
			ClaimTimeout:        time.Duration(c.Limits.ClaimTimeout),
			EventBacklog:        c.Limits.EventBacklog,
			RevokeWithin:        time.Duration(c.Limits.RevokeWithin),
			TenantCycleInterval: time.Duration(c.Limits.TenantCycleInterval),
			TenantCycleBudget:   c.Limits.TenantCycleBudget,
			MinTTL:              time.Duration(c.Limits.MinTTL),
		},
	}
	for i, d := range c.Devices {
		addr, _ := pci.ParseAddress(d.Address) // validated
		loc := "device." + strconv.Itoa(i)
		name := c.deviceName(i)
		bc := broker.DeviceConfig{
			BDF:                    addr.String(),
			BARs:                   slices.Clone(d.BARs),
			UIDs:                   slices.Clone(d.AllowUIDs),
			GIDs:                   slices.Clone(d.AllowGIDs),
			AllowUnattestedPrivate: d.AllowUnattestedPrivate,
		}
		for _, k := range d.Kinds {
			kind, _ := broker.ParseKind(k) // validated
			bc.Kinds = append(bc.Kinds, kind)
		}
		if len(bc.Kinds) == 0 {
			bc.Kinds = []broker.Kind{broker.KindShared}
		}
		for _, u := range d.AllowUsers {
			uid, err := look.LookupUser(u)
			if err != nil {
				v.bad(loc+".allow_users", "%s: allow_users: user %q: %v", name, u, err)
				continue
			}
			bc.UIDs = appendNew(bc.UIDs, uid)
		}
		for _, g := range d.AllowGroups {
			gid, err := look.LookupGroup(g)
			if err != nil {
				v.bad(loc+".allow_groups", "%s: allow_groups: group %q: %v", name, g, err)
				continue
			}
			bc.GIDs = appendNew(bc.GIDs, gid)
		}
		r.Broker.Devices = append(r.Broker.Devices, bc)
		r.Devices = append(r.Devices, DeviceOpen{
			Address:     addr,
			AccessMode:  c.Daemon.AccessMode,
			SysfsRoot:   c.Daemon.SysfsRoot,
			DevRoot:     c.Daemon.DevRoot,
			ManagedBind: d.ManagedBind,
		})
	}
	if len(v.errs) > 0 {
		return nil, errors.Join(v.errs...)
	}
	if err := r.Broker.Validate(); err != nil {
		// Validate above should have caught everything the broker checks.
		return nil, fmt.Errorf("config: %w", err)
	}
	return r, nil
}

func (v *validator) gid(look Lookup, key string, g Group) int {
	if g == "" {
		return -1
	}
	if gid, ok := g.GID(); ok {
		return int(gid)
	}
	gid, err := look.LookupGroup(string(g))
	if err != nil {
		v.bad(key, "%s: group %q: %v", key, string(g), err)
		return -1
	}
	return int(gid)
}

func appendNew(ids []uint32, id uint32) []uint32 {
	if slices.Contains(ids, id) {
		return ids
	}
	return append(ids, id)
}

// Override sets the [daemon] key (e.g. "log_level") to value, for a command-line flag.
// Problems with the value are then reported as coming from the command line. The keys
// that can be overridden are the string-valued ones: control_socket, claim_socket,
// socket_group, admin_group, access_mode, sysfs_root, dev_root, log_level, log_format,
// journal and on_stop.
func (c *Config) Override(key, value string) error {
	d := &c.Daemon
	fields := map[string]*string{
		"control_socket": &d.ControlSocket,
		"claim_socket":   &d.ClaimSocket,
		"access_mode":    &d.AccessMode,
		"sysfs_root":     &d.SysfsRoot,
		"dev_root":       &d.DevRoot,
		"log_level":      &d.LogLevel,
		"log_format":     &d.LogFormat,
		"journal":        &d.Journal,
		"on_stop":        &d.OnStop,
	}
	switch key {
	case "socket_group":
		d.SocketGroup = Group(value)
	case "admin_group":
		d.AdminGroup = Group(value)
	default:
		p, ok := fields[key]
		if !ok {
			return fmt.Errorf("config: [daemon] %s cannot be overridden", key)
		}
		*p = value
	}
	if c.override == nil {
		c.override = map[string]bool{}
	}
	c.override["daemon."+key] = true
	return nil
}

// AddDevice appends a device with the default policy (every memory BAR, shared leases,
// administrators only) for the command line's -device flag. An address that is already
// configured is left as configured.
func (c *Config) AddDevice(address string) {
	if a, err := pci.ParseAddress(address); err == nil {
		for i := range c.Devices {
			if b, err := pci.ParseAddress(c.Devices[i].Address); err == nil && a == b {
				return
			}
		}
	}
	c.Devices = append(c.Devices, Device{Address: address})
}
