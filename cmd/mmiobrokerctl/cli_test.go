package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

func testCLI() (*cli, *bytes.Buffer) {
	var errb bytes.Buffer
	return &cli{stdout: io.Discard, stderr: &errb, getenv: noEnv, timeout: time.Second}, &errb
}

func TestParseAllocate(t *testing.T) {
	shared, private := brokerv1.LeaseKind_LEASE_KIND_SHARED, brokerv1.LeaseKind_LEASE_KIND_PRIVATE
	tests := []struct {
		args []string
		want allocateArgs
	}{
		{[]string{"0000:3b:00.0", "2"},
			allocateArgs{opt: client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 2, Kind: shared}}},
		{[]string{"-hold", "3b:00.0", "0"},
			allocateArgs{opt: client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 0, Kind: shared}}},
		{[]string{"-ttl", "90m", "3b:00.0", "0"},
			allocateArgs{opt: client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 0, Kind: shared, TTL: 90 * time.Minute}}},
		// Flags before, between and after the arguments.
		{[]string{"-range", "0:64K", "0000:3b:00.0", "-kind", "private", "4", "-range", "0x100000:4096", "-vm", "vm1"},
			allocateArgs{opt: client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 4, Kind: private, VMName: "vm1",
				Ranges: []*brokerv1.Range{{Offset: 0, Length: 64 << 10}, {Offset: 1 << 20, Length: 4096}}}}},
		// Everything after -- is the command, flags included.
		{[]string{"--exec", "0000:3b:00.0", "1", "--", "qemu-system-x86_64", "-m", "1G", "--"},
			allocateArgs{opt: client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 1, Kind: shared},
				exec: true, command: []string{"qemu-system-x86_64", "-m", "1G", "--"}}},
	}
	for _, tt := range tests {
		c, errb := testCLI()
		got, err := parseAllocate(c, tt.args)
		if err != nil {
			t.Errorf("parseAllocate(%q): %v (%s)", tt.args, err, errb)
			continue
		}
		if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(allocateArgs{}), cmp.Comparer(func(a, b *brokerv1.Range) bool {
			return a.GetOffset() == b.GetOffset() && a.GetLength() == b.GetLength()
		})); diff != "" {
			t.Errorf("parseAllocate(%q) (-want +got):\n%s", tt.args, diff)
		}
	}
}

func TestParseAllocateErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"0000:3b:00.0"}, "allocate: want 2 argument(s), got 1"},
		{[]string{"0000:3b:00.0", "1", "2"}, "allocate: want 2 argument(s), got 3"},
		{[]string{"0000:3b:00", "1"}, `device address "0000:3b:00"`},
		{[]string{"0000:3B:00.0", "1"}, `device address "0000:3B:00.0": want DDDD:BB:DD.F (lower-case hex)`},
		{[]string{"0000:3b:00.0", "6"}, `BAR "6": want a BAR index 0-5`},
		{[]string{"0000:3b:00.0", "x"}, `BAR "x"`},
		{[]string{"-kind", "secret", "0000:3b:00.0", "0"}, `allocate: -kind "secret": want shared or private`},
		{[]string{"-range", "4096", "0000:3b:00.0", "0"}, `invalid value "4096" for flag -range: want OFFSET:LENGTH`},
		{[]string{"-range", "0:lots", "0000:3b:00.0", "0"}, `length: "lots" is not a number`},
		{[]string{"-range", "0:16777216T", "0000:3b:00.0", "0"}, "overflows 64 bits"},
		{[]string{"-hold", "-exec", "0000:3b:00.0", "0", "--", "true"}, "-hold and -exec exclude each other"},
		{[]string{"-exec", "0000:3b:00.0", "0"}, "-exec needs a command after --"},
		{[]string{"-exec", "0000:3b:00.0", "0", "--"}, "-exec needs a command after --"},
		{[]string{"0000:3b:00.0", "0", "--", "true"}, "a command after -- needs -exec"},
		{[]string{"-bogus", "0000:3b:00.0", "0"}, "flag provided but not defined: -bogus"},
		{[]string{"-ttl", "-1s", "0000:3b:00.0", "0"}, "allocate: -ttl -1s: want a non-negative duration"},
		{[]string{"-ttl", "1 hour", "0000:3b:00.0", "0"}, `invalid value "1 hour" for flag -ttl`},
	}
	for _, tt := range tests {
		c, _ := testCLI()
		_, err := parseAllocate(c, tt.args)
		var ue *usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseAllocate(%q) = %v, want a usage error containing %q", tt.args, err, tt.want)
		}
		if exitCode(err) != exitUsage {
			t.Errorf("parseAllocate(%q): exit code %d, want %d", tt.args, exitCode(err), exitUsage)
		}
	}
}

func TestParseSize(t *testing.T) {
	good := map[string]uint64{"0": 0, "4096": 4096, "0x1000": 4096, "0o10": 8, "0b100": 4, "4k": 4096,
		"64K": 64 << 10, "1M": 1 << 20, "2G": 2 << 30, "1T": 1 << 40, "0x10M": 16 << 20, "1_000": 1000}
	for in, want := range good {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "K", "-1", "1.5M", "1P", "0x", "16777216T", "18446744073709551616"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestCommandLine(t *testing.T) {
	tests := []struct {
		args     []string
		code     int
		inStderr string
	}{
		{nil, exitUsage, "no command given"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"-help"}, exitOK, "Usage: mmiobrokerctl"},
		{[]string{"help"}, exitOK, "Commands:"},
		{[]string{"-timeout", "0s", "devices"}, exitUsage, "-timeout must be positive"},
		{[]string{"devices", "extra"}, exitUsage, "devices: want 0 argument(s), got 1"},
		{[]string{"device"}, exitUsage, "device: want 1 argument(s), got 0"},
		{[]string{"device", "nonsense"}, exitUsage, `device address "nonsense"`},
		{[]string{"leases", "-device", "x"}, exitUsage, `device address "x"`},
		{[]string{"leases", "-uid", "4294967296"}, exitUsage, "-uid 4294967296 is out of range"},
		{[]string{"revoke"}, exitUsage, "revoke: want 1 argument(s), got 0"},
		{[]string{"revoke", "-grace", "-5s", "x"}, exitUsage, "revoke: -grace -5s: want a non-negative duration"},
		{[]string{"revoke", "-grace", "soon", "x"}, exitUsage, `invalid value "soon" for flag -grace`},
		{[]string{"renew"}, exitUsage, "renew: want 1 argument(s), got 0"},
		{[]string{"renew", "-ttl", "-1h", "x"}, exitUsage, "renew: -ttl -1h0m0s: want a non-negative duration"},
		{[]string{"suspend"}, exitUsage, "suspend: want 1 argument(s), got 0"},
		{[]string{"suspend", "3b:00"}, exitUsage, `device address "3b:00"`},
		{[]string{"resume", "a", "b"}, exitUsage, "resume: want 1 argument(s), got 2"},
		{[]string{"release", "a", "b"}, exitUsage, "release: want 1 argument(s), got 2"},
		{[]string{"watch", "-cursor", "-1"}, exitUsage, "invalid value"},
		{[]string{"cycle"}, exitUsage, "cycle: want 1 argument(s), got 0"},
		{[]string{"cycle", "0000:3b:00.0", "0000:3c:00.0"}, exitUsage, "cycle: want 1 argument(s), got 2"},
		{[]string{"cycle", "3b:00"}, exitUsage, `device address "3b:00"`},
		{[]string{"leases", "-tenant"}, exitUsage, "flag needs an argument: -tenant"},
		// A well-formed command with nobody listening: Unavailable.
		{[]string{"-socket", "/nonexistent/control.sock", "-timeout", "5s", "devices"}, exitUnavailable, "mmiobrokerctl: cannot reach mmiobrokerd at /nonexistent/control.sock: there is no socket there"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		code := run(context.Background(), tt.args, &out, &errb, noEnv)
		if code != tt.code || !strings.Contains(errb.String(), tt.inStderr) {
			t.Errorf("mmiobrokerctl %q: exit %d, stderr:\n%s\nwant exit %d and stderr containing %q", tt.args, code, errb.String(), tt.code, tt.inStderr)
		}
	}
}

func TestSocketEnvironment(t *testing.T) {
	env := map[string]string{envSocket: "/env/control.sock", envClaimSocket: "/env/fd.sock"}
	c := &cli{stdout: io.Discard, stderr: io.Discard, getenv: func(k string) string { return env[k] }}
	if err := c.globalFlags().Parse(nil); err != nil {
		t.Fatal(err)
	}
	if c.socket != "/env/control.sock" || c.claimSocket != "/env/fd.sock" || c.timeout != defaultTimeout {
		t.Errorf("defaults from the environment: socket %q, claim socket %q, timeout %v", c.socket, c.claimSocket, c.timeout)
	}
	c = &cli{stdout: io.Discard, stderr: io.Discard, getenv: noEnv}
	if err := c.globalFlags().Parse([]string{"-socket", "/x.sock"}); err != nil {
		t.Fatal(err)
	}
	if c.socket != "/x.sock" || c.claimSocket != "" {
		t.Errorf("socket %q, claim socket %q", c.socket, c.claimSocket)
	}
	c = &cli{stdout: io.Discard, stderr: io.Discard, getenv: noEnv}
	if err := c.globalFlags().Parse(nil); err != nil || c.socket != client.DefaultSocket {
		t.Errorf("default socket %q, %v", c.socket, err)
	}
}

func TestExitCodes(t *testing.T) {
	tests := []struct {
		err  error
		code int
	}{
		{nil, 0},
		{errors.New("local failure"), exitError},
		{usagef("bad"), exitUsage},
		{status.Error(codes.NotFound, "x"), exitNotFound},
		{status.Error(codes.PermissionDenied, "x"), exitPermissionDenied},
		{status.Error(codes.Unauthenticated, "x"), exitPermissionDenied},
		{status.Error(codes.FailedPrecondition, "x"), exitFailedPrecondition},
		{status.Error(codes.InvalidArgument, "x"), exitInvalidArgument},
		{status.Error(codes.ResourceExhausted, "x"), exitResourceExhausted},
		{status.Error(codes.Unavailable, "x"), exitUnavailable},
		{status.Error(codes.DeadlineExceeded, "x"), exitDeadlineExceeded},
		{context.DeadlineExceeded, exitDeadlineExceeded},
		{status.Error(codes.Internal, "x"), exitError},
		{fmt.Errorf("wrapped: %w", status.Error(codes.NotFound, "x")), exitNotFound},
		{&leaseEndedError{msg: "gone"}, exitLeaseEnded},
		{&exitStatus{code: 42}, 42},
		{&exitStatus{code: exitCannotExec, err: errors.New("no such file")}, exitCannotExec},
	}
	for _, tt := range tests {
		if got := exitCode(tt.err); got != tt.code {
			t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.code)
		}
	}
}

func TestPrintError(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{status.Error(codes.NotFound, "device 0000:00:1f.0: not found"), "mmiobrokerctl: NotFound: device 0000:00:1f.0: not found\n"},
		{errors.New("plain"), "mmiobrokerctl: plain\n"},
		{usagef("no command given"), "mmiobrokerctl: no command given\nRun 'mmiobrokerctl -help' for usage.\n"},
		{&exitStatus{code: 3}, ""},
		{&exitStatus{code: 127, err: errors.New("run x: not found")}, "mmiobrokerctl: run x: not found\n"},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		printError(&b, tt.err)
		if b.String() != tt.want {
			t.Errorf("printError(%v) = %q, want %q", tt.err, b.String(), tt.want)
		}
	}
}

var (
	t0 = timestamppb.New(time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC))
	t1 = timestamppb.New(time.Date(2026, 3, 4, 5, 6, 9, 0, time.UTC))
	t2 = timestamppb.New(time.Date(2026, 3, 4, 6, 6, 7, 0, time.UTC))
	t3 = timestamppb.New(time.Date(2026, 3, 4, 5, 7, 9, 0, time.UTC))
)

func testDevices() []*brokerv1.Device {
	return []*brokerv1.Device{{
		Bdf: "0000:3b:00.0", VendorId: 0x10de, DeviceId: 0x2330, ClassCode: 0x030200, Driver: "vfio-pci",
		IommuGroup: 12, AccessMode: brokerv1.AccessMode_ACCESS_MODE_CDEV,
		Bars: []*brokerv1.Bar{
			{Index: 0, Size: 16 << 20, Mem: true},
			{Index: 2, Size: 64 << 30, Mem: true, Prefetch: true, Addr64: true},
			{Index: 5, Size: 128},
		},
		Tsm:             &brokerv1.TsmState{Present: true, Connect: "tsm0", Bound: "tsm0"},
		DmaBufSupported: true, Usable: true, LiveLeases: 2, ErrorCount: 3, EndedLiveLeases: 1,
		CycleTime: timestamppb.New(time.Date(2026, 12, 6, 2, 0, 0, 0, time.UTC)),
		Policy: &brokerv1.DevicePolicy{AllowedBars: []uint32{0, 2}, AllowedKinds: []brokerv1.LeaseKind{
			brokerv1.LeaseKind_LEASE_KIND_SHARED, brokerv1.LeaseKind_LEASE_KIND_PRIVATE}, AllowedUids: []uint32{107}, AllowedGids: []uint32{36, 37}},
	}, {
		Bdf: "0000:3c:00.0", VendorId: 0x1234, DeviceId: 0x11e8, ClassCode: 0xff00, IommuGroup: -1,
		DmaBufUnsupportedReason: "kernel lacks VFIO dma-buf export", Error: "device 0000:3c:00.0: not bound to vfio-pci",
		Policy: &brokerv1.DevicePolicy{AllowedKinds: []brokerv1.LeaseKind{brokerv1.LeaseKind_LEASE_KIND_SHARED}},
	}, {
		Bdf: "0000:3d:00.0", VendorId: 0x1af4, DeviceId: 0x1110, ClassCode: 0x050000, Driver: "vfio-pci", IommuGroup: 14,
		AccessMode: brokerv1.AccessMode_ACCESS_MODE_GROUP, Tsm: &brokerv1.TsmState{}, DmaBufSupported: true, Usable: true,
		Suspended: true, LiveLeases: 1, Policy: &brokerv1.DevicePolicy{AllowedKinds: []brokerv1.LeaseKind{brokerv1.LeaseKind_LEASE_KIND_SHARED}},
	}}
}

func TestWriteDevices(t *testing.T) {
	var b bytes.Buffer
	if err := writeDevices(&b, testDevices()); err != nil {
		t.Fatal(err)
	}
	want := `BDF           ID         CLASS   DRIVER    GROUP  MODE   DMA-BUF  TSM    LEASES  ERRORS  STATUS
0000:3b:00.0  10de:2330  030200  vfio-pci  12     cdev   yes      bound  2       3       usable
0000:3c:00.0  1234:11e8  00ff00  -         -      -      no       -      0       0       unusable: device 0000:3c:00.0: not bound to vfio-pci
0000:3d:00.0  1af4:1110  050000  vfio-pci  14     group  yes      -      1       0       suspended
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("devices table (-want +got):\n%s", diff)
	}
}

func TestWriteDevice(t *testing.T) {
	var b bytes.Buffer
	if err := writeDevice(&b, testDevices()[0]); err != nil {
		t.Fatal(err)
	}
	want := `Device:             0000:3b:00.0
Vendor:device:      10de:2330
Class:              030200
Driver:             vfio-pci
IOMMU group:        12
Access mode:        cdev
dma-buf export:     supported
TSM:                connect=tsm0 bound=tsm0
Status:             usable
Suspended:          no
Errors (AER):       3
Live leases:        2
Ended-live leases:  1
Next cycle:         2026-12-06T02:00:00Z
Last tenant cycle:  -
Leasable BARs:      0,2
Lease kinds:        shared, private
Unattested private: no
Who may lease:      admins, uids [107], gids [36,37]
BARs:
  INDEX  TYPE            SIZE   BYTES
  0      mem32           16MiB  0x1000000
  2      mem64,prefetch  64GiB  0x1000000000
  5      io              128B   0x80
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("device (-want +got):\n%s", diff)
	}
	b.Reset()
	if err := writeDevice(&b, testDevices()[1]); err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"dma-buf export:     not supported: kernel lacks VFIO dma-buf export\n",
		"TSM:                not present\n",
		"Leasable BARs:      every memory BAR\n",
		"Who may lease:      admins only\n",
		"Status:             unusable: device 0000:3c:00.0: not bound to vfio-pci\n",
	} {
		if !strings.Contains(b.String(), line) {
			t.Errorf("unusable device output lacks %q:\n%s", line, b.String())
		}
	}
}

func testLeases() []*brokerv1.Lease {
	return []*brokerv1.Lease{{
		Id: "0123456789abcdef01234567", Bdf: "0000:3b:00.0", Bar: 2,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 1 << 20}, {Offset: 2 << 20, Length: 4096}},
		Kind:   brokerv1.LeaseKind_LEASE_KIND_SHARED, State: brokerv1.LeaseState_LEASE_STATE_ACTIVE,
		Generation: 2, Size: 1<<20 + 4096, Inode: 4711,
		Holder: &brokerv1.Holder{Uid: 107, Pid: 4242, Tenant: `uid=107,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope`},
		VmName: "vm1", CreateTime: t0, ClaimTime: t1,
		Ttl: durationpb.New(time.Hour), ExpireTime: t2, RevokeDeadline: t3,
	}, {
		Id: "fedcba9876543210fedcba98", Bdf: "0000:3b:00.0", Bar: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}},
		Kind:   brokerv1.LeaseKind_LEASE_KIND_PRIVATE, Unattested: true, State: brokerv1.LeaseState_LEASE_STATE_RELEASED,
		Generation: 1, Size: 4096, Inode: 4712, Holder: &brokerv1.Holder{Uid: 0, Pid: 99, Tenant: "uid=0"},
		CreateTime: t0, EndTime: t1, EndReason: brokerv1.EndReason_END_REASON_CLAIM_EXPIRED, EndedBy: "broker", FdDead: true,
	}, {
		// Ended-but-live: released after its fd was claimed; the fd works until the
		// device cycles, at the latest at revoke_due.
		Id: "00112233445566778899aabb", Bdf: "0000:3b:00.0", Bar: 2,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}},
		Kind:   brokerv1.LeaseKind_LEASE_KIND_SHARED, State: brokerv1.LeaseState_LEASE_STATE_RELEASED,
		Generation: 1, Size: 4096, Inode: 4713, Holder: &brokerv1.Holder{Uid: 1000, Pid: 77, Tenant: "uid=1000"},
		CreateTime: t0, ClaimTime: t0, EndTime: t1, EndReason: brokerv1.EndReason_END_REASON_RELEASED, EndedBy: "uid 1000 pid 77",
		RevokeDue: t3,
	}, {
		// A live lease from a daemon that does not report tenants.
		Id: "ffeeddccbbaa998877665544", Bdf: "0000:3d:00.0", Bar: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}},
		Kind:   brokerv1.LeaseKind_LEASE_KIND_SHARED, State: brokerv1.LeaseState_LEASE_STATE_ALLOCATED,
		Generation: 1, Size: 4096, Inode: 4714, Holder: &brokerv1.Holder{Uid: 1000, Pid: 78},
		CreateTime: t0, ClaimDeadline: t1,
	}}
}

func TestWriteLeases(t *testing.T) {
	var b bytes.Buffer
	if err := writeLeases(&b, testLeases()); err != nil {
		t.Fatal(err)
	}
	want := `ID                        BDF           BAR  KIND                STATE      GEN  SIZE     UID   PID   VM   CREATED               EXPIRES               REVOKE-BY             END            FD                               TENANT
0123456789abcdef01234567  0000:3b:00.0  2    shared              active     2    1028KiB  107   4242  vm1  2026-03-04T05:06:07Z  2026-03-04T06:06:07Z  2026-03-04T05:07:09Z  -              -                                uid=107,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope
fedcba9876543210fedcba98  0000:3b:00.0  0    private,unattested  released   1    4KiB     0     99    -    2026-03-04T05:06:07Z  -                     -                     claim_expired  dead                             uid=0
00112233445566778899aabb  0000:3b:00.0  2    shared              released   1    4KiB     1000  77    -    2026-03-04T05:06:07Z  -                     -                     released       live until 2026-03-04T05:07:09Z  uid=1000
ffeeddccbbaa998877665544  0000:3d:00.0  0    shared              allocated  1    4KiB     1000  78    -    2026-03-04T05:06:07Z  -                     -                     -              -                                -
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("leases table (-want +got):\n%s", diff)
	}
	b.Reset()
	if err := writeLeases(&b, nil); err != nil || b.String() != "ID  BDF  BAR  KIND  STATE  GEN  SIZE  UID  PID  VM  CREATED  EXPIRES  REVOKE-BY  END  FD  TENANT\n" {
		t.Errorf("empty leases table = %q, %v", b.String(), err)
	}
}

func TestWriteEventLine(t *testing.T) {
	leases := testLeases()
	tests := []struct {
		e    *brokerv1.Event
		want string
	}{
		{&brokerv1.Event{Seq: 7, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_REISSUED, Lease: leases[0], ClaimToken: "secret"},
			"seq=7 time=2026-03-04T05:06:09Z type=reissued lease=0123456789abcdef01234567 bdf=0000:3b:00.0 bar=2 generation=2 state=active uid=107 pid=4242 tenant=\"uid=107,cgroup=/machine.slice/machine-qemu\\\\x2d1\\\\x2dvm1.scope\" vm=vm1 ttl=1h0m0s expires=2026-03-04T06:06:07Z revoke_deadline=2026-03-04T05:07:09Z\n"},
		{&brokerv1.Event{Seq: 7, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_REISSUED, Lease: leases[0], CausedBy: "uid=1000"},
			"seq=7 time=2026-03-04T05:06:09Z type=reissued lease=0123456789abcdef01234567 bdf=0000:3b:00.0 bar=2 generation=2 state=active uid=107 pid=4242 tenant=\"uid=107,cgroup=/machine.slice/machine-qemu\\\\x2d1\\\\x2dvm1.scope\" vm=vm1 ttl=1h0m0s expires=2026-03-04T06:06:07Z revoke_deadline=2026-03-04T05:07:09Z caused_by=\"uid=1000\"\n"},
		{&brokerv1.Event{Seq: 8, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_EXPIRED, Lease: leases[1]},
			"seq=8 time=2026-03-04T05:06:09Z type=expired lease=fedcba9876543210fedcba98 bdf=0000:3b:00.0 bar=0 generation=1 state=released uid=0 pid=99 tenant=\"uid=0\" end_reason=claim_expired ended_by=broker fd_dead=true\n"},
		// Released after the claim: ended but live.
		{&brokerv1.Event{Seq: 11, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_RELEASED, Lease: leases[2]},
			"seq=11 time=2026-03-04T05:06:09Z type=released lease=00112233445566778899aabb bdf=0000:3b:00.0 bar=2 generation=1 state=released uid=1000 pid=77 tenant=\"uid=1000\" end_reason=released ended_by=\"uid 1000 pid 77\" revoke_due=2026-03-04T05:07:09Z\n"},
		// Its fd died in a cycle an admin caused.
		{&brokerv1.Event{Seq: 12, Time: t3, Type: brokerv1.EventType_EVENT_TYPE_FD_REVOKED, CausedBy: "uid 0 (admin) pid 42", Lease: &brokerv1.Lease{
			Id: "00112233445566778899aabb", Bdf: "0000:3b:00.0", Bar: 2, State: brokerv1.LeaseState_LEASE_STATE_RELEASED, Generation: 1,
			Holder: &brokerv1.Holder{Uid: 1000, Pid: 77, Tenant: "uid=1000"}, EndReason: brokerv1.EndReason_END_REASON_RELEASED, EndedBy: "uid 1000 pid 77", FdDead: true}},
			"seq=12 time=2026-03-04T05:07:09Z type=fd_revoked lease=00112233445566778899aabb bdf=0000:3b:00.0 bar=2 generation=1 state=released uid=1000 pid=77 tenant=\"uid=1000\" end_reason=released ended_by=\"uid 1000 pid 77\" fd_dead=true caused_by=\"uid 0 (admin) pid 42\"\n"},
		{&brokerv1.Event{Seq: 9, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED, Lease: &brokerv1.Lease{
			Id: "0123456789abcdef01234567", Bdf: "0000:3b:00.0", State: brokerv1.LeaseState_LEASE_STATE_ACTIVE, Generation: 1,
			Holder: &brokerv1.Holder{Uid: 107, Pid: 4242}, RevokeDeadline: t3}},
			"seq=9 time=2026-03-04T05:06:09Z type=revoke_requested lease=0123456789abcdef01234567 bdf=0000:3b:00.0 bar=0 generation=1 state=active uid=107 pid=4242 revoke_deadline=2026-03-04T05:07:09Z\n"},
		{&brokerv1.Event{Seq: 10, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_RELEASED, Lease: &brokerv1.Lease{
			Id: "0123456789abcdef01234567", Bdf: "0000:3b:00.0", State: brokerv1.LeaseState_LEASE_STATE_RELEASED, Generation: 1,
			Holder: &brokerv1.Holder{Uid: 107, Pid: 4242}, Ttl: durationpb.New(time.Minute), EndReason: brokerv1.EndReason_END_REASON_HOLDER_EXITED, EndedBy: "pid 4242 exited"}},
			"seq=10 time=2026-03-04T05:06:09Z type=released lease=0123456789abcdef01234567 bdf=0000:3b:00.0 bar=0 generation=1 state=released uid=107 pid=4242 ttl=1m0s end_reason=holder_exited ended_by=\"pid 4242 exited\"\n"},
		// About a device, not a lease (watch -devices).
		{&brokerv1.Event{Seq: 13, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED, Bdf: "0000:3b:00.0"},
			"seq=13 time=2026-03-04T05:06:09Z type=device_changed bdf=0000:3b:00.0\n"},
		{&brokerv1.Event{Seq: 14, Time: t1, Type: brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED, Bdf: "0000:3b:00.0", CausedBy: "uid 0 (admin) pid 5"},
			"seq=14 time=2026-03-04T05:06:09Z type=device_changed bdf=0000:3b:00.0 caused_by=\"uid 0 (admin) pid 5\"\n"},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		if err := writeEventLine(&b, tt.e); err != nil {
			t.Fatal(err)
		}
		if b.String() != tt.want {
			t.Errorf("event line\n got %q\nwant %q", b.String(), tt.want)
		}
	}
	l := testLeases()[0]
	l.VmName = "my vm"
	l.Ttl, l.ExpireTime, l.RevokeDeadline = nil, nil, nil
	l.EndReason, l.EndedBy = brokerv1.EndReason_END_REASON_REVOKED, "uid 0 (admin) pid 5"
	var b bytes.Buffer
	writeEventLine(&b, &brokerv1.Event{Seq: 9, Type: brokerv1.EventType_EVENT_TYPE_REVOKED, Lease: l})
	if !strings.HasSuffix(b.String(), ` vm="my vm" end_reason=revoked ended_by="uid 0 (admin) pid 5"`+"\n") {
		t.Errorf("quoted values: %q", b.String())
	}
}

func TestJSON(t *testing.T) {
	var b bytes.Buffer
	if err := writeJSON(&b, &brokerv1.ListLeasesResponse{Leases: testLeases()[:1]}); err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Leases []map[string]any `json:"leases"`
	}
	if err := json.Unmarshal(b.Bytes(), &doc); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, b.String())
	}
	l := doc.Leases[0]
	// proto field names, enum names, 64-bit integers as strings, every field present.
	checks := map[string]any{"id": "0123456789abcdef01234567", "state": "LEASE_STATE_ACTIVE", "kind": "LEASE_KIND_SHARED",
		"size": "1052672", "bar": float64(2), "vm_name": "vm1", "create_time": "2026-03-04T05:06:07Z", "end_reason": "END_REASON_UNSPECIFIED",
		"ended_by": "", "end_time": nil, "unattested": false, "revoke_due": nil, "fd_dead": false,
		"holder": map[string]any{"uid": float64(107), "pid": float64(4242), "tenant": `uid=107,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope`}}
	for k, want := range checks {
		if got, ok := l[k]; !ok || !cmp.Equal(got, want) {
			t.Errorf("lease JSON %s = %#v (present %v), want %#v", k, got, ok, want)
		}
	}
	// An ended-but-live lease and an ended lease whose fd is dead.
	var ended bytes.Buffer
	if err := writeJSON(&ended, &brokerv1.ListLeasesResponse{Leases: testLeases()[1:3]}); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(ended.Bytes(), &doc); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, ended.String())
	}
	for i, want := range []map[string]any{
		{"id": "fedcba9876543210fedcba98", "fd_dead": true, "revoke_due": nil},
		{"id": "00112233445566778899aabb", "fd_dead": false, "revoke_due": "2026-03-04T05:07:09Z", "end_reason": "END_REASON_RELEASED"},
	} {
		for k, w := range want {
			if got, ok := doc.Leases[i][k]; !ok || !cmp.Equal(got, w) {
				t.Errorf("lease %d JSON %s = %#v (present %v), want %#v", i, k, got, ok, w)
			}
		}
	}
	if !strings.HasPrefix(b.String(), "{\n  \"leases\": [\n    {\n      \"id\": ") {
		t.Errorf("JSON is not indented by two spaces:\n%s", b.String())
	}
	// The output is stable (protojson randomizes whitespace; it is normalized).
	for range 5 {
		var again bytes.Buffer
		writeJSON(&again, &brokerv1.ListLeasesResponse{Leases: testLeases()[:1]})
		if again.String() != b.String() {
			t.Fatalf("JSON output differs between runs:\n%s\n%s", b.String(), again.String())
		}
	}

	b.Reset()
	if err := writeJSONLine(&b, &brokerv1.Event{Seq: 3, Type: brokerv1.EventType_EVENT_TYPE_CLAIMED, Lease: testLeases()[0]}); err != nil {
		t.Fatal(err)
	}
	if strings.Count(b.String(), "\n") != 1 || !strings.HasPrefix(b.String(), `{"seq":"3","time":null,"type":"EVENT_TYPE_CLAIMED","lease":{"id":`) {
		t.Errorf("event JSON line: %s", b.String())
	}
	b.Reset()
	if err := writeJSONLine(&b, &brokerv1.Event{Seq: 4, Type: brokerv1.EventType_EVENT_TYPE_FD_REVOKED, Lease: testLeases()[1], CausedBy: "uid=1000", Bdf: testLeases()[1].GetBdf()}); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.String(), `{"seq":"4","time":null,"type":"EVENT_TYPE_FD_REVOKED","lease":{"id":`) ||
		!strings.HasSuffix(b.String(), `"claim_token":"","caused_by":"uid=1000","bdf":"0000:3b:00.0"}`+"\n") {
		t.Errorf("fd_revoked event JSON line: %s", b.String())
	}
}

func TestLeaseEnv(t *testing.T) {
	l := &client.Lease{ID: "abc", Lease: testLeases()[0],
		Claim: client.ClaimInfo{Generation: 2, Size: 1052672, Inode: 4711}}
	want := []string{"MMIO_LEASE_ID=abc", "MMIO_LEASE_FD=3", "MMIO_LEASE_BDF=0000:3b:00.0", "MMIO_LEASE_BAR=2",
		"MMIO_LEASE_KIND=shared", "MMIO_LEASE_SIZE=1052672", "MMIO_LEASE_INODE=4711", "MMIO_LEASE_GENERATION=2"}
	if diff := cmp.Diff(want, leaseEnv(l)); diff != "" {
		t.Errorf("leaseEnv (-want +got):\n%s", diff)
	}
}

func TestWriteAllocation(t *testing.T) {
	var b bytes.Buffer
	l := testLeases()[0]
	fd := fdDescription{FD: 7, Inode: 4711, Size: 1052672, Generation: 1, ExpName: "vfio_pci_core", Name: "mmb-0123456789abcdef01234567"}
	if err := writeAllocation(&b, l, fd); err != nil {
		t.Fatal(err)
	}
	want := `lease 0123456789abcdef01234567 allocated and claimed
  device      0000:3b:00.0 bar 2
  ranges      [0x0,+0x100000) [0x200000,+0x1000)
  kind        shared
  vm          vm1
  ttl         1h0m0s (expires 2026-03-04T06:06:07Z unless renewed)
  generation  1
  size        1052672 (1028KiB)
  inode       4711
  fd          7 (exp_name vfio_pci_core, name mmb-0123456789abcdef01234567)
holding the fd; SIGINT (Ctrl-C) or SIGTERM releases the lease
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("allocation (-want +got):\n%s", diff)
	}
	b.Reset()
	if err := writeJSON(&b, allocation{Lease: jsonMessage{l}, FD: fd}); err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Lease map[string]any `json:"lease"`
		FD    map[string]any `json:"fd"`
	}
	if err := json.Unmarshal(b.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Lease["id"] != l.Id || doc.FD["fd"] != float64(7) || doc.FD["exp_name"] != "vfio_pci_core" || doc.FD["inode"] != float64(4711) {
		t.Errorf("allocation JSON: %s", b.String())
	}
}

// describeFD reads the fd number and, for a non-dma-buf, leaves exp_name empty.
func TestDescribeFD(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "buf")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := describeFD(f, client.ClaimInfo{Generation: 3, Size: 10, Inode: 11})
	if d.FD < 3 || d.ExpName != "" || d.Generation != 3 || d.Size != 10 || d.Inode != 11 {
		t.Errorf("describeFD = %+v", d)
	}
}

// TestUnreachableDaemon: a daemon that cannot be reached is explained in words (which
// socket, what is wrong with it, what to check), with exit code 8, instead of a raw gRPC
// "Unavailable: connection error".
func TestUnreachableDaemon(t *testing.T) {
	dir := t.TempDir()
	refused := filepath.Join(dir, "refused.sock")
	l, err := net.Listen("unix", refused)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close() // the file stays, nobody listens
	notSock := filepath.Join(dir, "file")
	if err := os.WriteFile(notSock, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		path, want string
	}{
		{filepath.Join(dir, "missing.sock"), "there is no socket there"},
		{refused, "nothing listens on it"},
		{notSock, "that path is not a socket"},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{"-socket", tt.path, "-timeout", "5s", "devices"}, &out, &errb, noEnv)
		msg := errb.String()
		if code != exitUnavailable || !strings.Contains(msg, "cannot reach mmiobrokerd at "+tt.path) || !strings.Contains(msg, tt.want) ||
			!strings.Contains(msg, "systemctl status mmiobrokerd.socket") {
			t.Errorf("devices with -socket %s: exit %d, stderr %q; want exit %d explaining %q", tt.path, code, msg, exitUnavailable, tt.want)
		}
	}
}
