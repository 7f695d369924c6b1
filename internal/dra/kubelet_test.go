package dra

import (
	"bytes"
	"context"
	"errors"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	drahealthv1 "k8s.io/kubelet/pkg/apis/dra-health/v1"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// The fake devices of the kubelet tests: 0000:3b:00.0 with BAR 0 (1 MiB) and BAR 4
// (16 MiB, prefetchable), shared leases only; 0000:3c:00.0 with BAR 4 split into four.
const (
	bdfA = "0000:3b:00.0"
	bdfB = "0000:3c:00.0"
)

const kubeletDevices = `
[limits]
revoke_within = "0s"
tenant_cycle_interval = "0s"

[[device]]
address = "0000:3b:00.0"

[[device]]
address = "0000:3c:00.0"
bars = [4]
kinds = ["shared", "private"]
allow_unattested_private = true
`

type kubeletEnv struct {
	daemon                 *daemontest.Daemon
	broker                 *client.Client // the test's admin client
	cdi, plugins, registry string
	opt                    Options
}

func newKubeletEnv(t *testing.T, objs ...*resourceapi.ResourceClaim) (*kubeletEnv, *plugin) {
	t.Helper()
	return newKubeletEnvWith(t, nil, objs...)
}

// newKubeletEnvWith is newKubeletEnv with the plugin's options changed by mutate.
func newKubeletEnvWith(t *testing.T, mutate func(*Options), objs ...*resourceapi.ResourceClaim) (*kubeletEnv, *plugin) {
	t.Helper()
	d := daemontest.Start(t, kubeletDevices, brokertest.NewDevice(bdfA), brokertest.NewDevice(bdfB))
	dir := testutil.ShortTempDir(t)
	cdi, plugins, registry := pluginDirs(t, dir)
	kube := dratest.NewKube(t)
	for _, c := range objs {
		dratest.CreateClaim(t, kube, c)
	}
	e := &kubeletEnv{daemon: d, broker: dratest.DialBroker(t, d.Control), cdi: cdi, plugins: plugins, registry: registry}
	e.opt = Options{
		Kube: kube, ControlSocket: d.Control, CDIDir: cdi, PluginDataDir: plugins, RegistrarDir: registry,
		Partitions: []Partition{{BDF: bdfB, BAR: 4, Count: 4}},
	}
	if mutate != nil {
		mutate(&e.opt)
	}
	return e, startPlugin(t, e.opt)
}

var tokenPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

var cmpProto = protocmp.Transform()

// TestKubeletPrepareUnprepare plays the kubelet on the plugin's real sockets: plugin
// registration, then NodePrepareResources and NodeUnprepareResources of a real
// ResourceClaim served by a (fake) API server, their CDI output, idempotency, and a
// plugin restart in between.
func TestKubeletPrepareUnprepare(t *testing.T) {
	podUID := types.UID("8d1c4e2a-11f0-4c3b-9242-ac1200020001")
	claim := dratest.NewClaim("vm1-mmio", "c0ffee00-0000-4000-8000-000000000001", []dratest.Pod{{Name: "virt-launcher-vm1", UID: podUID}},
		[]dratest.Alloc{{Request: "bar", Device: "0000-3b-00-0-bar4"}, {Request: "quarter", Device: "0000-3c-00-0-bar4-p2of4"}})
	e, p := newKubeletEnv(t, claim)
	// The claim socket's group, which containers get to connect to it (the daemon's units
	// make it root:mmiobroker 0660).
	// Root gives it a group of its own; otherwise it keeps the test process's.
	socketGID := uint32(os.Getgid())
	if os.Geteuid() == 0 {
		socketGID = 4242
		if err := os.Chown(e.daemon.Claim, -1, int(socketGID)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(e.daemon.Claim, 0o660); err != nil {
		t.Fatal(err)
	}
	k := dratest.RegisterPlugin(t, e.registry)
	if k.Info.GetType() != "DRAPlugin" || k.Info.GetName() != DriverName ||
		!strings.Contains(strings.Join(k.Info.GetSupportedVersions(), ","), drapbv1.DRAPluginService) {
		t.Fatalf("registration info %v: want a DRAPlugin %s serving %s", k.Info, DriverName, drapbv1.DRAPluginService)
	}

	r := k.Prepare(claim)
	if r.GetError() != "" {
		t.Fatalf("prepare: %s", r.GetError())
	}
	want := []*drapbv1.Device{
		{RequestNames: []string{"bar"}, PoolName: dratest.Node, DeviceName: "0000-3b-00-0-bar4",
			CdiDeviceIds: []string{"mmio.mmiobroker.dev/bar=" + string(claim.UID) + "-0000-3b-00-0-bar4"}},
		{RequestNames: []string{"quarter"}, PoolName: dratest.Node, DeviceName: "0000-3c-00-0-bar4-p2of4",
			CdiDeviceIds: []string{"mmio.mmiobroker.dev/bar=" + string(claim.UID) + "-0000-3c-00-0-bar4-p2of4"}},
	}
	if diff := cmp.Diff(want, r.GetDevices(), cmpProto); diff != "" {
		t.Errorf("prepared devices (-want +got):\n%s", diff)
	}

	// The daemon has one delegated lease per device, labelled with the claim.
	leases := dratest.ClaimLeases(t, e.broker, claim.UID)
	if len(leases) != 2 {
		t.Fatalf("leases of the claim: %v, want 2", leases)
	}
	byDevice := map[string]*brokerv1.Lease{}
	for _, l := range leases {
		byDevice[l.GetLabels()[deviceLabel]] = l
		if l.GetState() != brokerv1.LeaseState_LEASE_STATE_ALLOCATED || l.GetClaimant().GetPodUid() != string(podUID) ||
			l.GetHolder().GetTenant() != "claimant:pod="+string(podUID) || l.GetClaimDeadline() != nil ||
			l.GetLabels()[claimLabel] != dratest.Namespace+"/vm1-mmio" || l.GetVmName() != dratest.Namespace+"/virt-launcher-vm1" {
			t.Errorf("lease %v: want ALLOCATED, delegated to pod %s without claim deadline, labelled", l, podUID)
		}
	}
	for dev, wantRange := range map[string]*brokerv1.Range{
		"0000-3b-00-0-bar4":       {Offset: 0, Length: 16 << 20},
		"0000-3c-00-0-bar4-p2of4": {Offset: 8 << 20, Length: 4 << 20},
	} {
		l := byDevice[dev]
		if l == nil || len(l.GetRanges()) != 1 || l.GetBar() != 4 ||
			l.GetRanges()[0].GetOffset() != wantRange.GetOffset() || l.GetRanges()[0].GetLength() != wantRange.GetLength() {
			t.Errorf("lease of %s: %v, want BAR 4 range %v", dev, l, wantRange)
		}
	}

	// The CDI spec: one device per DRA device, the claim socket mounted, the env.
	path := CDISpecPath(e.cdi, claim.UID)
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("cdi spec %s: %v, mode %v: want 0600", path, err, st.Mode())
	}
	raw := must(os.ReadFile(path))
	spec, err := readSpec(path)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Kind != CDIKind || len(spec.Devices) != 2 || spec.Annotations[annotPod] != string(podUID) {
		t.Fatalf("cdi spec: %+v", spec)
	}
	if err := cdispec.ValidateVersion(spec); err != nil {
		t.Errorf("cdi spec version: %v", err)
	}
	for i, dev := range []string{"0000-3b-00-0-bar4", "0000-3c-00-0-bar4-p2of4"} {
		cd := spec.Devices[i]
		env := dratest.EnvOf(cd.ContainerEdits.Env)
		sfx := "_" + EnvSuffix(dev)
		l := byDevice[dev]
		if cd.Name != string(claim.UID)+"-"+dev || env[EnvClaimSocket] != DefaultContainerClaimSock ||
			env[EnvLeaseID+sfx] != l.GetId() || !tokenPattern.MatchString(env[EnvClaimToken+sfx]) ||
			env[EnvBDF+sfx] != l.GetBdf() || env[EnvBAR+sfx] != "4" || env[EnvRequest+sfx] != []string{"bar", "quarter"}[i] {
			t.Errorf("cdi device %d: %+v", i, cd)
		}
		if _, ok := env[EnvLeaseID]; ok {
			t.Errorf("cdi device %d sets %s in a claim of two devices", i, EnvLeaseID)
		}
		wantMount := []*cdispec.Mount{{HostPath: e.daemon.Claim, ContainerPath: DefaultContainerClaimSock,
			Options: []string{"bind", "ro", "nosuid", "nodev", "noexec"}}}
		if diff := cmp.Diff(wantMount, cd.ContainerEdits.Mounts); diff != "" {
			t.Errorf("cdi device %d mounts (-want +got):\n%s", i, diff)
		}
		var wantGIDs []uint32
		if socketGID != 0 {
			wantGIDs = []uint32{socketGID}
		}
		if diff := cmp.Diff(wantGIDs, cd.ContainerEdits.AdditionalGIDs); diff != "" {
			t.Errorf("cdi device %d additional gids (-want +got):\n%s", i, diff)
		}
		// The token is the daemon's: a process outside the pod is refused with it, and the
		// token stays valid (the refusal changes nothing).
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		f, _, err := fdpass.Claim(ctx, e.daemon.Claim, l.GetId(), env[EnvClaimToken+sfx])
		cancel()
		var re *fdpass.ReplyError
		if f != nil {
			f.Close()
		}
		if !errors.As(err, &re) || re.Code != fdpass.CodePermissionDenied {
			t.Errorf("claim of %s from outside the pod: %v, want PERMISSION_DENIED", l.GetId(), err)
		}
	}

	// Idempotent: a second prepare finds the same leases by label and the tokens in the
	// spec, and writes the same spec.
	if r2 := k.Prepare(claim); r2.GetError() != "" || !cmp.Equal(r.GetDevices(), r2.GetDevices(), cmpProto) {
		t.Errorf("second prepare: %v, want %v", r2, r)
	}
	if got := must(os.ReadFile(path)); !bytes.Equal(got, raw) {
		t.Errorf("second prepare rewrote the spec:\n%s\nwas:\n%s", got, raw)
	}
	sameLeases(t, dratest.ClaimLeases(t, e.broker, claim.UID), leases)

	// A restarted plugin (no state but the spec files) does the same.
	p.stop()
	p2 := startPlugin(t, e.opt)
	k = dratest.RegisterPlugin(t, e.registry)
	if r3 := k.Prepare(claim); r3.GetError() != "" || !cmp.Equal(r.GetDevices(), r3.GetDevices(), cmpProto) {
		t.Errorf("prepare after a plugin restart: %v, want %v", r3, r)
	}
	if got := must(os.ReadFile(path)); !bytes.Equal(got, raw) {
		t.Errorf("prepare after a plugin restart rewrote the spec")
	}
	sameLeases(t, dratest.ClaimLeases(t, e.broker, claim.UID), leases)

	// A spec lost with its tokens: the leases cannot be claimed by anyone any more, so they
	// are released and allocated anew.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if r4 := k.Prepare(claim); r4.GetError() != "" || !cmp.Equal(r.GetDevices(), r4.GetDevices(), cmpProto) {
		t.Errorf("prepare without the spec: %v, want %v", r4, r)
	}
	fresh := dratest.ClaimLeases(t, e.broker, claim.UID)
	if len(fresh) != 2 {
		t.Fatalf("leases after the re-prepare: %v", fresh)
	}
	for _, l := range fresh {
		for _, old := range leases {
			if l.GetId() == old.GetId() {
				t.Errorf("lease %s kept although its token was lost", l.GetId())
			}
		}
	}
	for _, old := range leases {
		got, err := e.broker.API().GetLease(context.Background(), &brokerv1.GetLeaseRequest{LeaseId: old.GetId()})
		if err != nil || got.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_RELEASED {
			t.Errorf("stale lease %s: %v, %v: want RELEASED", old.GetId(), got.GetLease(), err)
		}
	}

	// Unprepare (by the restarted plugin): every lease of the claim ends, the spec goes.
	if msg := k.Unprepare(claim); msg != "" {
		t.Fatalf("unprepare: %s", msg)
	}
	if left := dratest.ClaimLeases(t, e.broker, claim.UID); len(left) != 0 {
		t.Errorf("live leases after unprepare: %v", left)
	}
	for _, l := range fresh {
		got, err := e.broker.API().GetLease(context.Background(), &brokerv1.GetLeaseRequest{LeaseId: l.GetId()})
		if err != nil || got.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_RELEASED || !got.GetLease().GetFdDead() {
			t.Errorf("lease %s after unprepare: %v, %v: want RELEASED, fd dead (never claimed)", l.GetId(), got.GetLease(), err)
		}
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("cdi spec after unprepare: %v, want gone", err)
	}
	// Idempotent, also after another restart.
	if msg := k.Unprepare(claim); msg != "" {
		t.Errorf("second unprepare: %s", msg)
	}
	p2.stop()
	startPlugin(t, e.opt)
	k = dratest.RegisterPlugin(t, e.registry)
	if msg := k.Unprepare(claim); msg != "" {
		t.Errorf("unprepare after a restart: %s", msg)
	}
}

// sameLeases fails unless got and want are the same leases (ids, tokens aside).
func sameLeases(t *testing.T, got, want []*brokerv1.Lease) {
	t.Helper()
	ids := func(ls []*brokerv1.Lease) []string {
		var out []string
		for _, l := range ls {
			out = append(out, l.GetId())
		}
		return out
	}
	if diff := cmp.Diff(ids(want), ids(got)); diff != "" {
		t.Errorf("leases of the claim (-want +got):\n%s", diff)
	}
}

// TestPrepareRefuses: claims the plugin cannot prepare get a clear error, leave no lease
// and no spec behind, and do not stop the other claims of the call.
func TestPrepareRefuses(t *testing.T) {
	onePod := []dratest.Pod{{Name: "launcher", UID: "0b5e6d1c-0000-4000-8000-00000000000a"}}
	bar0 := []dratest.Alloc{{Request: "bar", Device: "0000-3b-00-0-bar0"}}
	cases := []struct {
		name  string
		claim *resourceapi.ResourceClaim
		want  string
	}{
		{"no pod", dratest.NewClaim("no-pod", "c1000000-0000-4000-8000-000000000001", nil, bar0), "reserved for 0 pods"},
		{"two pods", dratest.NewClaim("two-pods", "c1000000-0000-4000-8000-000000000002",
			[]dratest.Pod{onePod[0], {Name: "other", UID: "0b5e6d1c-0000-4000-8000-00000000000b"}}, bar0), "reserved for 2 pods"},
		{"other pool", dratest.NewClaim("other-pool", "c1000000-0000-4000-8000-000000000003", onePod,
			[]dratest.Alloc{{Request: "bar", Pool: "node-2", Device: "0000-3b-00-0-bar0"}}), `this node's pool is "node-1"`},
		{"not a device name", dratest.NewClaim("bad-name", "c1000000-0000-4000-8000-000000000004", onePod,
			[]dratest.Alloc{{Request: "bar", Device: "gpu-0"}}), "not a device of this driver"},
		{"unconfigured device", dratest.NewClaim("unknown", "c1000000-0000-4000-8000-000000000005", onePod,
			[]dratest.Alloc{{Request: "bar", Device: "0000-3d-00-0-bar0"}}), "NotFound"},
		{"a BAR not in the policy", dratest.NewClaim("bar0-of-b", "c1000000-0000-4000-8000-000000000006", onePod,
			[]dratest.Alloc{{Request: "bar", Device: "0000-3c-00-0-bar0"}}), "not leasable"},
		{"unknown config field", dratest.NewClaim("bad-config", "c1000000-0000-4000-8000-000000000007", onePod, bar0,
			dratest.Opaque(resourceapi.AllocationConfigSourceClaim, `{"apiVersion":"mmio.mmiobroker.dev/v1alpha1","kind":"LeaseConfig","leaseKnd":"private"}`)),
			`unknown field "leaseKnd"`},
		{"bad lease kind", dratest.NewClaim("bad-kind", "c1000000-0000-4000-8000-000000000008", onePod, bar0,
			dratest.Opaque(resourceapi.AllocationConfigSourceClass, `{"apiVersion":"mmio.mmiobroker.dev/v1alpha1","kind":"LeaseConfig","leaseKind":"exclusive"}`)),
			`leaseKind "exclusive"`},
		// The second device's lease is refused by the daemon (device A allows no private
		// leases): the first one, already allocated, is released again.
		{"second lease refused", dratest.NewClaim("half", "c1000000-0000-4000-8000-000000000009", onePod,
			[]dratest.Alloc{{Request: "ok", Device: "0000-3c-00-0-bar4-p0of4"}, {Request: "private", Device: "0000-3b-00-0-bar0"}},
			dratest.Opaque(resourceapi.AllocationConfigSourceClaim, `{"apiVersion":"mmio.mmiobroker.dev/v1alpha1","kind":"LeaseConfig","leaseKind":"private"}`, "private")),
			"PermissionDenied"},
	}
	good := dratest.NewClaim("good", "c1000000-0000-4000-8000-0000000000ff", onePod, bar0)
	var all []*resourceapi.ResourceClaim
	for _, c := range cases {
		all = append(all, c.claim)
	}
	e, _ := newKubeletEnv(t, append(all, good)...)
	k := dratest.RegisterPlugin(t, e.registry)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := k.Prepare(c.claim)
			if !strings.Contains(r.GetError(), c.want) || len(r.GetDevices()) != 0 {
				t.Errorf("prepare: error %q, devices %v: want an error containing %q", r.GetError(), r.GetDevices(), c.want)
			}
			if left := dratest.ClaimLeases(t, e.broker, c.claim.UID); len(left) != 0 {
				t.Errorf("live leases after the refusal: %v", left)
			}
			if _, err := os.Stat(CDISpecPath(e.cdi, c.claim.UID)); !os.IsNotExist(err) {
				t.Errorf("cdi spec after the refusal: %v, want none", err)
			}
		})
	}
	// One call with a bad and a good claim: the good one is prepared.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := k.DRA.NodePrepareResources(ctx, &drapbv1.NodePrepareResourcesRequest{
		Claims: []*drapbv1.Claim{dratest.ClaimRef(cases[0].claim), dratest.ClaimRef(good)}})
	if err != nil {
		t.Fatal(err)
	}
	if g := resp.GetClaims()[string(good.UID)]; g.GetError() != "" || len(g.GetDevices()) != 1 {
		t.Errorf("the good claim beside a bad one: %v", g)
	}
	if b := resp.GetClaims()[string(cases[0].claim.UID)]; b.GetError() == "" {
		t.Errorf("the bad claim beside a good one: %v, want an error", b)
	}
	// A private lease where the claim's config asks for it.
	priv := dratest.NewClaim("private", "c1000000-0000-4000-8000-0000000000fe", onePod,
		[]dratest.Alloc{{Request: "p", Device: "0000-3c-00-0-bar4-p3of4"}},
		dratest.Opaque(resourceapi.AllocationConfigSourceClass, `{"apiVersion":"mmio.mmiobroker.dev/v1alpha1","kind":"LeaseConfig","leaseKind":"shared"}`),
		dratest.Opaque(resourceapi.AllocationConfigSourceClaim, `{"apiVersion":"mmio.mmiobroker.dev/v1alpha1","kind":"LeaseConfig","leaseKind":"private"}`, "p"))
	dratest.CreateClaim(t, e.opt.Kube, priv)
	if r := k.Prepare(priv); r.GetError() != "" {
		t.Fatalf("prepare of a private claim: %s", r.GetError())
	}
	if ls := dratest.ClaimLeases(t, e.broker, priv.UID); len(ls) != 1 || ls[0].GetKind() != brokerv1.LeaseKind_LEASE_KIND_PRIVATE || !ls[0].GetUnattested() {
		t.Errorf("lease of the private claim: %v, want one private (unattested) lease", ls)
	}
	// The unprepare of a claim that never was prepared, or whose uid is no uid.
	if msg := k.Unprepare(cases[0].claim); msg != "" {
		t.Errorf("unprepare of a claim never prepared: %s", msg)
	}
	bad := dratest.NewClaim("evil", "../../etc/passwd", onePod, bar0)
	if msg := k.Unprepare(bad); !strings.Contains(msg, "not a uid") {
		t.Errorf("unprepare of claim uid %q: %q, want not a uid", bad.UID, msg)
	}
}

// TestKubeletHealthStream watches device health as the kubelet does: over the plugin's
// DRAResourceHealth service (advertised at registration) on its real DRA socket. Every
// device of every leasable BAR is reported; an admin's suspend of a device makes its
// devices Unhealthy on the stream at once (the daemon's DEVICE_CHANGED event; the periodic
// list is an hour away), and the resume makes them Healthy again.
func TestKubeletHealthStream(t *testing.T) {
	e, _ := newKubeletEnvWith(t, func(o *Options) { o.Resync, o.HealthCheckTimeout = time.Hour, 2*time.Hour })
	k := dratest.RegisterPlugin(t, e.registry)
	if !slices.Contains(k.Info.GetSupportedVersions(), drahealthv1.DRAResourceHealthService) {
		t.Fatalf("registration advertises %v, without %s", k.Info.GetSupportedVersions(), drahealthv1.DRAResourceHealthService)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stream, err := k.Health.NodeWatchResources(ctx, &drahealthv1.NodeWatchResourcesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	latest := map[string]drahealthv1.HealthStatus{}
	// until reads reports until every device of want has its health.
	until := func(what string, want map[string]drahealthv1.HealthStatus) {
		t.Helper()
		for {
			done := true
			for name, h := range want {
				done = done && latest[name] == h
			}
			if done {
				return
			}
			resp, err := stream.Recv()
			if err != nil {
				t.Fatalf("health stream ended waiting for %s (latest %v): %v", what, latest, err)
			}
			for _, d := range resp.GetDevices() {
				if d.GetDevice().GetPoolName() != dratest.Node || d.GetLastUpdatedTime() == 0 {
					t.Errorf("health report %v: want pool %s and a time", d, dratest.Node)
				}
				latest[d.GetDevice().GetDeviceName()] = d.GetHealth()
			}
		}
	}
	all := func(a, b drahealthv1.HealthStatus) map[string]drahealthv1.HealthStatus {
		m := map[string]drahealthv1.HealthStatus{}
		for _, n := range namesA {
			m[n] = a
		}
		for _, n := range namesB {
			m[n] = b
		}
		return m
	}
	until("every device healthy", all(drahealthv1.HealthStatus_HEALTHY, drahealthv1.HealthStatus_HEALTHY))
	if _, err := e.broker.API().SuspendDevice(ctx, &brokerv1.SuspendDeviceRequest{Bdf: bdfA}); err != nil {
		t.Fatal(err)
	}
	until("device A unhealthy after its suspend", all(drahealthv1.HealthStatus_UNHEALTHY, drahealthv1.HealthStatus_HEALTHY))
	if _, err := e.broker.API().ResumeDevice(ctx, &brokerv1.ResumeDeviceRequest{Bdf: bdfA}); err != nil {
		t.Fatal(err)
	}
	until("device A healthy after its resume", all(drahealthv1.HealthStatus_HEALTHY, drahealthv1.HealthStatus_HEALTHY))
}
