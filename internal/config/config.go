package config

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// DefaultPath is where mmiobrokerd looks for its configuration file.
const DefaultPath = "/etc/mmiobroker/mmiobrokerd.toml"

// Defaults of the [daemon] table.
const (
	DefaultControlSocket          = "/run/mmiobroker/control.sock"
	DefaultClaimSocket            = "/run/mmiobroker/fd.sock"
	DefaultSocketMode    FileMode = 0o660
	DefaultAccessMode             = "auto"
	DefaultSysfsRoot              = "/sys"
	DefaultDevRoot                = "/dev"
	DefaultLogLevel               = "info"
	DefaultLogFormat              = "text"
	DefaultJournal                = "/run/mmiobroker/journal.db"
	DefaultOnStop                 = "keep"
	// DefaultHolderCheck is how often the daemon scans /proc for its dma-bufs' holders.
	DefaultHolderCheck = time.Minute
	// DefaultTenantsBy groups callers by uid and VM cgroup unit.
	DefaultTenantsBy = "cgroup"
)

// Defaults of the [limits] table. They match the broker's own defaults.
const (
	DefaultMaxLeasesPerHolder = 64
	DefaultMaxLeases          = 4096
	DefaultMaxRangesPerLease  = 16
	DefaultClaimTimeout       = 30 * time.Second
	DefaultEventBacklog       = 1024
	// DefaultRevokeWithin is R: an ended lease's fd dies at the latest this long after
	// its end.
	DefaultRevokeWithin = 30 * time.Second
	// DefaultTenantCycleInterval is C: tenants make a device cycle at most once per C.
	DefaultTenantCycleInterval = 10 * time.Second
	// DefaultTenantCycleBudget is how many on-demand device cycles one tenant may cause
	// per hour.
	DefaultTenantCycleBudget = 60
	// DefaultMinTTL is the shortest ttl a tenant may ask for.
	DefaultMinTTL = 10 * time.Second
	// DefaultMaxConnections bounds the control socket's connections (peercred.MaxConns).
	DefaultMaxConnections = 1024
)

// Upper bounds of the [limits] table; the kernel allows at most 16 ranges per dma-buf
// export request in this broker's design, and the others bound the daemon's memory.
const (
	MaxRangesPerLease = 16
	MaxLeases         = 1 << 20
	MaxEventBacklog   = 1 << 20
	MaxConnections    = 1 << 16
	// MinConnections keeps room for one tenant's usual connections (a VMM, its
	// monitoring) below the total.
	MinConnections = 16
)

// Config is mmiobrokerd's configuration file, decoded. The zero value is not useful; start
// from [Default] or [Decode].
type Config struct {
	Daemon  Daemon   `toml:"daemon"`
	Limits  Limits   `toml:"limits"`
	Tenants Tenants  `toml:"tenants"`
	Metrics Metrics  `toml:"metrics"`
	Devices []Device `toml:"device"`

	file     string              // file name for messages, "" if none
	lines    map[string]location // by locator key ("daemon.claim_socket", "device.0.bars")
	override map[string]bool     // locator keys set by Override
}

// Daemon is the [daemon] table: where the daemon listens and how it reaches devices and logs.
type Daemon struct {
	// ControlSocket is the path of the gRPC control socket.
	ControlSocket string `toml:"control_socket"`
	// ControlSocketMode is the control socket's permission bits.
	ControlSocketMode FileMode `toml:"control_socket_mode"`
	// ClaimSocket is the path of the fd claim socket (docs/claim-protocol.md).
	ClaimSocket string `toml:"claim_socket"`
	// ClaimSocketMode is the claim socket's permission bits.
	ClaimSocketMode FileMode `toml:"claim_socket_mode"`
	// SocketGroup owns both sockets; "" keeps the daemon's group.
	SocketGroup Group `toml:"socket_group"`
	// AdminGroup's members are administrators (see every lease, revoke); "" means root only.
	AdminGroup Group `toml:"admin_group"`
	// AccessMode is how devices are opened: "auto", "group" (VFIO group + container) or
	// "cdev" (VFIO device cdev + iommufd).
	AccessMode string `toml:"access_mode"`
	// SysfsRoot is where sysfs is mounted.
	SysfsRoot string `toml:"sysfs_root"`
	// DevRoot is where device nodes live (vfio/, iommu).
	DevRoot string `toml:"dev_root"`
	// LogLevel is "debug", "info", "warn" or "error".
	LogLevel string `toml:"log_level"`
	// LogFormat is "text" or "json".
	LogFormat string `toml:"log_format"`
	// Journal is the lease journal (bbolt) that lets a restarted daemon take its leases
	// back; "" disables it (a restart then ends every lease). It belongs in the runtime
	// directory: leases do not survive a reboot.
	Journal string `toml:"journal"`
	// OnStop is what a stop does to leases: "keep" (under systemd with the fd store: the
	// next start takes them back, nothing is revoked) or "drain" (end every lease and
	// revoke its dma-buf first; always the case without the fd store).
	OnStop string `toml:"on_stop"`
	// HolderCheck is how often the daemon scans /proc for the processes that hold its
	// dma-bufs and compares them with the leases (metrics dmabuf_fds and leases_outlasting,
	// a warning in the log for a tenant outlasting its lease or an unaccounted dma-buf);
	// "0s" disables the periodic check (ScanHolders still scans on demand).
	HolderCheck Duration `toml:"holder_check"`
}

// Limits is the [limits] table.
type Limits struct {
	// MaxLeasesPerHolder bounds the live leases of one uid.
	MaxLeasesPerHolder int `toml:"max_leases_per_holder"`
	// MaxLeases bounds the live leases of the daemon.
	MaxLeases int `toml:"max_leases"`
	// MaxRangesPerLease bounds the ranges of one lease (1-16).
	MaxRangesPerLease int `toml:"max_ranges_per_lease"`
	// ClaimTimeout is how long a claim token stays valid; an unclaimed lease is then released.
	ClaimTimeout Duration `toml:"claim_timeout"`
	// EventBacklog is how many past events a watcher can resume from.
	EventBacklog int `toml:"event_backlog"`
	// RevokeWithin is R: a lease its tenant ended while its fd was out stays usable
	// ("ended but live") until its device's next cycle, at the latest this long after the
	// end ("0s": the device cycles at once on every such end).
	RevokeWithin Duration `toml:"revoke_within"`
	// TenantCycleInterval is C: device cycles caused by tenants happen at most once per
	// this interval per device (at most revoke_within).
	TenantCycleInterval Duration `toml:"tenant_cycle_interval"`
	// TenantCycleBudget bounds the on-demand device cycles one tenant may cause per hour
	// (0: no budget).
	TenantCycleBudget int `toml:"tenant_cycle_budget"`
	// MinTTL is the shortest ttl a tenant may ask for (admins are exempt).
	MinTTL Duration `toml:"min_ttl"`
	// MaxConnections bounds the control socket's open connections of all uids together
	// (root has a reserve beyond it); each costs the daemon two fds.
	MaxConnections int `toml:"max_connections"`
}

// Tenants is the [tenants] table: how callers are grouped into tenants (visibility,
// release and renew rights, and every per-tenant limit).
type Tenants struct {
	// By is "cgroup" (the uid and, when the caller runs in a VM's own cgroup unit, that
	// unit), "uid" (the uid alone) or "label" (the uid and the LSM label of its socket).
	By string `toml:"by"`
	// Units lists cgroup parents whose direct children are VM units (besides Kubernetes
	// pods, recognised by themselves).
	Units []string `toml:"units"`
}

// Defaults of the [metrics] table.
const (
	// DefaultMetricsSocket is relative: the metrics socket is beside control_socket
	// (/run/mmiobroker/metrics.sock by default).
	DefaultMetricsSocket = "metrics.sock"
)

// Metrics is the [metrics] table: where the daemon serves its Prometheus metrics
// (docs/operations.md, "Metrics").
type Metrics struct {
	// Socket is the unix stream socket serving HTTP GET /metrics: an absolute path, a
	// file name relative to control_socket's directory, or "" for none.
	Socket string `toml:"socket"`
	// SocketMode is the metrics socket's permission bits.
	SocketMode FileMode `toml:"socket_mode"`
	// SocketGroup owns the metrics socket; "" keeps the daemon's group.
	SocketGroup Group `toml:"socket_group"`
	// Listen is a loopback TCP address ("127.0.0.1:9464", "[::1]:9464") also serving
	// /metrics; "" for none. Other addresses are refused.
	Listen string `toml:"listen"`
}

// Device is one [[device]] table: a PCI device that may be leased, and who may lease it.
type Device struct {
	// Address is the PCI address, "0000:3b:00.0" (or the short form "3b:00.0").
	Address string `toml:"address"`
	// BARs lists the BAR indexes that may be leased; empty means every memory BAR.
	BARs []int `toml:"bars"`
	// Kinds lists the lease kinds allowed, "shared" and/or "private"; empty means shared.
	Kinds []string `toml:"kinds"`
	// AllowUIDs and AllowGIDs may lease the device, besides administrators.
	AllowUIDs []uint32 `toml:"allow_uids"`
	AllowGIDs []uint32 `toml:"allow_gids"`
	// AllowUsers and AllowGroups name more users and groups; resolved when loading.
	AllowUsers  []string `toml:"allow_users"`
	AllowGroups []string `toml:"allow_groups"`
	// AllowUnattestedPrivate grants private leases although the device is not TSM-bound.
	// For test rigs only; such leases are marked unattested.
	AllowUnattestedPrivate bool `toml:"allow_unattested_private"`
	// ManagedBind lets the daemon bind the device to vfio-pci itself (driver_override) and
	// restore the previous driver when it stops.
	ManagedBind bool `toml:"managed_bind"`
}

// Default returns the configuration of an empty file: every default, no devices.
func Default() *Config {
	return &Config{
		Daemon: Daemon{
			ControlSocket:     DefaultControlSocket,
			ControlSocketMode: DefaultSocketMode,
			ClaimSocket:       DefaultClaimSocket,
			ClaimSocketMode:   DefaultSocketMode,
			AccessMode:        DefaultAccessMode,
			SysfsRoot:         DefaultSysfsRoot,
			DevRoot:           DefaultDevRoot,
			LogLevel:          DefaultLogLevel,
			LogFormat:         DefaultLogFormat,
			Journal:           DefaultJournal,
			OnStop:            DefaultOnStop,
			HolderCheck:       Duration(DefaultHolderCheck),
		},
		Tenants: Tenants{By: DefaultTenantsBy, Units: tenant.DefaultUnits()},
		Metrics: Metrics{Socket: DefaultMetricsSocket, SocketMode: DefaultSocketMode},
		Limits: Limits{
			MaxLeasesPerHolder:  DefaultMaxLeasesPerHolder,
			MaxLeases:           DefaultMaxLeases,
			MaxRangesPerLease:   DefaultMaxRangesPerLease,
			ClaimTimeout:        Duration(DefaultClaimTimeout),
			EventBacklog:        DefaultEventBacklog,
			RevokeWithin:        Duration(DefaultRevokeWithin),
			TenantCycleInterval: Duration(DefaultTenantCycleInterval),
			TenantCycleBudget:   DefaultTenantCycleBudget,
			MinTTL:              Duration(DefaultMinTTL),
			MaxConnections:      DefaultMaxConnections,
		},
	}
}

// Load reads and decodes the configuration file at path (see [Decode]). It does not
// validate it. A missing file is an error that wraps fs.ErrNotExist.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Decode(path, data)
}

// LoadIfExists is like [Load] but returns [Default] if path does not exist.
func LoadIfExists(path string) (*Config, error) {
	c, err := Load(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Default(), nil
	}
	return c, err
}

// Decode decodes a configuration file's contents strictly over the defaults. name is the
// file name used in error messages ("" for none). Unknown keys and tables, values of the
// wrong type and syntax errors are errors carrying the line and column ([*Error]); when
// there are several unknown keys, all are reported, joined. Decode does not validate values:
// call [Config.Validate].
func Decode(name string, data []byte) (*Config, error) {
	c := Default()
	c.file = name
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return nil, decodeError(name, err)
	}
	c.lines = keyLines(data)
	return c, nil
}

// decodeError turns go-toml's errors into [*Error]s that carry the line and column.
func decodeError(file string, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		errs := make([]error, 0, len(strict.Errors))
		for i := range strict.Errors {
			e := &strict.Errors[i]
			line, col := e.Position()
			what := "unknown key"
			if strings.Contains(e.Error(), "table") {
				what = "unknown table"
			}
			key := strings.Join(e.Key(), ".")
			errs = append(errs, &Error{File: file, Line: line, Column: col,
				Msg: fmt.Sprintf("%s %q", what, key)})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, col := de.Position()
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		if k := de.Key(); len(k) > 0 {
			msg = strings.Join(k, ".") + ": " + msg
		}
		return &Error{File: file, Line: line, Column: col, Msg: msg}
	}
	// Errors from text unmarshalers given a non-string value come without a position.
	return &Error{File: file, Msg: strings.TrimPrefix(err.Error(), "toml: ")}
}

// Error is one problem of a configuration. Its text is "file:line:column: message", with
// the parts that are unknown left out ("line 3, column 1: message" without a file name).
// It matches errdefs.ErrInvalidArgument.
type Error struct {
	File   string // "" if the configuration did not come from a file
	Line   int    // 1-based; 0 if unknown
	Column int    // 1-based; 0 if unknown
	Msg    string
}

func (e *Error) Error() string {
	var pos string
	switch {
	case e.File != "" && e.Line > 0 && e.Column > 0:
		pos = fmt.Sprintf("%s:%d:%d", e.File, e.Line, e.Column)
	case e.File != "" && e.Line > 0:
		pos = fmt.Sprintf("%s:%d", e.File, e.Line)
	case e.File != "":
		pos = e.File
	case e.Line > 0 && e.Column > 0:
		pos = fmt.Sprintf("line %d, column %d", e.Line, e.Column)
	case e.Line > 0:
		pos = fmt.Sprintf("line %d", e.Line)
	default:
		return e.Msg
	}
	return pos + ": " + e.Msg
}

// Is reports that every configuration error is an invalid argument.
func (e *Error) Is(target error) bool { return target == errdefs.ErrInvalidArgument }

// FileMode is a socket's permission bits. In TOML it is an integer (write octal as 0o660)
// or a string of octal digits ("0660", "660" or "0o660").
type FileMode uint32

// UnmarshalText parses octal digits, with an optional "0o" or "0" prefix.
func (m *FileMode) UnmarshalText(b []byte) error {
	s := strings.TrimPrefix(strings.TrimPrefix(string(b), "0o"), "0O")
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || s == "" {
		return fmt.Errorf("file mode %q is not an octal number such as \"0660\"", b)
	}
	*m = FileMode(v)
	return nil
}

// MarshalText returns the mode as 4 octal digits, e.g. "0660".
func (m FileMode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// String returns the mode as octal digits with a leading 0, e.g. "0660".
func (m FileMode) String() string { return fmt.Sprintf("%04o", uint32(m)) }

// Perm returns m as an fs.FileMode.
func (m FileMode) Perm() fs.FileMode { return fs.FileMode(m) & fs.ModePerm }

// Group names a group: a name, or a numeric gid. In TOML it is a string or an integer.
type Group string

// UnmarshalText accepts the text of a TOML integer (strings are decoded directly).
func (g *Group) UnmarshalText(b []byte) error {
	n, err := strconv.ParseInt(string(b), 0, 64)
	if err != nil || n < 0 || n > 1<<32-2 {
		return fmt.Errorf("group id %s is out of range", b)
	}
	*g = Group(strconv.FormatInt(n, 10))
	return nil
}

// GID returns the numeric gid if g is a number.
func (g Group) GID() (uint32, bool) {
	n, err := strconv.ParseUint(string(g), 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, false
	}
	return uint32(n), true
}

// Duration is a time span written as a Go duration string: "30s", "1m30s", "500ms".
type Duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: want a number with a unit, such as \"30s\"", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText returns the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// String returns the duration as a Go duration string, e.g. "30s".
func (d Duration) String() string { return time.Duration(d).String() }
