package devwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
	"github.com/mmiobroker/mmiobroker/internal/uevent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	bdfA = "0000:00:03.0"
	bdfB = "0000:00:04.0"
)

// events is a Source fed by the test; after the queue it blocks until ctx ends.
type events struct{ q []any }

func (e *events) Next(ctx context.Context) (uevent.Event, error) {
	if len(e.q) == 0 {
		<-ctx.Done()
		return uevent.Event{}, ctx.Err()
	}
	v := e.q[0]
	e.q = e.q[1:]
	if err, ok := v.(error); ok {
		return uevent.Event{}, err
	}
	return v.(uevent.Event), nil
}

func pciEvent(action, bdf, driver string) uevent.Event {
	return uevent.Event{Action: action, Subsystem: "pci", PCISlotName: bdf, Driver: driver,
		DevPath: "/devices/pci0000:00/" + bdf}
}

type rig struct {
	b    *broker.Broker
	devs map[string]*brokertest.Device
	tree *pcitest.Tree
}

func newRig(t *testing.T) *rig {
	r := &rig{devs: map[string]*brokertest.Device{}, tree: pcitest.New(t)}
	var all []*brokertest.Device
	for i, bdf := range []string{bdfA, bdfB} {
		d := brokertest.NewDevice(bdf)
		r.devs[bdf] = d
		all = append(all, d)
		r.tree.AddDevice(t, pcitest.DeviceSpec{Address: pci.MustParseAddress(bdf), Vendor: 0x1234, DeviceID: 0x11e8,
			Driver: pci.VFIODriver, IOMMUGroup: i + 1})
	}
	b, err := broker.New(broker.Config{Devices: []broker.DeviceConfig{{BDF: bdfA, UIDs: []uint32{1000}}, {BDF: bdfB, UIDs: []uint32{1000}}}},
		brokertest.Opener(all...), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	r.b = b
	return r
}

func (r *rig) lease(t *testing.T, bdf string) broker.Lease {
	t.Helper()
	l, _, err := r.b.Allocate(broker.AllocateRequest{BDF: bdf, BAR: 0, Ranges: []broker.Range{{Length: 4096}},
		Holder: broker.Holder{UID: 1000, PID: 1, Proc: &brokertest.Process{Pid: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

var discard = slog.New(slog.DiscardHandler)

func (r *rig) apply(t *testing.T, q ...any) error {
	t.Helper()
	src := &events{q: q}
	w := &Watcher{Source: src, Broker: r.b, Sysfs: r.tree.Sysfs()}
	for len(src.q) > 0 {
		ev, err := src.Next(context.Background())
		switch {
		case errors.Is(err, uevent.ErrOverflow):
			w.Resync(discard)
		case err != nil:
			return err
		default:
			w.Apply(ev, discard)
		}
	}
	return nil
}

func state(t *testing.T, b *broker.Broker, id string) broker.Lease {
	t.Helper()
	l, err := b.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func usable(t *testing.T, b *broker.Broker, bdf string) bool {
	t.Helper()
	st, err := b.Device(bdf)
	if err != nil {
		t.Fatal(err)
	}
	return st.Err == nil
}

func TestUnbindAndRebind(t *testing.T) {
	r := newRig(t)
	la, lb := r.lease(t, bdfA), r.lease(t, bdfB)
	r.tree.Rebind(t, pci.MustParseAddress(bdfA), "")
	if err := r.apply(t,
		pciEvent("unbind", bdfA, ""),
		uevent.Event{Action: "unbind", Subsystem: "usb", DevPath: "/devices/usb1"}, // ignored
		pciEvent("unbind", "0000:00:1f.0", ""),                                     // not configured
	); err != nil {
		t.Fatal(err)
	}
	if l := state(t, r.b, la.ID); l.Live() || l.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("lease of the unbound device: %+v", l)
	}
	if l := state(t, r.b, lb.ID); !l.Live() {
		t.Fatalf("lease of the other device ended: %+v", l)
	}
	if usable(t, r.b, bdfA) {
		t.Fatal("unbound device still usable")
	}
	// bound elsewhere: stays unusable; bound to vfio-pci again: usable
	r.tree.Rebind(t, pci.MustParseAddress(bdfA), "edu")
	if err := r.apply(t, pciEvent("bind", bdfA, "edu")); err != nil {
		t.Fatal(err)
	}
	if usable(t, r.b, bdfA) {
		t.Fatal("device bound to another driver is usable")
	}
	r.tree.Rebind(t, pci.MustParseAddress(bdfA), pci.VFIODriver)
	if err := r.apply(t, pciEvent("bind", bdfA, "vfio-pci")); err != nil {
		t.Fatal(err)
	}
	if !usable(t, r.b, bdfA) {
		t.Fatal("device rebound to vfio-pci is not usable")
	}
	r.lease(t, bdfA)
}

func TestRemove(t *testing.T) {
	r := newRig(t)
	la := r.lease(t, bdfA)
	ev := pciEvent("remove", "", "")
	ev.DevPath = "/devices/pci0000:00/" + bdfA // no PCI_SLOT_NAME: the path names it
	if err := r.apply(t, ev); err != nil {
		t.Fatal(err)
	}
	if l := state(t, r.b, la.ID); l.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("lease of the removed device: %+v", l)
	}
}

func TestResyncAfterOverflow(t *testing.T) {
	r := newRig(t)
	lb := r.lease(t, bdfB)
	// A was lost earlier and came back meanwhile; B was unbound while events were lost.
	if err := r.b.DeviceLost(bdfA, errors.New("test")); err != nil {
		t.Fatal(err)
	}
	if err := r.tree.Sysfs().RestoreDriver(pci.MustParseAddress(bdfB), ""); err != nil {
		t.Fatal(err)
	}
	if err := r.apply(t, fmt.Errorf("recv: %w", uevent.ErrOverflow)); err != nil {
		t.Fatal(err)
	}
	if !usable(t, r.b, bdfA) {
		t.Fatal("device A bound to vfio-pci not made available by the resync")
	}
	if usable(t, r.b, bdfB) || state(t, r.b, lb.ID).EndReason != broker.ReasonDeviceLost {
		t.Fatal("device B, unbound while events were lost, still usable")
	}
}

func TestRunStopsAndReportsSourceErrors(t *testing.T) {
	r := newRig(t)
	la := r.lease(t, bdfA)
	w := &Watcher{Source: &events{q: []any{
		fmt.Errorf("bad: %w", uevent.ErrMalformed),
		pciEvent("unbind", bdfA, ""),
		errors.New("socket closed"),
	}}, Broker: r.b, Sysfs: r.tree.Sysfs()}
	if err := w.Run(context.Background()); err == nil || err.Error() != "device events: socket closed" {
		t.Fatalf("Run = %v, want the source's error", err)
	}
	if l := state(t, r.b, la.ID); l.Live() {
		t.Fatal("the unbind before the error was not applied")
	}
	// A cancelled Run returns nil.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	w.Source = &events{}
	if err := w.Run(ctx); err != nil {
		t.Fatalf("cancelled Run = %v, want nil", err)
	}
}

// cause returns why bdf is unusable, "" if it is usable.
func cause(t *testing.T, b *broker.Broker, bdf string) string {
	t.Helper()
	st, err := b.Device(bdf)
	if err != nil {
		t.Fatal(err)
	}
	if st.Err == nil {
		return ""
	}
	return st.Err.Error()
}

const wantNotVFIO = "device bound to e1000e, not a VFIO driver (vfio-pci or a vfio variant)"

// A device rebound from vfio-pci to a variant driver (vfio_pci_core-based, with its
// vfio-dev entry) is leasable again; one rebound to a driver outside VFIO is lost.
func TestRebindToVariantDriver(t *testing.T) {
	r := newRig(t)
	r.tree.AddVFIODriver(t, "mlx5_vfio_pci")
	r.tree.AddVFIODriver(t, "acme_passthru") // a variant only its vfio-dev entry reveals
	a := pci.MustParseAddress(bdfA)
	la := r.lease(t, bdfA)

	r.tree.Rebind(t, a, "")
	r.tree.Rebind(t, a, "mlx5_vfio_pci")
	if err := r.apply(t, pciEvent("unbind", bdfA, ""), pciEvent("bind", bdfA, "mlx5_vfio_pci")); err != nil {
		t.Fatal(err)
	}
	if l := state(t, r.b, la.ID); l.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("lease across the unbind: %+v", l)
	}
	if c := cause(t, r.b, bdfA); c != "" {
		t.Fatalf("device bound to mlx5_vfio_pci is not usable: %s", c)
	}
	lv := r.lease(t, bdfA)

	r.tree.Rebind(t, a, "acme_passthru")
	if err := r.apply(t, pciEvent("bind", bdfA, "acme_passthru")); err != nil {
		t.Fatal(err)
	}
	if c := cause(t, r.b, bdfA); c != "" {
		t.Fatalf("device bound to a variant named acme_passthru is not usable: %s", c)
	}
	if l := state(t, r.b, lv.ID); !l.Live() {
		t.Fatalf("a bind between VFIO drivers ended a lease: %+v", l)
	}

	r.tree.Rebind(t, a, "e1000e")
	if err := r.apply(t, pciEvent("bind", bdfA, "e1000e")); err != nil {
		t.Fatal(err)
	}
	if l := state(t, r.b, lv.ID); l.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("lease of the device bound to e1000e: %+v", l)
	}
	if c := cause(t, r.b, bdfA); !strings.Contains(c, wantNotVFIO) {
		t.Fatalf("device bound to e1000e: cause %q, want it to contain %q", c, wantNotVFIO)
	}
}

// A resync keeps a device that is bound to a variant driver from the start, and loses one
// that moved to a driver outside VFIO while events were lost.
func TestResyncVariantDriver(t *testing.T) {
	r := newRig(t)
	r.tree.AddVFIODriver(t, "mlx5_vfio_pci")
	a, b := pci.MustParseAddress(bdfA), pci.MustParseAddress(bdfB)
	r.tree.Rebind(t, a, "mlx5_vfio_pci")
	r.tree.Rebind(t, b, "mlx5_vfio_pci")
	la, lb := r.lease(t, bdfA), r.lease(t, bdfB)
	if err := r.apply(t, fmt.Errorf("recv: %w", uevent.ErrOverflow)); err != nil {
		t.Fatal(err)
	}
	for _, l := range []broker.Lease{la, lb} {
		if s := state(t, r.b, l.ID); !s.Live() {
			t.Fatalf("resync ended a lease on a device bound to mlx5_vfio_pci: %+v", s)
		}
	}

	r.tree.Rebind(t, b, "e1000e")
	if err := r.apply(t, fmt.Errorf("recv: %w", uevent.ErrOverflow)); err != nil {
		t.Fatal(err)
	}
	if s := state(t, r.b, la.ID); !s.Live() {
		t.Fatalf("resync ended the lease of device A, still on mlx5_vfio_pci: %+v", s)
	}
	if s := state(t, r.b, lb.ID); s.EndReason != broker.ReasonDeviceLost {
		t.Fatalf("lease of device B, moved to e1000e: %+v", s)
	}
	if c := cause(t, r.b, bdfB); !strings.Contains(c, wantNotVFIO) {
		t.Fatalf("device B: cause %q, want it to contain %q", c, wantNotVFIO)
	}
}

// tsmBroker records TSMChanged calls.
type tsmBroker struct {
	Broker
	checked []string
}

func (b *tsmBroker) TSMChanged(bdf string) (int, error) {
	b.checked = append(b.checked, bdf)
	return 0, nil
}

// TestChangeChecksTSM: a change uevent of a configured device, and every resync, has the
// broker check the device's TSM state (private leases need it bound).
func TestChangeChecksTSM(t *testing.T) {
	r := newRig(t)
	b := &tsmBroker{Broker: r.b}
	w := &Watcher{Broker: b, Sysfs: r.tree.Sysfs()}
	w.Apply(pciEvent("change", bdfA, ""), discard)
	w.Apply(pciEvent("change", "0000:00:1f.0", ""), discard) // not configured
	if !slices.Equal(b.checked, []string{bdfA}) {
		t.Fatalf("checked after change events: %v, want [%s]", b.checked, bdfA)
	}
	b.checked = nil
	w.Resync(discard)
	slices.Sort(b.checked)
	if !slices.Equal(b.checked, []string{bdfA, bdfB}) {
		t.Errorf("checked at resync: %v, want both devices", b.checked)
	}
}
