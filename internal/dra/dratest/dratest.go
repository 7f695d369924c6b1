// Package dratest is the cluster side of internal/dra's tests: a small fake API server
// (client-go's object tracker behind the typed fakes of the few API groups the plugin
// uses, not the whole fake clientset: the VM rig's guest has little room for a test
// binary), a kubelet that registers the plugin and calls its DRA gRPC service on their
// real sockets, and allocated ResourceClaims as the scheduler leaves them.
//
// It cannot import package dra (dra's own tests use it); [Driver] repeats the driver's
// name.
package dratest

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	fakecorev1 "k8s.io/client-go/kubernetes/typed/core/v1/fake"
	typedresourcev1 "k8s.io/client-go/kubernetes/typed/resource/v1"
	fakeresourcev1 "k8s.io/client-go/kubernetes/typed/resource/v1/fake"
	typedresourcev1beta1 "k8s.io/client-go/kubernetes/typed/resource/v1beta1"
	fakeresourcev1beta1 "k8s.io/client-go/kubernetes/typed/resource/v1beta1/fake"
	typedresourcev1beta2 "k8s.io/client-go/kubernetes/typed/resource/v1beta2"
	fakeresourcev1beta2 "k8s.io/client-go/kubernetes/typed/resource/v1beta2/fake"
	k8stesting "k8s.io/client-go/testing"
	drahealthv1 "k8s.io/kubelet/pkg/apis/dra-health/v1"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/utils/ptr"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// The driver under test (dra.DriverName), the tests' node, and the namespace of their
// claims.
const (
	Driver    = "mmio.mmiobroker.dev"
	Node      = "node-1"
	Namespace = "vms"
)

// ClaimUIDLabel is the lease label the plugin finds a claim's leases by.
const ClaimUIDLabel = "resource.kubernetes.io/claim-uid"

// Kube is a fake API server for the plugin: Nodes and the resource.k8s.io groups, backed
// by client-go's object tracker. Every other group of [kubernetes.Interface] is nil (a
// call panics: the plugin must not use it).
type Kube struct {
	kubernetes.Interface
	fake    *k8stesting.Fake
	tracker k8stesting.ObjectTracker
}

// NewKube returns a fake API server holding the test [Node] and objs.
func NewKube(t testing.TB, objs ...runtime.Object) *Kube {
	t.Helper()
	tracker := k8stesting.NewObjectTracker(scheme.Scheme, serializer.NewCodecFactory(scheme.Scheme).UniversalDecoder())
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: Node, UID: "node-uid-1"}}
	for _, o := range append([]runtime.Object{node}, objs...) {
		if err := tracker.Add(o); err != nil {
			t.Fatal(err)
		}
	}
	f := &k8stesting.Fake{}
	f.AddReactor("*", "*", k8stesting.ObjectReaction(tracker))
	f.AddWatchReactor("*", func(action k8stesting.Action) (bool, watch.Interface, error) {
		var opts metav1.ListOptions
		if w, ok := action.(k8stesting.WatchActionImpl); ok {
			opts = w.ListOptions
		}
		w, err := tracker.Watch(action.GetResource(), action.GetNamespace(), opts)
		if err != nil {
			return false, nil, err
		}
		return true, w, nil
	})
	return &Kube{fake: f, tracker: tracker}
}

// CoreV1 implements kubernetes.Interface.
func (k *Kube) CoreV1() typedcorev1.CoreV1Interface { return &fakecorev1.FakeCoreV1{Fake: k.fake} }

// ResourceV1 implements kubernetes.Interface.
func (k *Kube) ResourceV1() typedresourcev1.ResourceV1Interface {
	return &fakeresourcev1.FakeResourceV1{Fake: k.fake}
}

// ResourceV1beta1 implements kubernetes.Interface.
func (k *Kube) ResourceV1beta1() typedresourcev1beta1.ResourceV1beta1Interface {
	return &fakeresourcev1beta1.FakeResourceV1beta1{Fake: k.fake}
}

// ResourceV1beta2 implements kubernetes.Interface.
func (k *Kube) ResourceV1beta2() typedresourcev1beta2.ResourceV1beta2Interface {
	return &fakeresourcev1beta2.FakeResourceV1beta2{Fake: k.fake}
}

// IsWatchListSemanticsUnSupported tells client-go's reflector that the tracker cannot
// stream a list through a watch (as the fake clientset does).
func (k *Kube) IsWatchListSemanticsUnSupported() bool { return true }

// Pod is a consumer a claim is reserved for.
type Pod struct {
	Name string
	UID  types.UID
}

// Alloc is one allocated device of a claim; Pool "" is [Node].
type Alloc struct {
	Request, Pool, Device string
}

// NewClaim is an allocated ResourceClaim of [Namespace] reserved for pods, as the
// scheduler leaves it.
func NewClaim(name string, uid types.UID, pods []Pod, devs []Alloc, configs ...resourceapi.DeviceAllocationConfiguration) *resourceapi.ResourceClaim {
	c := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: Namespace, Name: name, UID: uid},
		Status: resourceapi.ResourceClaimStatus{
			Allocation: &resourceapi.AllocationResult{Devices: resourceapi.DeviceAllocationResult{Config: configs}},
		},
	}
	for _, d := range devs {
		pool := d.Pool
		if pool == "" {
			pool = Node
		}
		c.Status.Allocation.Devices.Results = append(c.Status.Allocation.Devices.Results, resourceapi.DeviceRequestAllocationResult{
			Request: d.Request, Driver: Driver, Pool: pool, Device: d.Device,
		})
	}
	for _, p := range pods {
		c.Status.ReservedFor = append(c.Status.ReservedFor, resourceapi.ResourceClaimConsumerReference{Resource: "pods", Name: p.Name, UID: p.UID})
	}
	return c
}

// CreateClaim stores a claim in the fake API server.
func CreateClaim(t testing.TB, kube kubernetes.Interface, c *resourceapi.ResourceClaim) *resourceapi.ResourceClaim {
	t.Helper()
	got, err := kube.ResourceV1().ResourceClaims(c.Namespace).Create(context.Background(), c, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// Opaque is the driver's opaque configuration of a claim, from src, for requests (all if
// none).
func Opaque(src resourceapi.AllocationConfigSource, params string, requests ...string) resourceapi.DeviceAllocationConfiguration {
	return resourceapi.DeviceAllocationConfiguration{
		Source: src, Requests: requests,
		DeviceConfiguration: resourceapi.DeviceConfiguration{Opaque: &resourceapi.OpaqueDeviceConfiguration{
			Driver: Driver, Parameters: runtime.RawExtension{Raw: []byte(params)},
		}},
	}
}

// Kubelet plays the kubelet: it registers the plugin through its registration socket
// and calls its DRA gRPC service.
type Kubelet struct {
	t    testing.TB
	Info *registerapi.PluginInfo
	DRA  drapbv1.DRAPluginClient
	// Health is the plugin's DRAResourceHealth service on the same endpoint, which the
	// kubelet watches (NodeWatchResources) when the plugin advertises it.
	Health drahealthv1.DRAResourceHealthClient
}

// RegisterPlugin does what the kubelet's plugin watcher does with the plugin's socket in
// its registry directory: GetInfo, connect to the endpoint it names,
// NotifyRegistrationStatus.
func RegisterPlugin(t testing.TB, registry string) *Kubelet {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reg := registerapi.NewRegistrationClient(dialUnix(t, filepath.Join(registry, Driver+"-reg.sock")))
	info, err := reg.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("registration GetInfo: %v", err)
	}
	conn := dialUnix(t, info.GetEndpoint())
	k := &Kubelet{t: t, Info: info, DRA: drapbv1.NewDRAPluginClient(conn), Health: drahealthv1.NewDRAResourceHealthClient(conn)}
	if _, err := reg.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("registration NotifyRegistrationStatus: %v", err)
	}
	return k
}

func dialUnix(t testing.TB, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// ClaimRef is how the kubelet names a claim to the plugin.
func ClaimRef(c *resourceapi.ResourceClaim) *drapbv1.Claim {
	return &drapbv1.Claim{Namespace: c.Namespace, Name: c.Name, Uid: string(c.UID)}
}

// Prepare calls NodePrepareResources for one claim and returns its result.
func (k *Kubelet) Prepare(c *resourceapi.ResourceClaim) *drapbv1.NodePrepareResourceResponse {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := k.DRA.NodePrepareResources(ctx, &drapbv1.NodePrepareResourcesRequest{Claims: []*drapbv1.Claim{ClaimRef(c)}})
	if err != nil {
		k.t.Fatalf("NodePrepareResources: %v", err)
	}
	r, ok := resp.GetClaims()[string(c.UID)]
	if !ok || len(resp.GetClaims()) != 1 {
		k.t.Fatalf("NodePrepareResources answered for %v, want claim %s alone", resp.GetClaims(), c.UID)
	}
	return r
}

// Unprepare calls NodeUnprepareResources for one claim and returns its error string.
func (k *Kubelet) Unprepare(c *resourceapi.ResourceClaim) string {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := k.DRA.NodeUnprepareResources(ctx, &drapbv1.NodeUnprepareResourcesRequest{Claims: []*drapbv1.Claim{ClaimRef(c)}})
	if err != nil {
		k.t.Fatalf("NodeUnprepareResources: %v", err)
	}
	r, ok := resp.GetClaims()[string(c.UID)]
	if !ok || len(resp.GetClaims()) != 1 {
		k.t.Fatalf("NodeUnprepareResources answered for %v, want claim %s alone", resp.GetClaims(), c.UID)
	}
	return r.GetError()
}

// Published returns the devices of the driver's ResourceSlices, in slice order; why is
// not "" if a slice is not the test node's.
func Published(t testing.TB, kube kubernetes.Interface) (devs []resourceapi.Device, why string) {
	t.Helper()
	list, err := kube.ResourceV1().ResourceSlices().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	items := list.Items
	slices.SortFunc(items, func(a, b resourceapi.ResourceSlice) int { return strings.Compare(a.Name, b.Name) })
	for _, s := range items {
		if s.Spec.Driver != Driver || s.Spec.Pool.Name != Node || ptr.Deref(s.Spec.NodeName, "") != Node {
			return nil, fmt.Sprintf("slice %s: driver %q pool %q node %v", s.Name, s.Spec.Driver, s.Spec.Pool.Name, s.Spec.NodeName)
		}
		devs = append(devs, s.Spec.Devices...)
	}
	return devs, ""
}

// WaitDevices waits until the published device names are want, and returns them.
func WaitDevices(t testing.TB, kube kubernetes.Interface, want ...string) []resourceapi.Device {
	t.Helper()
	var devs []resourceapi.Device
	WaitFor(t, "published devices "+strings.Join(want, " "), func() string {
		var why string
		if devs, why = Published(t, kube); why != "" {
			return why
		}
		var names []string
		for _, d := range devs {
			names = append(names, d.Name)
		}
		if !slices.Equal(names, want) {
			return fmt.Sprintf("published %v", names)
		}
		return ""
	})
	return devs
}

// WaitFor polls cond every 5 ms until it returns "" (met) or 20 s pass; then it fails
// with cond's last answer.
func WaitFor(t testing.TB, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		why := cond()
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still not after 20s: %s", what, why)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ClaimLeases lists the live leases labelled with a claim's uid (c must be an admin's).
func ClaimLeases(t testing.TB, c *client.Client, uid types.UID) []*brokerv1.Lease {
	t.Helper()
	resp, err := c.API().ListLeases(context.Background(), &brokerv1.ListLeasesRequest{LiveOnly: true, Labels: map[string]string{ClaimUIDLabel: string(uid)}})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetLeases()
}

// DialBroker is a client of the daemon, closed when the test ends.
func DialBroker(t testing.TB, control string) *client.Client {
	t.Helper()
	c, err := client.Dial(control)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// EnvOf turns an environment list into a map.
func EnvOf(env []string) map[string]string {
	m := map[string]string{}
	for _, e := range env {
		k, v, _ := strings.Cut(e, "=")
		m[k] = v
	}
	return m
}
