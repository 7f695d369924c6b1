package devwatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
	if err := r.apply(t, pciEvent("bind", bdfA, "edu")); err != nil {
		t.Fatal(err)
	}
	if usable(t, r.b, bdfA) {
		t.Fatal("device bound to another driver is usable")
	}
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
