package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// maxReleased is the broker's bound on one device's ended-but-live leases (maxReleased in
// internal/broker): at it, the next allocation on the device cycles it first. A churning
// tenant therefore keeps at most this many ended leases per device, and they count
// against [limits] max_leases and max_leases_per_holder until the cycle.
const maxReleased = 1024

// DaemonConfig is the daemon configuration of one scenario: N fake devices and limits
// that do not throttle the scenario's load.
type DaemonConfig struct {
	// Dir holds the sockets, the journal and the configuration file.
	Dir string
	// Devices is the number of fake devices ([DeviceBDF] names them).
	Devices int
	// MaxLeases is [limits] max_leases and max_leases_per_holder (see [MaxLeasesFor]).
	MaxLeases int
	// TenantsBy is [tenants] by; "" keeps the default.
	TenantsBy string
	// LogLevel is [daemon] log_level; "" keeps the default (info, as deployed).
	LogLevel string
	// RevokeWithin is [limits] revoke_within (R): "1h" or "0s" (see [RunOptions]).
	RevokeWithin string
	// Bars are the BARs each device lets lease; nil means [0].
	Bars []int
	// AllowUIDs are the uids each device lets lease; nil means the running uid.
	AllowUIDs []int
	// SocketMode is control_socket_mode and claim_socket_mode; "" keeps the defaults
	// (0660: the running group only).
	SocketMode string
}

// Paths of the sockets and files in a scenario's directory.
const (
	controlSocket = "control.sock"
	claimSocket   = "fd.sock"
	metricsSocket = "metrics.sock"
	floorGRPC     = "floor-grpc.sock"
	floorClaim    = "floor-fd.sock"
	configFile    = "mmiobrokerd.toml"
	journalFile   = "journal.db"
)

// DeviceBDF is the PCI address of fake device i: 0000:01:00.0, 0000:02:00.0, …
func DeviceBDF(i int) string { return fmt.Sprintf("0000:%02x:00.0", i+1) }

// MaxLeasesFor is the lease limit that lets clients client processes, spread over devices
// devices round robin and each running opsPerClient lease round trips (warm-up included),
// churn without RESOURCE_EXHAUSTED: a released lease stays ended-but-live, and counts,
// until its device cycles, which happens when maxReleased of them accumulated on it. So
// each device holds at most min(its round trips, maxReleased) ended leases plus one live
// lease per client on it.
//
// With batching off (revoke_within 0s: every release cycles the device at once, batched
// is false) no ended lease waits, and each device holds its clients' live leases only.
func MaxLeasesFor(devices, clients, opsPerClient int, batched bool) int {
	devices = max(devices, 1)
	perDevice := (clients + devices - 1) / devices
	ended := min(perDevice*opsPerClient, maxReleased)
	if !batched {
		ended = 0
	}
	return min(max(devices*(ended+perDevice)+16, 64), 1<<20)
}

// TOML returns the configuration file.
func (c DaemonConfig) TOML() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# mmiobroker-bench: %s, limits that do not throttle the load.\n", plural(c.Devices, "fake device"))
	b.WriteString("[daemon]\n")
	fmt.Fprintf(&b, "control_socket = %q\n", filepath.Join(c.Dir, controlSocket))
	fmt.Fprintf(&b, "claim_socket = %q\n", filepath.Join(c.Dir, claimSocket))
	fmt.Fprintf(&b, "journal = %q\n", filepath.Join(c.Dir, journalFile))
	// Lets the clients revoke when not root (root always is an administrator).
	fmt.Fprintf(&b, "admin_group = %d\n", os.Getgid())
	if c.LogLevel != "" {
		fmt.Fprintf(&b, "log_level = %q\n", c.LogLevel)
	}
	if c.SocketMode != "" {
		fmt.Fprintf(&b, "control_socket_mode = %q\nclaim_socket_mode = %q\n", c.SocketMode, c.SocketMode)
	}
	b.WriteString("\n[limits]\n")
	fmt.Fprintf(&b, "max_leases = %d\n", c.MaxLeases)
	fmt.Fprintf(&b, "max_leases_per_holder = %d\n", c.MaxLeases)
	fmt.Fprintf(&b, "revoke_within = %q\n", c.RevokeWithin)
	b.WriteString("tenant_cycle_interval = \"0s\"\n")
	b.WriteString("tenant_cycle_budget = 0\n")
	if c.TenantsBy != "" {
		fmt.Fprintf(&b, "\n[tenants]\nby = %q\n", c.TenantsBy)
	}
	bars, uids := "0", strconv.Itoa(os.Getuid())
	if c.Bars != nil {
		bars = joinInts(c.Bars)
	}
	if c.AllowUIDs != nil {
		uids = joinInts(c.AllowUIDs)
	}
	for i := range c.Devices {
		fmt.Fprintf(&b, "\n[[device]]\naddress = %q\nbars = [%s]\nallow_uids = [%s]\n", DeviceBDF(i), bars, uids)
	}
	return b.String()
}

// joinInts returns ns as a TOML array's items: "1, 2, 3".
func joinInts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ", ")
}

// LimitNotes explains the limits [DaemonConfig.TOML] raises and why, for the results.
func LimitNotes() []string {
	return []string{
		"All client processes have the same uid and cgroup: they are one tenant, as many VMs under one qemu user are.",
		"`revoke_within` (R, default 30s) is 1h or 0s, never the default, so that the daemon's batching is what the run measures, not the clock: with 1h, a device's released leases stay ended-but-live until the cycle that its 1025th one forces inside the next allocation (before that allocation's export: no lease in flight), which is how the daemon batches under a churning tenant; with 0s every release cycles its device at once, inside ReleaseLease. The allocation and claim path is the same in both.",
		"`max_leases` and `max_leases_per_holder` (defaults 4096 and 64): with R 1h, ended-but-live leases count against both until their device cycles, up to 1024 per device, so both are raised to that worst case (devices × (1024 + clients per device) + 16); with R 0s only the live leases count (one per client process).",
		"`tenant_cycle_interval` = 0s and `tenant_cycle_budget` = 0 (defaults 10s and 60 per hour): the allocation that needs a cycle gets it at once instead of UNAVAILABLE until C has passed, and a tenant churning thousands of leases a second needs a cycle per 1024 releases per device (R 1h) or per release (R 0s, where C must be 0 anyway, at most R/2).",
		"The parallel scenario's client processes share a fake device 8 to a device, as VMs share a device's BAR: a device cycle re-exports the other live leases of the device as a new generation; one allocated and not yet claimed keeps its claim token (the allocating client's claim gets the new generation), one already claimed is held for a moment only (its client closes the fd and releases it).",
		"`admin_group` is the running group, so that the revoke scenario's RevokeLease works without root; the churning clients are administrators then too (root always is). That changes policy checks only: the device's allowed uids, min_ttl, tenant_cycle_interval and tenant_cycle_budget do not apply to administrators; their leases are counted, journaled, claimed and released as a tenant's.",
		"Not configurable: the claim socket's claim slots, 64, of which a tenant's share is 16 (fdpass.Options; internal/daemon sets neither): alone, one tenant may use all but a share's worth, 48; a claim beyond is refused with RESOURCE_EXHAUSTED, which fails the run; the column \"claims refused\" counts them (the control socket's limit, 128 connections per tenant, is not in the way).",
		"Not configurable either: the daemon's fd budget counts 3 fds for every lease up to `max_leases` and refuses to start unless that fits RLIMIT_NOFILE, but an ended-but-live lease holds no fd (its dma-buf copy, holder pidfd and waiter closed at its end). R 1h needs max_leases of about 1025 per device (32 client processes on 4 devices: about 4,150, a budget of about 15,000 fds); where RLIMIT_NOFILE is lower and cannot be raised (no CAP_SYS_RESOURCE) the daemon refuses it, and `-revoke-within auto` (the default) runs that scenario with R 0s instead, as the scenario table says.",
	}
}
