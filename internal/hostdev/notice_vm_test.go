//go:build vmtest

package hostdev

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/uevent"
	"golang.org/x/sys/unix"
)

// ueventLog collects the kernel's PCI uevents for one device while a test runs.
type ueventLog struct {
	l      *uevent.Listener
	cancel context.CancelFunc
	done   chan struct{}
	events chan uevent.Event // the device's events, in order
	errs   chan error        // the listener's errors
}

func watchUevents(t *testing.T, bdf string) *ueventLog {
	t.Helper()
	l, err := uevent.Listen(uevent.Options{})
	if err != nil {
		t.Fatalf("uevent listener: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	u := &ueventLog{l: l, cancel: cancel, done: make(chan struct{}),
		events: make(chan uevent.Event, 256), errs: make(chan error, 256)}
	go func() {
		defer close(u.done)
		for {
			ev, err := l.Next(ctx)
			switch {
			case ctx.Err() != nil:
				return
			case err != nil:
				select {
				case u.errs <- err:
				default:
				}
				if !errors.Is(err, uevent.ErrMalformed) && !errors.Is(err, uevent.ErrOverflow) {
					return
				}
			case ev.PCISlotName == bdf:
				select {
				case u.events <- ev:
				default:
				}
			}
		}
	}()
	t.Cleanup(u.stop)
	return u
}

func (u *ueventLog) stop() {
	u.cancel()
	<-u.done
	u.l.Close()
}

// await consumes the device's events until one with action and driver arrives, for at
// most 5 s.
func (u *ueventLog) await(t *testing.T, action, driver string) (uevent.Event, bool) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	var seen []string
	for {
		select {
		case ev := <-u.events:
			if ev.Action == action && ev.Driver == driver {
				return ev, true
			}
			seen = append(seen, ev.Action+"/"+ev.Driver)
		case err := <-u.errs:
			t.Logf("uevent listener: %v", err)
		case <-timeout:
			t.Errorf("no %q uevent (driver %q) within 5 s; saw %v", action, driver, seen)
			return uevent.Event{}, false
		}
	}
}

func sysfsWrite(path, value string) error {
	return os.WriteFile(path, []byte(value), 0)
}

// ensureVFIO puts the device back on vfio-pci (its driver_override is still vfio-pci).
func ensureVFIO(t *testing.T, a pci.Address) {
	t.Helper()
	p, err := pci.Sysfs{}.Device(a)
	if err == nil && p.Driver == pci.VFIODriver {
		return
	}
	if err := sysfsWrite("/sys/bus/pci/drivers_probe", a.String()); err != nil {
		t.Errorf("rebinding %s to vfio-pci: %v", a, err)
	}
}

// TestK10UnbindCompletesPromptly: an unbind of a device the broker holds asks for the
// device through the REQ notifier; closing the device on that notice lets the unbind
// complete within 1 s (not the kernel's 10 s re-signal). The device then rebinds to
// vfio-pci and opens again. The kernel's uevents for the unbind and bind arrive too.
func TestK10UnbindCompletesPromptly(t *testing.T) {
	a := vmDevice(t, "MMIOBROKER_VM_EDU1")
	bdf := a.String()
	t.Cleanup(func() { ensureVFIO(t, a) })
	testutil.FDLeakCheck(t)
	uev := watchUevents(t, bdf)

	d, err := Open(a, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			d.Close()
		}
	}()
	if err := d.Notifier(NoticeRelease); err != nil {
		t.Fatalf("REQ notifier not registered: %v", err)
	}
	buf, err := d.Export(0, []broker.Range{{Offset: 0, Length: mib}}, "k10")
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()

	type result struct {
		start, end time.Time
		err        error
	}
	unbound := make(chan result, 1)
	go func() {
		r := result{start: time.Now()}
		r.err = sysfsWrite("/sys/bus/pci/drivers/vfio-pci/unbind", bdf)
		r.end = time.Now()
		unbound <- r
	}()

	var notice Notice
	select {
	case notice = <-d.Notices():
	case r := <-unbound:
		t.Fatalf("the unbind returned (%v) before any notice while the device was open", r.err)
	case <-time.After(15 * time.Second):
		t.Fatal("no notice within 15 s of the unbind")
	}
	if notice.Kind != NoticeRelease || notice.Count < 1 {
		t.Fatalf("notice %+v, want a release request", notice)
	}
	// Standing in for the broker: end the leases (the device goes with them) and close.
	closeStart := time.Now()
	if err := d.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	closed = true
	closeEnd := time.Now()
	var r result
	select {
	case r = <-unbound:
	case <-time.After(15 * time.Second):
		t.Fatal("the unbind did not complete within 15 s of Close")
	}
	if r.err != nil {
		t.Fatalf("unbind: %v", r.err)
	}
	total := r.end.Sub(r.start)
	t.Logf("unbind write -> REQ notice %v; notice -> Close called %v; Close called -> unbind complete %v (Close returned after %v); unbind write -> complete %v",
		notice.Time.Sub(r.start).Round(time.Microsecond), closeStart.Sub(notice.Time).Round(time.Microsecond),
		r.end.Sub(closeStart).Round(time.Microsecond), closeEnd.Sub(closeStart).Round(time.Microsecond),
		total.Round(time.Microsecond))
	if total >= time.Second {
		t.Errorf("the unbind took %v, want under 1 s", total)
	}
	if p, err := (pci.Sysfs{}).Device(a); err != nil || p.Driver != "" {
		t.Errorf("after the unbind: driver %q (%v), want none", p.Driver, err)
	}
	if ev, ok := uev.await(t, "unbind", ""); ok {
		t.Logf("uevent: %s@%s seq %d subsystem %s slot %s", ev.Action, ev.DevPath, ev.Seqnum, ev.Subsystem, ev.PCISlotName)
	}

	// Back to vfio-pci: driver_override still says vfio-pci, so drivers_probe binds it.
	if err := sysfsWrite("/sys/bus/pci/drivers_probe", bdf); err != nil {
		t.Fatalf("drivers_probe: %v", err)
	}
	if ev, ok := uev.await(t, "bind", pci.VFIODriver); ok {
		t.Logf("uevent: %s@%s seq %d driver %s", ev.Action, ev.DevPath, ev.Seqnum, ev.Driver)
	}
	d2, err := Open(a, Options{Log: testLog(t)})
	if err != nil {
		t.Fatalf("open after rebinding: %v", err)
	}
	if info := d2.Info(); info.Driver != pci.VFIODriver || info.DMABuf != nil {
		t.Errorf("after rebinding: %+v", info)
	}
	if err := d2.Close(); err != nil {
		t.Error(err)
	}
}

// TestVMNotifiersRegistered: hostdev registers the REQ notifier on both kernels; the AER
// notifier only where the device is PCI Express (none of the rig's devices is: edu,
// ivshmem and pci-testdev are conventional PCI), and Open works without it. Close ends
// the reader goroutines (goleak in TestMain) and closes the eventfds (fd-leak check).
func TestVMNotifiersRegistered(t *testing.T) {
	a := vmDevice(t, "MMIOBROKER_VM_EDU1")
	testutil.FDLeakCheck(t)
	d, err := Open(a, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Notifier(NoticeRelease); err != nil {
		t.Errorf("REQ notifier: %v", err)
	}
	errNotifier := d.Notifier(NoticeError)
	switch {
	case errNotifier == nil:
		t.Log("AER notifier registered")
	case errors.Is(errNotifier, errdefs.ErrNotSupported) && strings.Contains(errNotifier.Error(), "PCI Express"):
		t.Logf("AER notifier: %v", errNotifier)
	default:
		t.Errorf("AER notifier: %v", errNotifier)
	}
	// A revoke cycles the device fd; the REQ notifier is registered again.
	if err := d.Revoke(); err != nil {
		t.Fatal(err)
	}
	if err := d.Notifier(NoticeRelease); err != nil {
		t.Errorf("REQ notifier after Revoke: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-d.Notices(); ok {
		t.Error("Notices open after Close")
	}
}

// TestVMErrorNotifierOnPCIe: on a PCI Express endpoint (the rig's e1000e) both notifiers
// are registered — the AER error notifier too — and stay registered across a revoke.
func TestVMErrorNotifierOnPCIe(t *testing.T) {
	a := vmDevice(t, "MMIOBROKER_VM_PCIE")
	testutil.FDLeakCheck(t)
	d, err := Open(a, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, k := range []NoticeKind{NoticeRelease, NoticeError} {
		if err := d.Notifier(k); err != nil {
			t.Errorf("%v notifier on PCIe device %s: %v", k, a, err)
		}
	}
	if err := d.Revoke(); err != nil {
		t.Fatal(err)
	}
	for _, k := range []NoticeKind{NoticeRelease, NoticeError} {
		if err := d.Notifier(k); err != nil {
			t.Errorf("%v notifier after Revoke: %v", k, err)
		}
	}
}

// TestVMRevokeBuffersUnsupported: Linux 7.2 has no per-buffer revoke; RevokeBuffers says
// so (ErrNotSupported) and leaves the buffer alone, so the caller falls back to Revoke.
func TestVMRevokeBuffersUnsupported(t *testing.T) {
	a := vmDevice(t, "MMIOBROKER_VM_EDU1")
	testutil.FDLeakCheck(t)
	d, err := Open(a, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf, err := d.Export(0, []broker.Range{{Offset: 0, Length: mib}}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	err = d.RevokeBuffers(buf)
	if !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("RevokeBuffers = %v, want ErrNotSupported (ENOTTY)", err)
	}
	t.Log(err)
}
