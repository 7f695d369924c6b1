package dra

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"maps"
	"slices"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// inventory is what one device list turns into.
type inventory struct {
	// devices are published, in the daemon's device order.
	devices []resourceapi.Device
	// health has every device of every leasable BAR, published or not.
	health map[string]kubeletplugin.HealthStatus
	// why says why a device is unhealthy.
	why map[string]string
	// err collects BARs that could not be published.
	err error
}

// buildInventory turns the daemon's devices into ResourceSlice devices and their health.
// A device is published while new leases of it can be granted (usable, exporting
// dma-bufs, not suspended); it is healthy when, besides, it has raised no error since
// the daemon opened it.
func buildInventory(list []*brokerv1.Device, parts []Partition, sysfs fs.FS) inventory {
	inv := inventory{health: map[string]kubeletplugin.HealthStatus{}, why: map[string]string{}}
	var errs []error
	for _, d := range list {
		ts, err := targets(d, parts)
		if err != nil {
			errs = append(errs, err)
		}
		ok, why := leasable(d)
		for _, t := range ts {
			switch {
			case !ok:
				inv.health[t.Name] = kubeletplugin.HealthStatusUnhealthy
				inv.why[t.Name] = "device " + d.GetBdf() + " " + why
			case d.GetErrorCount() > 0:
				inv.health[t.Name] = kubeletplugin.HealthStatusUnhealthy
				inv.why[t.Name] = "device " + d.GetBdf() + " raised errors (AER) since it was opened"
			default:
				inv.health[t.Name] = kubeletplugin.HealthStatusHealthy
			}
			if ok {
				inv.devices = append(inv.devices, resourceDevice(d, t, sysfs))
			}
		}
	}
	inv.err = errors.Join(errs...)
	return inv
}

// resources is the driver's one pool (named after the node), in slices of at most
// [maxDevicesPerSlice] devices; an empty pool still has one empty slice.
func resources(pool string, devices []resourceapi.Device) resourceslice.DriverResources {
	p := resourceslice.Pool{}
	for chunk := range slices.Chunk(devices, maxDevicesPerSlice) {
		p.Slices = append(p.Slices, resourceslice.Slice{Devices: chunk})
	}
	if len(p.Slices) == 0 {
		p.Slices = []resourceslice.Slice{{}}
	}
	return resourceslice.DriverResources{Pools: map[string]resourceslice.Pool{pool: p}}
}

// publishLoop lists the daemon's devices now, every Resync, and whenever the daemon says a
// device changed (EVENT_TYPE_DEVICE_CHANGED: lost, opened again, suspended, resumed, a
// TSM state change, a first error), and publishes what changed.
func (d *Driver) publishLoop(ctx context.Context) {
	trigger := make(chan struct{}, 1)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.watchEvents(ctx, trigger)
	}()
	tick := time.NewTicker(d.opt.Resync)
	defer tick.Stop()
	for {
		d.sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-trigger:
		}
	}
}

// deviceEvent reports whether an event means that a device changed: DEVICE_CHANGED, and
// the lease events that come with a device change (a daemon from before DEVICE_CHANGED
// sends only those, and only for devices with leases).
func deviceEvent(e *brokerv1.Event) bool {
	switch e.GetType() {
	case brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED, brokerv1.EventType_EVENT_TYPE_DEVICE_LOST,
		brokerv1.EventType_EVENT_TYPE_SUSPENDED, brokerv1.EventType_EVENT_TYPE_RESUMED:
		return true
	}
	return e.GetLease().GetEndReason() == brokerv1.EndReason_END_REASON_TSM_UNBOUND
}

// watchEvents follows the daemon's device events and pokes trigger on each, and each time
// the daemon has (re)subscribed the stream, since a change may have come between the last
// list and the subscription. (The stream also carries the lease events the plugin, an
// admin, may see; most change no device.)
func (d *Driver) watchEvents(ctx context.Context, trigger chan<- struct{}) {
	poke := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	subscribed := client.WithSubscribed(func(uint64) { poke() })
	for ctx.Err() == nil {
		for e, err := range d.broker.Watch(ctx, 0, client.WithDeviceEvents(), subscribed) {
			if err != nil {
				d.log.Warn("event stream of mmiobrokerd ended", "err", err)
				break
			}
			if deviceEvent(e) {
				d.log.Info("device event", "event", e.GetType().String(), "bdf", e.GetBdf(), "by", e.GetCausedBy())
				poke()
			}
		}
		poke() // the stream ended: is the daemon still there? (health Unknown if not)
		t := time.NewTimer(watchRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// sync lists the devices, publishes them if they changed and updates their health.
func (d *Driver) sync(ctx context.Context) {
	cctx, cancel := callCtx(ctx)
	resp, err := d.broker.API().ListDevices(cctx, &brokerv1.ListDevicesRequest{})
	cancel()
	now := time.Now()
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("list devices of mmiobrokerd", "err", err)
		// The published devices stay: a restarting daemon keeps its leases and devices.
		// Their health is unknown until it answers again.
		d.mu.Lock()
		for name, h := range d.health {
			h.Health, h.Message, h.LastUpdated = kubeletplugin.HealthStatusUnknown, "mmiobrokerd unreachable: "+err.Error(), now
			d.health[name] = h
		}
		d.notifyLocked()
		d.mu.Unlock()
		return
	}
	inv := buildInventory(resp.GetDevices(), d.opt.Partitions, d.opt.SysFS)
	fp, err := json.Marshal(inv.devices)
	if err != nil {
		d.log.Error("encode devices", "err", err)
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.synced || string(fp) != d.published {
		if inv.err != nil {
			d.log.Error("partitions", "err", inv.err)
		}
		if err := d.helper.PublishResources(ctx, resources(d.opt.NodeName, inv.devices)); err != nil {
			d.log.Error("publish ResourceSlices", "err", err)
			return
		}
		d.log.Info("published devices", "devices", len(inv.devices))
		d.synced, d.published = true, string(fp)
	}
	for name, status := range inv.health {
		d.health[name] = kubeletplugin.DeviceHealth{
			PoolName: d.opt.NodeName, DeviceName: name, Health: status, Message: inv.why[name],
			LastUpdated: now, HealthCheckTimeout: d.opt.HealthCheckTimeout,
		}
	}
	for name := range d.health {
		if _, ok := inv.health[name]; !ok {
			delete(d.health, name) // no longer configured: the kubelet lets it go stale
		}
	}
	// Every sync refreshes the report (the kubelet treats a report older than
	// HealthCheckTimeout as unknown), so a change is reported at once too.
	d.notifyLocked()
}

// notifyLocked wakes the health streams. Called with d.mu held.
func (d *Driver) notifyLocked() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// healthReport is a snapshot of every known device's health, by name.
func (d *Driver) healthReport() (kubeletplugin.DeviceHealthReport, <-chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var r kubeletplugin.DeviceHealthReport
	for _, name := range slices.Sorted(maps.Keys(d.health)) {
		r.Devices = append(r.Devices, d.health[name])
	}
	return r, d.changed
}

// WatchHealthStatus implements [kubeletplugin.DRAPlugin]: a report of every device the
// daemon lists (published or not) after every device list — every Resync and on device
// events — so that the kubelet's HealthCheckTimeout never runs out while the plugin
// works. Lost, failed, suspended devices and those that cannot export dma-bufs are
// Unhealthy, so are devices that raised errors (AER) since the daemon opened them; while
// the daemon does not answer every device is Unknown.
func (d *Driver) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	for {
		r, changed := d.healthReport()
		if len(r.Devices) > 0 {
			select {
			case <-ctx.Done():
				return nil
			case reports <- r:
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-d.ctx.Done():
			return nil
		case <-changed:
		}
	}
}
