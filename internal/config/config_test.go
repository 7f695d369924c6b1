package config

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// fakeLookup resolves the names it knows.
type fakeLookup struct {
	users, groups map[string]uint32
}

func (f fakeLookup) LookupUser(name string) (uint32, error) {
	if id, ok := f.users[name]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("unknown user %s", name)
}

func (f fakeLookup) LookupGroup(name string) (uint32, error) {
	if id, ok := f.groups[name]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("unknown group %s", name)
}

var testLookup = fakeLookup{
	users:  map[string]uint32{"qemu": 107, "alice": 1000},
	groups: map[string]uint32{"kvm": 36, "mmiobroker": 991, "mmiobroker-admin": 990},
}

func mustDecode(t *testing.T, text string) *Config {
	t.Helper()
	c, err := Decode("test.toml", []byte(text))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	return c
}

func TestEmptyFileIsDefault(t *testing.T) {
	c := mustDecode(t, "# nothing\n")
	if diff := cmp.Diff(Default().Daemon, c.Daemon); diff != "" {
		t.Errorf("daemon differs from Default (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(Default().Limits, c.Limits); diff != "" {
		t.Errorf("limits differ from Default (-want +got):\n%s", diff)
	}
	if len(c.Devices) != 0 {
		t.Errorf("devices = %v, want none", c.Devices)
	}
	r, err := c.Resolve(testLookup)
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	want := broker.Config{
		Limits: broker.Limits{
			MaxLeasesPerHolder: broker.DefaultMaxLeasesPerHolder,
			MaxLeases:          broker.DefaultMaxLeases,
			MaxRangesPerLease:  broker.DefaultMaxRangesPerLease,
		},
		ClaimTimeout: broker.DefaultClaimTimeout,
		EventBacklog: broker.DefaultEventBacklog,
		// The revocation bounds: zero in the broker means "at once", so the daemon's
		// defaults are set by the config layer.
		RevokeWithin:        DefaultRevokeWithin,
		TenantCycleInterval: DefaultTenantCycleInterval,
		TenantCycleBudget:   DefaultTenantCycleBudget,
		MinTTL:              DefaultMinTTL,
	}
	if diff := cmp.Diff(want, r.Broker); diff != "" {
		t.Errorf("broker config (-want +got):\n%s", diff)
	}
	if r.SocketGID != -1 || r.AdminGID != -1 {
		t.Errorf("SocketGID, AdminGID = %d, %d; want -1, -1", r.SocketGID, r.AdminGID)
	}
}

func TestDefaults(t *testing.T) {
	d := Default()
	checks := []struct {
		name      string
		got, want any
	}{
		{"control_socket", d.Daemon.ControlSocket, "/run/mmiobroker/control.sock"},
		{"control_socket_mode", d.Daemon.ControlSocketMode, FileMode(0o660)},
		{"claim_socket", d.Daemon.ClaimSocket, "/run/mmiobroker/fd.sock"},
		{"claim_socket_mode", d.Daemon.ClaimSocketMode, FileMode(0o660)},
		{"socket_group", d.Daemon.SocketGroup, Group("")},
		{"admin_group", d.Daemon.AdminGroup, Group("")},
		{"access_mode", d.Daemon.AccessMode, "auto"},
		{"sysfs_root", d.Daemon.SysfsRoot, "/sys"},
		{"dev_root", d.Daemon.DevRoot, "/dev"},
		{"log_level", d.Daemon.LogLevel, "info"},
		{"log_format", d.Daemon.LogFormat, "text"},
		{"max_leases_per_holder", d.Limits.MaxLeasesPerHolder, 64},
		{"max_leases", d.Limits.MaxLeases, 4096},
		{"max_ranges_per_lease", d.Limits.MaxRangesPerLease, 16},
		{"claim_timeout", d.Limits.ClaimTimeout, Duration(30 * time.Second)},
		{"event_backlog", d.Limits.EventBacklog, 1024},
		{"max_connections", d.Limits.MaxConnections, peercred.MaxConns},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("default %s = %v, want %v (update docs/config.md too)", c.name, c.got, c.want)
		}
	}
	if err := d.Validate(); err != nil {
		t.Errorf("Default().Validate() = %v", err)
	}
}

// The example in deploy/ documents every key: it must decode, validate and resolve.
func TestDeployExample(t *testing.T) {
	path := filepath.Join("..", "..", "deploy", "mmiobrokerd.toml")
	c, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	r, err := c.Resolve(testLookup)
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	if r.SocketGID != 991 || r.AdminGID != 990 {
		t.Errorf("SocketGID, AdminGID = %d, %d; want 991, 990", r.SocketGID, r.AdminGID)
	}
	want := []broker.DeviceConfig{{
		BDF:   "0000:3b:00.0",
		BARs:  []int{0, 2},
		Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate},
		UIDs:  []uint32{107},
		GIDs:  []uint32{36},
	}, {
		BDF:   "0000:3c:00.0",
		Kinds: []broker.Kind{broker.KindShared},
	}}
	if diff := cmp.Diff(want, r.Broker.Devices, cmp.Comparer(func(a, b []uint32) bool {
		return fmt.Sprint(a) == fmt.Sprint(b) // nil and empty alike
	}), cmp.Comparer(func(a, b []int) bool { return fmt.Sprint(a) == fmt.Sprint(b) })); diff != "" {
		t.Errorf("devices (-want +got):\n%s", diff)
	}
	// Every key of the schema appears in the example.
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range schemaKeys() {
		if !strings.Contains(string(text), "\n"+key+" = ") {
			t.Errorf("deploy/mmiobrokerd.toml does not show key %q", key)
		}
	}
}

// schemaKeys lists every key of the schema, from the struct tags.
func schemaKeys() []string {
	return []string{
		"control_socket", "control_socket_mode", "claim_socket", "claim_socket_mode",
		"socket_group", "admin_group", "access_mode", "sysfs_root", "dev_root", "log_level",
		"log_format", "journal", "on_stop", "max_leases_per_holder", "max_leases", "max_ranges_per_lease",
		"claim_timeout", "event_backlog", "revoke_within", "tenant_cycle_interval", "tenant_cycle_budget", "min_ttl", "max_connections", "address", "bars", "kinds", "allow_uids", "allow_gids",
		"allow_users", "allow_groups", "allow_unattested_private", "managed_bind", "by", "units",
		"socket", "socket_mode", "listen",
	}
}

// Every key of schemaKeys is documented in docs/config.md.
func TestDocsListEveryKey(t *testing.T) {
	text, err := os.ReadFile(filepath.Join("..", "..", "docs", "config.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range schemaKeys() {
		if !strings.Contains(string(text), "`"+key+"`") {
			t.Errorf("docs/config.md does not document key %q", key)
		}
	}
}

func TestDecodeValues(t *testing.T) {
	c := mustDecode(t, `
[daemon]
control_socket = "/tmp/c.sock"
control_socket_mode = 0o600
claim_socket = "/tmp/f.sock"
claim_socket_mode = "0o666"
socket_group = 36
admin_group = "wheel"
access_mode = "cdev"
log_level = "debug"
log_format = "json"

[limits]
claim_timeout = "1m30s"
max_ranges_per_lease = 4

[[device]]
address = "3b:00.0"
managed_bind = true
allow_unattested_private = true
kinds = ["private"]
`)
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	d := c.Daemon
	if d.ControlSocketMode != 0o600 || d.ClaimSocketMode != 0o666 {
		t.Errorf("modes = %v, %v; want 0600, 0666", d.ControlSocketMode, d.ClaimSocketMode)
	}
	if d.SocketGroup != "36" || d.AdminGroup != "wheel" {
		t.Errorf("groups = %q, %q", d.SocketGroup, d.AdminGroup)
	}
	if got := time.Duration(c.Limits.ClaimTimeout); got != 90*time.Second {
		t.Errorf("claim_timeout = %v", got)
	}
	r, err := c.Resolve(fakeLookup{groups: map[string]uint32{"wheel": 10}})
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	if r.SocketGID != 36 || r.AdminGID != 10 {
		t.Errorf("SocketGID, AdminGID = %d, %d; want 36, 10", r.SocketGID, r.AdminGID)
	}
	// The short address form is canonicalized.
	open, ok := r.DeviceOpen("0000:3b:00.0")
	want := DeviceOpen{Address: pci.MustParseAddress("0000:3b:00.0"), AccessMode: "cdev",
		SysfsRoot: "/sys", DevRoot: "/dev", ManagedBind: true}
	if !ok || open != want {
		t.Errorf("DeviceOpen = %+v, %v; want %+v", open, ok, want)
	}
	if got := r.Broker.Devices[0]; got.BDF != "0000:3b:00.0" || !got.AllowUnattestedPrivate ||
		!cmp.Equal(got.Kinds, []broker.Kind{broker.KindPrivate}) {
		t.Errorf("broker device = %+v", got)
	}
	if r.Broker.Limits.MaxRangesPerLease != 4 || r.Broker.ClaimTimeout != 90*time.Second {
		t.Errorf("broker limits = %+v, claim timeout %v", r.Broker.Limits, r.Broker.ClaimTimeout)
	}
}

// Errors found while decoding carry the file name, the line and the column.
func TestDecodeErrorsHaveLines(t *testing.T) {
	tests := []struct {
		name, text string
		want       []string // substrings of the error, in order
	}{
		{"unknown key", "[daemon]\n\ncontrol_sockt = \"/x\"\n",
			[]string{`test.toml:3:1: unknown key "daemon.control_sockt"`}},
		{"unknown table", "[daemon]\n[limit]\nmax_leases = 1\n",
			[]string{`test.toml:2:2: unknown table "limit"`}},
		{"unknown device key", "[[device]]\naddress = \"0000:00:03.0\"\n\n[[device]]\naddres = \"x\"\n",
			[]string{`test.toml:5:1: unknown key "device.addres"`}},
		{"several unknown keys", "foo = 1\n[daemon]\nbar = 2\n",
			[]string{`test.toml:1:1: unknown key "foo"`, `test.toml:3:1: unknown key "daemon.bar"`}},
		{"syntax", "[daemon\n", []string{"test.toml:1:"}},
		{"wrong type", "[limits]\nmax_leases = \"many\"\n", []string{"test.toml:2:14: limits.max_leases: "}},
		{"negative uid", "[[device]]\naddress = \"0000:00:03.0\"\nallow_uids = [-1]\n",
			[]string{"test.toml:3:15: device.allow_uids: "}},
		{"bad mode string", "[daemon]\ncontrol_socket_mode = \"rw\"\n",
			[]string{`test.toml:2:23: daemon.control_socket_mode: file mode "rw" is not an octal number`}},
		{"bad duration", "[limits]\nclaim_timeout = \"soon\"\n",
			[]string{`test.toml:2:17: limits.claim_timeout: duration "soon"`}},
		{"table as value", "daemon = 1\n", []string{"test.toml:1:"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode("test.toml", []byte(tt.text))
			if err == nil {
				t.Fatal("Decode succeeded")
			}
			checkError(t, err, tt.want)
		})
	}
}

func checkError(t *testing.T, err error, want []string) {
	t.Helper()
	msg := err.Error()
	rest := msg
	for _, w := range want {
		i := strings.Index(rest, w)
		if i < 0 {
			t.Errorf("error %q\ndoes not contain %q (after the previous match)", msg, w)
			return
		}
		rest = rest[i+len(w):]
	}
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("error %q is not errdefs.ErrInvalidArgument", msg)
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Errorf("error %q holds no *config.Error", msg)
	}
}

// Every validation error names the key (and device) at fault and its line.
func TestValidateErrors(t *testing.T) {
	const dev = "[[device]]\naddress = \"0000:00:03.0\"\n"
	tests := []struct {
		name, text string
		want       string
	}{
		{"control socket empty", "[daemon]\ncontrol_socket = \"\"\n", `test.toml:2: daemon.control_socket: is empty`},
		{"control socket relative", "[daemon]\ncontrol_socket = \"c.sock\"\n", `test.toml:2: daemon.control_socket: "c.sock" is not an absolute path`},
		{"claim socket dir", "[daemon]\nclaim_socket = \"/run/\"\n", `test.toml:2: daemon.claim_socket: "/run/" names a directory`},
		{"socket too long", "[daemon]\nclaim_socket = \"/" + strings.Repeat("x", 120) + "\"\n", `test.toml:2: daemon.claim_socket: "/xxx`},
		{"same sockets", "[daemon]\nclaim_socket = \"/run/mmiobroker/control.sock\"\n", `test.toml:2: daemon.claim_socket: "/run/mmiobroker/control.sock" is also the control socket`},
		{"decimal mode", "[daemon]\n\ncontrol_socket_mode = 660\n", `test.toml:3: daemon.control_socket_mode: mode 01224 (decimal 660) has bits outside 0777`},
		{"mode string too big", "[daemon]\nclaim_socket_mode = \"7777\"\n", `test.toml:2: daemon.claim_socket_mode: mode 07777`},
		{"group with colon", "[daemon]\nsocket_group = \"a:b\"\n", `test.toml:2: daemon.socket_group: "a:b" is neither a group name nor a gid`},
		{"gid too big", "[daemon]\nadmin_group = \"99999999999\"\n", `test.toml:2: daemon.admin_group: "99999999999" is neither`},
		{"access mode", "[daemon]\naccess_mode = \"vfio\"\n", `test.toml:2: daemon.access_mode: "vfio" is not one of auto, group, cdev`},
		{"sysfs relative", "[daemon]\nsysfs_root = \"sys\"\n", `test.toml:2: daemon.sysfs_root: "sys" is not an absolute path`},
		{"dev relative", "[daemon]\ndev_root = \"\"\n", `test.toml:2: daemon.dev_root: "" is not an absolute path`},
		{"log level", "[daemon]\nlog_level = \"trace\"\n", `test.toml:2: daemon.log_level: "trace" is not one of debug, info, warn, error`},
		{"log format", "[daemon]\nlog_format = \"xml\"\n", `test.toml:2: daemon.log_format: "xml" is not one of text, json`},
		{"max leases per holder", "[limits]\nmax_leases_per_holder = 0\n", `test.toml:2: limits.max_leases_per_holder: 0 is outside 1-1048576`},
		{"max leases", "[limits]\nmax_leases = -5\n", `test.toml:2: limits.max_leases: -5 is outside 1-1048576`},
		{"max ranges", "[limits]\nmax_ranges_per_lease = 17\n", `test.toml:2: limits.max_ranges_per_lease: 17 is outside 1-16`},
		{"event backlog", "[limits]\nevent_backlog = 0\n", `test.toml:2: limits.event_backlog: 0 is outside 1-1048576`},
		{"claim timeout integer", "[limits]\nclaim_timeout = 30\n", `test.toml:2: limits.claim_timeout: write a duration string with a unit`},
		{"claim timeout short", "[limits]\nclaim_timeout = \"10ms\"\n", `test.toml:2: limits.claim_timeout: 10ms is shorter than the minimum 100ms`},
		{"revoke within integer", "[limits]\nrevoke_within = 2\n", `test.toml:2: limits.revoke_within: write a duration string with a unit`},
		{"revoke within long", "[limits]\nrevoke_within = \"2h\"\n", `test.toml:2: limits.revoke_within: 2h0m0s is outside 0s-1h0m0s`},
		{"min ttl negative", "[limits]\nmin_ttl = \"-1ms\"\n", `test.toml:2: limits.min_ttl: -1ms is outside 0s-1h0m0s`},
		{"max connections low", "[limits]\nmax_connections = 8\n", `test.toml:2: limits.max_connections: 8 is outside 16-65536`},
		{"max connections high", "[limits]\nmax_connections = 100000\n", `test.toml:2: limits.max_connections: 100000 is outside 16-65536`},
		{"C above R/2", "[limits]\nrevoke_within = \"5s\"\ntenant_cycle_interval = \"3s\"\n", `test.toml:3: limits.tenant_cycle_interval: 3s is longer than half of limits.revoke_within (5s)`},
		{"tenants by", "[tenants]\nby = \"gid\"\n", `test.toml:2: tenants.by`},
		{"tenants units relative", "[tenants]\nunits = [\"machine.slice\"]\n", `test.toml:2: tenants.units: tenant unit parent "machine.slice": want an absolute, clean cgroup path`},
		{"budget negative", "[limits]\ntenant_cycle_budget = -1\n", `test.toml:2: limits.tenant_cycle_budget: -1 is outside 0-1048576`},
		{"claim timeout negative", "[limits]\nclaim_timeout = \"-1s\"\n", `test.toml:2: limits.claim_timeout: -1s is shorter`},
		{"address missing", "[[device]]\nbars = [0]\n", `test.toml:1: device #1: address is missing`},
		{"address bad", dev + "[[device]]\naddress = \"0000:00:03\"\n", `test.toml:4: device #2: address: `},
		{"address twice", dev + "[[device]]\naddress = \"00:03.0\"\n", `test.toml:4: device 0000:00:03.0: configured twice (first as device 0000:00:03.0)`},
		{"bar out of range", dev + "bars = [0, 6]\n", `test.toml:3: device 0000:00:03.0: bars: 6 is not a BAR index (0-5)`},
		{"bar negative", dev + "bars = [-1]\n", `test.toml:3: device 0000:00:03.0: bars: -1 is not a BAR index`},
		{"bar twice", dev + "bars = [2, 2]\n", `test.toml:3: device 0000:00:03.0: bars: 2 is listed twice`},
		{"kind unknown", dev + "kinds = [\"secret\"]\n", `test.toml:3: device 0000:00:03.0: kinds: "secret" is not a lease kind (shared or private)`},
		{"kind twice", dev + "kinds = [\"shared\", \"shared\"]\n", `test.toml:3: device 0000:00:03.0: kinds: "shared" is listed twice`},
		{"unattested without private", dev + "allow_unattested_private = true\n", `test.toml:3: device 0000:00:03.0: allow_unattested_private is set but kinds does not include "private"`},
		{"numeric user", dev + "allow_users = [\"1000\"]\n", `test.toml:3: device 0000:00:03.0: allow_users: "1000" is not a user name (put numeric ids in allow_uids)`},
		{"empty group", dev + "allow_groups = [\"\"]\n", `test.toml:3: device 0000:00:03.0: allow_groups: "" is not a group name`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustDecode(t, tt.text)
			err := c.Validate()
			if err == nil {
				t.Fatal("Validate succeeded")
			}
			checkError(t, err, []string{tt.want})
			if _, rerr := c.Resolve(testLookup); rerr == nil || rerr.Error() != err.Error() {
				t.Errorf("Resolve error = %v, want the Validate error", rerr)
			}
		})
	}
}

// Validate reports every problem, not just the first.
func TestValidateReportsAll(t *testing.T) {
	c := mustDecode(t, "[daemon]\nlog_level = \"x\"\nlog_format = \"y\"\n[[device]]\nbars = [9]\n")
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate succeeded")
	}
	lines := strings.Split(err.Error(), "\n")
	want := []string{
		`test.toml:2: daemon.log_level: "x" is not one of debug, info, warn, error`,
		`test.toml:3: daemon.log_format: "y" is not one of text, json`,
		`test.toml:4: device #1: address is missing`,
		`test.toml:5: device #1: bars: 9 is not a BAR index (0-5)`,
	}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Errorf("errors (-want +got):\n%s", diff)
	}
}

// A configuration built in code (no file) reports problems without a position.
func TestValidateWithoutFile(t *testing.T) {
	c := Default()
	c.AddDevice("bogus")
	err := c.Validate()
	if err == nil || !strings.HasPrefix(err.Error(), "device #1: address: ") {
		t.Errorf("Validate = %v, want an error starting with the device", err)
	}
}

func TestResolveErrors(t *testing.T) {
	c := mustDecode(t, `[daemon]
socket_group = "nogroup"
admin_group = "kvm"

[[device]]
address = "0000:00:03.0"
allow_users = ["qemu", "bob"]
allow_groups = ["kvm", "staff"]
`)
	_, err := c.Resolve(testLookup)
	if err == nil {
		t.Fatal("Resolve succeeded")
	}
	lines := strings.Split(err.Error(), "\n")
	want := []string{
		`test.toml:2: daemon.socket_group: group "nogroup": unknown group nogroup`,
		`test.toml:7: device 0000:00:03.0: allow_users: user "bob": unknown user bob`,
		`test.toml:8: device 0000:00:03.0: allow_groups: group "staff": unknown group staff`,
	}
	if diff := cmp.Diff(want, lines); diff != "" {
		t.Errorf("errors (-want +got):\n%s", diff)
	}
}

func TestResolveMergesIDs(t *testing.T) {
	c := mustDecode(t, `[[device]]
address = "0000:00:03.0"
allow_uids = [107, 5]
allow_users = ["qemu", "alice"]
allow_gids = [36]
allow_groups = ["kvm"]
`)
	r, err := c.Resolve(testLookup)
	if err != nil {
		t.Fatal(err)
	}
	d := r.Broker.Devices[0]
	if !cmp.Equal(d.UIDs, []uint32{107, 5, 1000}) || !cmp.Equal(d.GIDs, []uint32{36}) {
		t.Errorf("UIDs, GIDs = %v, %v; want [107 5 1000], [36]", d.UIDs, d.GIDs)
	}
}

func TestOSLookup(t *testing.T) {
	uid, err := OSLookup().LookupUser("root")
	if err != nil {
		t.Skipf("no root user in the user database: %v", err)
	}
	if uid != 0 {
		t.Errorf("root uid = %d", uid)
	}
	if _, err := OSLookup().LookupUser("no-such-user-mmiobroker"); err == nil || err.Error() != "no such user" {
		t.Errorf("LookupUser of a missing user: %v, want no such user", err)
	}
	if _, err := OSLookup().LookupGroup("no-such-group-mmiobroker"); err == nil || err.Error() != "no such group" {
		t.Errorf("LookupGroup of a missing group: %v, want no such group", err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.toml")
	if _, err := Load(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want fs.ErrNotExist", err)
	}
	c, err := LoadIfExists(missing)
	if err != nil || !cmp.Equal(c.Daemon, Default().Daemon) {
		t.Errorf("LoadIfExists(missing) = %+v, %v; want the defaults", c, err)
	}
	path := filepath.Join(dir, "x.toml")
	if err := os.WriteFile(path, []byte("[daemon]\nlog_level = \"loud\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = LoadIfExists(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err == nil || !strings.HasPrefix(err.Error(), path+":2: ") {
		t.Errorf("Validate = %v, want an error at %s:2", err, path)
	}
}

func TestAddDevice(t *testing.T) {
	c := mustDecode(t, "[[device]]\naddress = \"0000:00:03.0\"\nbars = [1]\n")
	c.AddDevice("00:03.0") // already configured: the file's policy stays
	c.AddDevice("0000:00:04.0")
	if len(c.Devices) != 2 || !cmp.Equal(c.Devices[0].BARs, []int{1}) || c.Devices[1].Address != "0000:00:04.0" {
		t.Errorf("devices = %+v", c.Devices)
	}
	r, err := c.Resolve(testLookup)
	if err != nil {
		t.Fatal(err)
	}
	if d := r.Broker.Devices[1]; len(d.UIDs)+len(d.GIDs) != 0 || !cmp.Equal(d.Kinds, []broker.Kind{broker.KindShared}) {
		t.Errorf("flag device policy = %+v, want admins only, shared", d)
	}
}

func TestFileMode(t *testing.T) {
	for in, want := range map[string]FileMode{"0660": 0o660, "660": 0o660, "0o600": 0o600, "0": 0, "7777": 0o7777} {
		var m FileMode
		if err := m.UnmarshalText([]byte(in)); err != nil || m != want {
			t.Errorf("UnmarshalText(%q) = %v, %v; want %v", in, m, err, want)
		}
	}
	for _, in := range []string{"", "0o", "8", "rw-", "-1", "0x1f"} {
		var m FileMode
		if err := m.UnmarshalText([]byte(in)); err == nil {
			t.Errorf("UnmarshalText(%q) = %v, want an error", in, m)
		}
	}
	if s := FileMode(0o640).String(); s != "0640" {
		t.Errorf("String = %q", s)
	}
	if p := FileMode(0o640).Perm(); p != 0o640 {
		t.Errorf("Perm = %v", p)
	}
}

func TestGroupIntegers(t *testing.T) {
	c := mustDecode(t, "[daemon]\nsocket_group = 0x24\nadmin_group = 0\n")
	if c.Daemon.SocketGroup != "36" || c.Daemon.AdminGroup != "0" {
		t.Errorf("groups = %q, %q; want 36, 0", c.Daemon.SocketGroup, c.Daemon.AdminGroup)
	}
	if gid, ok := c.Daemon.AdminGroup.GID(); !ok || gid != 0 {
		t.Errorf("GID = %d, %v", gid, ok)
	}
	if _, ok := Group("kvm").GID(); ok {
		t.Error("Group(kvm).GID() reported a number")
	}
	if _, err := Decode("t", []byte("[daemon]\nsocket_group = -1\n")); err == nil {
		t.Error("negative gid accepted")
	}
}

func TestLogger(t *testing.T) {
	var buf bytes.Buffer
	d := Default().Daemon
	d.LogFormat, d.LogLevel = "json", "warn"
	log := d.Logger(&buf)
	log.Info("hidden")
	log.Warn("shown", slog.String("bdf", "0000:00:03.0"))
	if got := buf.String(); strings.Contains(got, "hidden") || !strings.Contains(got, `"msg":"shown","bdf":"0000:00:03.0"`) {
		t.Errorf("json log = %q", got)
	}
	buf.Reset()
	d.LogFormat, d.LogLevel = "text", "debug"
	d.Logger(&buf).Debug("dbg", "lease_id", "x")
	if got := buf.String(); !strings.Contains(got, "level=DEBUG msg=dbg lease_id=x") {
		t.Errorf("text log = %q", got)
	}
}

func TestErrorFormat(t *testing.T) {
	tests := []struct {
		e    Error
		want string
	}{
		{Error{File: "f", Line: 3, Column: 4, Msg: "m"}, "f:3:4: m"},
		{Error{File: "f", Line: 3, Msg: "m"}, "f:3: m"},
		{Error{File: "f", Msg: "m"}, "f: m"},
		{Error{Line: 3, Column: 1, Msg: "m"}, "line 3, column 1: m"},
		{Error{Line: 3, Msg: "m"}, "line 3: m"},
		{Error{Msg: "m"}, "m"},
	}
	for _, tt := range tests {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("%+v.Error() = %q, want %q", tt.e, got, tt.want)
		}
	}
}

func TestOverride(t *testing.T) {
	c := mustDecode(t, "[daemon]\nlog_level = \"debug\"\n")
	for key, val := range map[string]string{
		"control_socket": "/x/c.sock", "claim_socket": "/x/f.sock", "access_mode": "group",
		"sysfs_root": "/fake/sys", "dev_root": "/fake/dev", "log_level": "warn", "log_format": "json",
		"socket_group": "kvm", "admin_group": "0", "journal": "/x/j.db", "on_stop": "drain",
	} {
		if err := c.Override(key, val); err != nil {
			t.Errorf("Override(%s): %v", key, err)
		}
	}
	want := Daemon{ControlSocket: "/x/c.sock", ControlSocketMode: 0o660, ClaimSocket: "/x/f.sock",
		ClaimSocketMode: 0o660, SocketGroup: "kvm", AdminGroup: "0", AccessMode: "group",
		SysfsRoot: "/fake/sys", DevRoot: "/fake/dev", LogLevel: "warn", LogFormat: "json",
		Journal: "/x/j.db", OnStop: "drain", HolderCheck: Duration(DefaultHolderCheck)}
	if diff := cmp.Diff(want, c.Daemon); diff != "" {
		t.Errorf("daemon (-want +got):\n%s", diff)
	}
	if err := c.Override("claim_timeout", "1s"); err == nil {
		t.Error("Override of a non-daemon key succeeded")
	}
	// A bad overridden value is blamed on the command line, not on the file.
	if err := c.Override("log_level", "loud"); err != nil {
		t.Fatal(err)
	}
	err := c.Validate()
	if err == nil || err.Error() != `daemon.log_level: "loud" is not one of debug, info, warn, error (set on the command line)` {
		t.Errorf("Validate = %v", err)
	}
}
