package config

import (
	"errors"
	"fmt"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// Value sets accepted by the [daemon] table.
var (
	AccessModes = []string{"auto", "group", "cdev"}
	LogLevels   = []string{"debug", "info", "warn", "error"}
	LogFormats  = []string{"text", "json"}
	OnStops     = []string{"keep", "drain"}
)

// MinClaimTimeout is the shortest claim_timeout accepted.
const MinClaimTimeout = 100 * time.Millisecond

// maxSocketPath is the longest unix socket path (sun_path holds 108 bytes with the NUL).
const maxSocketPath = 107

// Validate checks every value and reports all problems at once, joined, each an [*Error]
// naming the key (and device) at fault and, when the configuration came from a file, its
// line. It does not resolve user or group names; [Config.Resolve] does.
func (c *Config) Validate() error {
	v := validator{c: c}
	v.daemon()
	v.limits()
	v.tenants()
	v.metrics()
	v.devices()
	return errors.Join(v.errs...)
}

type validator struct {
	c    *Config
	errs []error
}

// bad records a problem with the value at locator key loc ("daemon.control_socket").
func (v *validator) bad(loc, format string, args ...any) {
	e := &Error{File: v.c.file, Msg: fmt.Sprintf(format, args...)}
	if v.c.override[loc] {
		e.File, e.Msg = "", e.Msg+" (set on the command line)"
		v.errs = append(v.errs, e)
		return
	}
	// Fall back to the enclosing table's line if the key itself was not written.
	for k := loc; k != ""; {
		if l, ok := v.c.lines[k]; ok {
			e.Line = l.line
			break
		}
		i := strings.LastIndexByte(k, '.')
		if i < 0 {
			break
		}
		k = k[:i]
	}
	v.errs = append(v.errs, e)
}

func (v *validator) daemon() {
	d := &v.c.Daemon
	v.socket("daemon.control_socket", d.ControlSocket)
	v.socket("daemon.claim_socket", d.ClaimSocket)
	if d.ControlSocket != "" && filepath.Clean(d.ControlSocket) == filepath.Clean(d.ClaimSocket) {
		v.bad("daemon.claim_socket", "daemon.claim_socket: %q is also the control socket", d.ClaimSocket)
	}
	v.mode("daemon.control_socket_mode", d.ControlSocketMode)
	v.mode("daemon.claim_socket_mode", d.ClaimSocketMode)
	v.group("daemon.socket_group", d.SocketGroup)
	v.group("daemon.admin_group", d.AdminGroup)
	v.oneOf("daemon.access_mode", d.AccessMode, AccessModes)
	v.absDir("daemon.sysfs_root", d.SysfsRoot)
	v.absDir("daemon.dev_root", d.DevRoot)
	v.oneOf("daemon.log_level", d.LogLevel, LogLevels)
	v.oneOf("daemon.log_format", d.LogFormat, LogFormats)
	v.oneOf("daemon.on_stop", d.OnStop, OnStops)
	if d.HolderCheck != 0 {
		v.duration("daemon.holder_check", d.HolderCheck, time.Second, 24*time.Hour)
	}
	if d.Journal != "" && !filepath.IsAbs(d.Journal) {
		v.bad("daemon.journal", "daemon.journal: %q is not an absolute path", d.Journal)
	}
}

func (v *validator) socket(key, path string) {
	switch {
	case path == "":
		v.bad(key, "%s: is empty", key)
	case !filepath.IsAbs(path):
		v.bad(key, "%s: %q is not an absolute path", key, path)
	case strings.HasSuffix(path, "/"):
		v.bad(key, "%s: %q names a directory, not a socket", key, path)
	case len(path) > maxSocketPath:
		v.bad(key, "%s: %q is %d bytes long; unix socket paths are limited to %d", key, path, len(path), maxSocketPath)
	}
}

func (v *validator) mode(key string, m FileMode) {
	if m&^0o777 != 0 {
		v.bad(key, "%s: mode %#o (decimal %d) has bits outside 0777; write 0o660 or \"0660\"", key, uint32(m), uint32(m))
	}
}

func (v *validator) group(key string, g Group) {
	if g == "" {
		return
	}
	if _, ok := g.GID(); ok {
		return
	}
	if strings.ContainsAny(string(g), ": \t\n") || isDigits(string(g)) {
		v.bad(key, "%s: %q is neither a group name nor a gid", key, string(g))
	}
}

func isDigits(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
}

func (v *validator) oneOf(key, val string, allowed []string) {
	if !slices.Contains(allowed, val) {
		v.bad(key, "%s: %q is not one of %s", key, val, strings.Join(allowed, ", "))
	}
}

func (v *validator) absDir(key, path string) {
	if !filepath.IsAbs(path) {
		v.bad(key, "%s: %q is not an absolute path", key, path)
	}
}

func (v *validator) limits() {
	l := &v.c.Limits
	v.atLeast1("limits.max_leases_per_holder", l.MaxLeasesPerHolder, MaxLeases)
	v.atLeast1("limits.max_leases", l.MaxLeases, MaxLeases)
	v.atLeast1("limits.max_ranges_per_lease", l.MaxRangesPerLease, MaxRangesPerLease)
	v.atLeast1("limits.event_backlog", l.EventBacklog, MaxEventBacklog)
	if l.MaxConnections < MinConnections || l.MaxConnections > MaxConnections {
		v.bad("limits.max_connections", "limits.max_connections: %d is outside %d-%d", l.MaxConnections, MinConnections, MaxConnections)
	}
	const key = "limits.claim_timeout"
	switch loc, ok := v.c.lines[key]; {
	case ok && loc.kind != unstable.String:
		v.bad(key, "%s: write a duration string with a unit, such as \"30s\"", key)
	case time.Duration(l.ClaimTimeout) < MinClaimTimeout:
		v.bad(key, "%s: %v is shorter than the minimum %v", key, l.ClaimTimeout, MinClaimTimeout)
	}
	v.duration("limits.revoke_within", l.RevokeWithin, 0, MaxRevokeWithin)
	v.duration("limits.tenant_cycle_interval", l.TenantCycleInterval, 0, MaxRevokeWithin)
	v.duration("limits.min_ttl", l.MinTTL, 0, MaxRevokeWithin)
	if l.TenantCycleInterval > l.RevokeWithin/2 {
		v.bad("limits.tenant_cycle_interval", "limits.tenant_cycle_interval: %v is longer than half of limits.revoke_within (%v): ended leases could not be revoked within R if tenants may cycle a device only once per C (a scheduled cycle starts R/2 after the end)",
			l.TenantCycleInterval, l.RevokeWithin)
	}
	if l.TenantCycleBudget < 0 || l.TenantCycleBudget > MaxLeases {
		v.bad("limits.tenant_cycle_budget", "limits.tenant_cycle_budget: %d is outside 0-%d", l.TenantCycleBudget, MaxLeases)
	}
}

func (v *validator) tenants() {
	t := v.c.Tenants
	v.oneOf("tenants.by", t.By, []string{"cgroup", "uid", "label"})
	if err := (tenant.Resolver{Units: t.Units}).Validate(); err != nil {
		v.bad("tenants.units", "tenants.units: %v", err)
	}
}

func (v *validator) metrics() {
	m := v.c.Metrics
	switch p := v.c.MetricsSocket(); {
	case m.Socket == "":
	case !filepath.IsAbs(m.Socket) && !filepath.IsAbs(v.c.Daemon.ControlSocket):
		v.bad("metrics.socket", "metrics.socket: %q is relative to the directory of daemon.control_socket, which is not an absolute path", m.Socket)
	case p == filepath.Clean(v.c.Daemon.ControlSocket) || p == filepath.Clean(v.c.Daemon.ClaimSocket):
		v.bad("metrics.socket", "metrics.socket: %q is also the control or claim socket", p)
	default:
		v.socket("metrics.socket", p)
	}
	v.mode("metrics.socket_mode", m.SocketMode)
	v.group("metrics.socket_group", m.SocketGroup)
	if m.Listen != "" {
		if err := checkLoopback(m.Listen); err != nil {
			v.bad("metrics.listen", "metrics.listen: %v", err)
		}
	}
}

// checkLoopback accepts a TCP address "IP:port" whose IP is a loopback address and whose
// port is a number (0 picks a free port: tests).
func checkLoopback(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port, such as \"127.0.0.1:9464\"", addr)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q is not a number 0-65535", addr, port)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return fmt.Errorf("%q: %q is not an IP address; write a loopback address such as \"127.0.0.1:9464\" or \"[::1]:9464\"", addr, host)
	}
	if !ip.Unmap().IsLoopback() {
		return fmt.Errorf("%q is not a loopback address: metrics are served only to this host (127.0.0.0/8 or ::1); scrape remotely through a proxy or the unix socket", addr)
	}
	return nil
}

// MetricsSocket returns the path of the metrics socket: Metrics.Socket, made absolute
// against the control socket's directory; "" if there is none.
func (c *Config) MetricsSocket() string {
	s := c.Metrics.Socket
	if s == "" || filepath.IsAbs(s) {
		return s
	}
	return filepath.Join(filepath.Dir(c.Daemon.ControlSocket), s)
}

// MaxRevokeWithin is the longest revoke_within, tenant_cycle_interval and min_ttl
// accepted.
const MaxRevokeWithin = time.Hour

// duration checks the duration key: written as a string with a unit, within min-max.
func (v *validator) duration(key string, d Duration, min, max time.Duration) {
	switch loc, ok := v.c.lines[key]; {
	case ok && loc.kind != unstable.String:
		v.bad(key, "%s: write a duration string with a unit, such as \"10s\"", key)
	case time.Duration(d) < min || time.Duration(d) > max:
		v.bad(key, "%s: %v is outside %v-%v", key, d, min, max)
	}
}

func (v *validator) atLeast1(key string, n, limit int) {
	if n < 1 || n > limit {
		v.bad(key, "%s: %d is outside 1-%d", key, n, limit)
	}
}

func (v *validator) devices() {
	seen := map[string]int{} // canonical address -> index
	for i := range v.c.Devices {
		d := &v.c.Devices[i]
		loc := "device." + strconv.Itoa(i)
		name := v.c.deviceName(i)
		if d.Address == "" {
			v.bad(loc, "%s: address is missing", name)
		} else if a, err := pci.ParseAddress(d.Address); err != nil {
			v.bad(loc+".address", "%s: address: %v", name, err)
		} else if j, dup := seen[a.String()]; dup {
			v.bad(loc+".address", "%s: configured twice (first as %s)", name, v.c.deviceName(j))
		} else {
			seen[a.String()] = i
		}
		for j, b := range d.BARs {
			if b < 0 || b > 5 {
				v.bad(loc+".bars", "%s: bars: %d is not a BAR index (0-5)", name, b)
			} else if slices.Contains(d.BARs[:j], b) {
				v.bad(loc+".bars", "%s: bars: %d is listed twice", name, b)
			}
		}
		private := false
		for j, k := range d.Kinds {
			kind, err := broker.ParseKind(k)
			switch {
			case err != nil:
				v.bad(loc+".kinds", "%s: kinds: %q is not a lease kind (shared or private)", name, k)
			case slices.Contains(d.Kinds[:j], k):
				v.bad(loc+".kinds", "%s: kinds: %q is listed twice", name, k)
			case kind == broker.KindPrivate:
				private = true
			}
		}
		if d.AllowUnattestedPrivate && !private {
			v.bad(loc+".allow_unattested_private", "%s: allow_unattested_private is set but kinds does not include \"private\"", name)
		}
		for _, u := range d.AllowUsers {
			if u == "" || isDigits(u) {
				v.bad(loc+".allow_users", "%s: allow_users: %q is not a user name (put numeric ids in allow_uids)", name, u)
			}
		}
		for _, g := range d.AllowGroups {
			if g == "" || isDigits(g) {
				v.bad(loc+".allow_groups", "%s: allow_groups: %q is not a group name (put numeric ids in allow_gids)", name, g)
			}
		}
	}
}

// deviceName names device i in messages: its address, and its position when the address
// is missing or invalid.
func (c *Config) deviceName(i int) string {
	d := c.Devices[i]
	if a, err := pci.ParseAddress(d.Address); err == nil {
		return "device " + a.String()
	}
	return fmt.Sprintf("device #%d", i+1)
}
