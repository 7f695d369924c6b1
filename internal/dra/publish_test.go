package dra

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// fakeSysfs is a directory laid out as /sys is for the PCI devices given: a
// bus/pci/devices/<bdf> link into devices/<root>/0000:00:01.0/<bdf>, with numa_node.
func fakeSysfs(t *testing.T, devs map[string]struct {
	root string
	numa int
}) string {
	dir := t.TempDir()
	for bdf, d := range devs {
		real := filepath.Join(dir, "devices", d.root, "0000:00:01.0", bdf)
		if err := os.MkdirAll(real, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(real, "numa_node"), fmt.Appendf(nil, "%d\n", d.numa), 0o644); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(dir, "bus", "pci", "devices", bdf)
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join("..", "..", "..", "devices", d.root, "0000:00:01.0", bdf), link); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// publishEnv is a daemon on devices A and B and a plugin publishing them.
type publishEnv struct {
	devA, devB *brokertest.Device
	daemon     *daemontest.Daemon
	kube       kubernetes.Interface
	plugin     *plugin
	health     *healthWatch
}

func newPublishEnv(t *testing.T, resync time.Duration) *publishEnv {
	e := &publishEnv{devA: brokertest.NewDevice(bdfA), devB: brokertest.NewDevice(bdfB)}
	e.daemon = daemontest.Start(t, kubeletDevices, e.devA, e.devB)
	sysfs := fakeSysfs(t, map[string]struct {
		root string
		numa int
	}{bdfA: {"pci0000:00", 1}, bdfB: {"pci0000:40", -1}})
	cdi, plugins, registry := pluginDirs(t, testutil.ShortTempDir(t))
	e.kube = dratest.NewKube(t)
	e.plugin = startPlugin(t, Options{
		Kube: e.kube, ControlSocket: e.daemon.Control, CDIDir: cdi, PluginDataDir: plugins, RegistrarDir: registry,
		Partitions: []Partition{{BDF: bdfB, BAR: 4, Count: 4}},
		Resync:     resync, HealthCheckTimeout: max(2*resync, DefaultHealthCheckTimeout), SysFS: os.DirFS(sysfs),
	})
	e.health = watchHealth(t, e.plugin.drv)
	return e
}

// healthWatch collects the plugin's health reports, as the kubelet's health stream does.
type healthWatch struct {
	mu     sync.Mutex
	latest map[string]kubeletplugin.DeviceHealth
}

func watchHealth(t *testing.T, d *Driver) *healthWatch {
	h := &healthWatch{latest: map[string]kubeletplugin.DeviceHealth{}}
	ctx, cancel := context.WithCancel(context.Background())
	reports := make(chan kubeletplugin.DeviceHealthReport)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer close(reports)
		if err := d.WatchHealthStatus(ctx, reports); err != nil {
			t.Errorf("WatchHealthStatus: %v", err)
		}
	}()
	go func() {
		defer wg.Done()
		for r := range reports {
			h.mu.Lock()
			for _, dh := range r.Devices {
				h.latest[dh.DeviceName] = dh
			}
			h.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	return h
}

// wait waits until every device named has the health given, with a message containing
// msg.
func (h *healthWatch) wait(t *testing.T, status kubeletplugin.HealthStatus, msg string, names ...string) {
	t.Helper()
	dratest.WaitFor(t, fmt.Sprintf("health %s (%q) of %v", status, msg, names), func() string {
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, n := range names {
			dh, ok := h.latest[n]
			if !ok || dh.Health != status || !strings.Contains(dh.Message, msg) || dh.PoolName != dratest.Node ||
				dh.HealthCheckTimeout <= 0 || dh.LastUpdated.IsZero() {
				return fmt.Sprintf("%s: %+v", n, dh)
			}
		}
		return ""
	})
}

var (
	namesA = []string{"0000-3b-00-0-bar0", "0000-3b-00-0-bar4"}
	namesB = []string{"0000-3c-00-0-bar4-p0of4", "0000-3c-00-0-bar4-p1of4", "0000-3c-00-0-bar4-p2of4", "0000-3c-00-0-bar4-p3of4"}
)

// TestPublishDeviceLost: what the plugin publishes for the daemon's devices (against the
// fake API server), and how a device loss — reported by the daemon's event stream, the
// periodic list being an hour away — withdraws its devices and makes them Unhealthy.
func TestPublishDeviceLost(t *testing.T) {
	e := newPublishEnv(t, time.Hour)
	devs := dratest.WaitDevices(t, e.kube, append(slices.Clone(namesA), namesB...)...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", append(slices.Clone(namesA), namesB...)...)

	str := func(s string) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{StringValue: &s} }
	num := func(i int64) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{IntValue: &i} }
	yes := func(b bool) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{BoolValue: &b} }
	wantA4 := resourceapi.Device{
		Name: "0000-3b-00-0-bar4",
		Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
			"resource.kubernetes.io/pciBusID": str(bdfA), "resource.kubernetes.io/pcieRoot": str("pci0000:00"),
			"resource.kubernetes.io/numaNode": num(1),
			AttrVendorID:                      num(0x1234), AttrDeviceID: num(0x11e8), AttrClassCode: num(0x00ff00),
			AttrIOMMUGroup: num(3), AttrAccessMode: str("group"),
			AttrBAR: num(4), AttrBARSize: num(16 << 20), AttrOffset: num(0), AttrPartition: num(0), AttrPartitions: num(1),
			AttrPrefetchable: yes(true), AttrAddr64: yes(true),
			AttrLeaseKindShared: yes(true), AttrLeaseKindPrivate: yes(false), AttrUnattestedPrivate: yes(false),
			AttrTSMPresent: yes(false), AttrTSMConnected: yes(false), AttrTSMBound: yes(false),
		},
		Capacity: map[resourceapi.QualifiedName]resourceapi.DeviceCapacity{CapSize: {Value: resource.MustParse("16Mi")}},
	}
	if diff := cmp.Diff(wantA4, devs[1]); diff != "" {
		t.Errorf("device A BAR 4 (-want +got):\n%s", diff)
	}
	b2 := devs[4] // 0000:3c:00.0 BAR 4, third quarter: no NUMA node (numa_node -1)
	if _, ok := b2.Attributes["resource.kubernetes.io/numaNode"]; ok {
		t.Errorf("device %s has a numaNode although sysfs says -1", b2.Name)
	}
	for name, want := range map[resourceapi.QualifiedName]int64{AttrOffset: 8 << 20, AttrPartition: 2, AttrPartitions: 4, AttrBAR: 4} {
		if got := b2.Attributes[name].IntValue; got == nil || *got != want {
			t.Errorf("device %s %s = %v, want %d", b2.Name, name, got, want)
		}
	}
	size := b2.Capacity[CapSize].Value
	if !*b2.Attributes[AttrLeaseKindPrivate].BoolValue || !*b2.Attributes[AttrUnattestedPrivate].BoolValue ||
		size.Cmp(resource.MustParse("4Mi")) != 0 {
		t.Errorf("device %s: %+v", b2.Name, b2)
	}

	// A lease on A: the loss ends it too.
	c := dratest.DialBroker(t, e.daemon.Control)
	l, err := c.Allocate(context.Background(), client.AllocateOptions{BDF: bdfA, BAR: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	if !e.devA.Notify(broker.NoticeRelease) {
		t.Fatal("device A has no notice channel")
	}
	dratest.WaitDevices(t, e.kube, namesB...)
	e.health.wait(t, kubeletplugin.HealthStatusUnhealthy, "not usable", namesA...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", namesB...)
	got, err := c.API().GetLease(context.Background(), &brokerv1.GetLeaseRequest{LeaseId: l.ID})
	if err != nil || got.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_DEVICE_LOST {
		t.Errorf("the lease on the lost device: %v, %v", got.GetLease(), err)
	}
}

// TestPublishDeviceEvents: with the periodic list an hour away, every device change the
// daemon reports (EVENT_TYPE_DEVICE_CHANGED) is published at once — a loss with no lease
// on the device, the device coming back, a TSM binding, an error, a suspend.
func TestPublishDeviceEvents(t *testing.T) {
	e := newPublishEnv(t, time.Hour)
	all := append(slices.Clone(namesA), namesB...)
	dratest.WaitDevices(t, e.kube, all...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", all...)

	if !e.devA.Notify(broker.NoticeRelease) { // no lease on A: only the device event tells
		t.Fatal("device A has no notice channel")
	}
	dratest.WaitDevices(t, e.kube, namesB...)
	e.health.wait(t, kubeletplugin.HealthStatusUnhealthy, "not usable", namesA...)

	if _, err := e.daemon.Broker.DeviceAvailable(bdfA); err != nil { // as internal/devwatch on a rebind
		t.Fatal(err)
	}
	dratest.WaitDevices(t, e.kube, all...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", all...)

	e.devB.SetInfo(func(i *broker.DeviceInfo) {
		i.TSM = broker.TSMState{Present: true, Connect: "tsm0", Bound: "tsm0"}
	})
	if _, err := e.daemon.Broker.TSMChanged(bdfB); err != nil { // as internal/devwatch's TSM check
		t.Fatal(err)
	}
	waitTSMBound(t, e)

	if !e.devB.Notify(broker.NoticeError) {
		t.Fatal("device B has no notice channel")
	}
	e.health.wait(t, kubeletplugin.HealthStatusUnhealthy, "raised errors", namesB...)

	c := dratest.DialBroker(t, e.daemon.Control)
	if _, err := c.API().SuspendDevice(context.Background(), &brokerv1.SuspendDeviceRequest{Bdf: bdfA}); err != nil {
		t.Fatal(err)
	}
	dratest.WaitDevices(t, e.kube, namesB...) // a suspended device takes no leases
}

// waitTSMBound waits until every device of B is published TSM-bound.
func waitTSMBound(t *testing.T, e *publishEnv) {
	t.Helper()
	dratest.WaitFor(t, "device B TSM-bound in the slice", func() string {
		devs, why := dratest.Published(t, e.kube)
		if why != "" {
			return why
		}
		for _, d := range devs {
			if strings.HasPrefix(d.Name, "0000-3c") && !(*d.Attributes[AttrTSMBound].BoolValue && *d.Attributes[AttrTSMConnected].BoolValue && *d.Attributes[AttrTSMPresent].BoolValue) {
				return d.Name + " not TSM-bound"
			}
		}
		return ""
	})
}

// TestPublishResync: changes the daemon has not noticed (its own TSM check runs every
// 10 s; a device's info is read afresh by every list) show at the next periodic list.
func TestPublishResync(t *testing.T) {
	e := newPublishEnv(t, 20*time.Millisecond)
	all := append(slices.Clone(namesA), namesB...)
	dratest.WaitDevices(t, e.kube, all...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", all...)

	e.devB.SetInfo(func(i *broker.DeviceInfo) {
		i.TSM = broker.TSMState{Present: true, Connect: "tsm0", Bound: "tsm0"}
	})
	waitTSMBound(t, e)

	// An error (AER) the device raised: still leasable, so still published, but Unhealthy.
	if !e.devB.Notify(broker.NoticeError) {
		t.Fatal("device B has no notice channel")
	}
	e.health.wait(t, kubeletplugin.HealthStatusUnhealthy, "raised errors", namesB...)
	e.health.wait(t, kubeletplugin.HealthStatusHealthy, "", namesA...)
	dratest.WaitDevices(t, e.kube, all...)

	// The daemon gone: the devices stay published, their health is unknown.
	if err := e.daemon.Stop(); err != nil {
		t.Fatal(err)
	}
	e.health.wait(t, kubeletplugin.HealthStatusUnknown, "mmiobrokerd unreachable", all...)
	dratest.WaitDevices(t, e.kube, all...)
}
