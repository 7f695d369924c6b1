package iommufd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

const bdf = "0000:00:03.0"

// The importer's tests run a real daemon on a fake device (its dma-bufs are memfds) and
// a real client hold, with the fake iommufd kernel: what the import asks of the kernel on
// each event is logged and checked.

// setup starts the daemon on a fake device and dials it, and opens a fake iommufd with one
// IOAS.
func setup(t *testing.T) (*client.Client, *FD, *fakeKernel, *IOAS) {
	t.Helper()
	testutil.FDLeakCheck(t)
	dmn := daemontest.Start(t, fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid()),
		brokertest.NewDevice(bdf))
	c, err := client.Dial(dmn.Control)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	d, k := fakeFD(t)
	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	return c, d, k, ioas
}

// allocateAndImport allocates a lease as opt says and imports it into ioas; the import is
// closed when the test ends.
func allocateAndImport(t *testing.T, ioas *IOAS, c *client.Client, opt client.AllocateOptions, iopt ImportOptions) *Import {
	t.Helper()
	im, err := ioas.AllocateAndImport(ctx(t), c, opt, iopt)
	if err != nil {
		t.Fatalf("AllocateAndImport: %v", err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}

func ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// remap is one OnRemap call.
type remap struct {
	m   Mapping
	err error
}

// recorder collects OnRemap calls and the hold's events.
type recorder struct {
	remaps chan remap
	events chan *brokerv1.Event
}

func newRecorder() *recorder {
	return &recorder{remaps: make(chan remap, 16), events: make(chan *brokerv1.Event, 64)}
}

// options returns ImportOptions that record; onEvent additionally checks, inside the
// hold's OnEvent, that the import acted on the event before the caller's callback ran.
func (r *recorder) options(mopt MapOptions, onEvent func(*brokerv1.Event)) ImportOptions {
	return ImportOptions{
		Map:     mopt,
		OnRemap: func(m Mapping, err error) { r.remaps <- remap{m, err} },
		Hold: client.HoldOptions{OnEvent: func(e *brokerv1.Event) {
			if onEvent != nil {
				onEvent(e)
			}
			r.events <- e
		}},
	}
}

func (r *recorder) remap(t *testing.T) remap {
	t.Helper()
	return receive(t, r.remaps, "OnRemap", nil)
}

func (r *recorder) event(t *testing.T, typ brokerv1.EventType) *brokerv1.Event {
	t.Helper()
	return receive(t, r.events, typ.String()+" event", func(e *brokerv1.Event) bool { return e.GetType() == typ })
}

func wait(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	receive(t, ch, what, nil)
}

// receive returns the first value from ch that ok accepts (nil: any value), or fails the
// test after 30s (a bound on failure, not a timing assertion).
func receive[T any](t *testing.T, ch <-chan T, what string, ok func(T) bool) T {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case v := <-ch:
			if ok == nil || ok(v) {
				return v
			}
		case <-timeout:
			t.Fatalf("%s: not within 30s", what)
		}
	}
}

// revokeAnother revokes another lease of the device (as the administrator the test
// process is), which reissues the device's other leases.
func revokeAnother(t *testing.T, c *client.Client) {
	t.Helper()
	other, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: page}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.File.Close()
	if _, err := c.Revoke(ctx(t), other.ID); err != nil {
		t.Fatal(err)
	}
}

// TestImportFollowsTheLease: the import maps the first fd at the fixed IOVA; after a
// reissue it unmaps the dead generation and maps the new one there; after a suspend and
// resume it maps the same fd again (iommufd never re-populates a revoked mapping); at the
// lease's end it unmaps it; Close then has nothing left to do.
func TestImportFollowsTheLease(t *testing.T) {
	c, _, k, ioas := setup(t)
	rec := newRecorder()
	var im *Import
	imported := make(chan struct{})
	// Inside the caller's OnEvent the import has already re-mapped the new fd.
	checked := make(chan error, 1)
	onEvent := func(e *brokerv1.Event) {
		if e.GetType() != brokerv1.EventType_EVENT_TYPE_REISSUED {
			return
		}
		<-imported
		m, err := im.Mapping()
		if err == nil && (m.Generation != e.GetLease().GetGeneration() || k.areas(ioas.ID())[0] != fmt.Sprintf("0x100000+0x10000 ino=%d", e.GetLease().GetInode())) {
			err = fmt.Errorf("in OnEvent(REISSUED): mapping %+v, areas %v", m, k.areas(ioas.ID()))
		}
		checked <- err
	}
	im, err := ioas.AllocateAndImport(ctx(t), c, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: 64 << 10}}},
		rec.options(MapOptions{IOVA: 0x100000, Fixed: true}, onEvent))
	close(imported)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	h := im.Held()
	ino1 := h.Claim().Inode
	m, err := im.Mapping()
	if want := (Mapping{IOAS: ioas.ID(), IOVA: 0x100000, Length: 64 << 10, Generation: 1}); m != want || err != nil {
		t.Fatalf("Mapping() = %+v, %v; want %+v", m, err, want)
	}
	if diff := cmp.Diff([]string{fmt.Sprintf("map ino=%d len=0x10000 iova=0x100000 flags=7", ino1)}, k.takeCalls()); diff != "" {
		t.Errorf("first map (-want +got):\n%s", diff)
	}

	revokeAnother(t, c)
	rm := rec.remap(t)
	ino2 := h.Claim().Inode
	if want := (Mapping{IOAS: ioas.ID(), IOVA: 0x100000, Length: 64 << 10, Generation: 2}); rm.m != want || rm.err != nil || ino2 == ino1 {
		t.Errorf("OnRemap after the reissue: %+v, %v (inode %d, was %d); want %+v", rm.m, rm.err, ino2, ino1, want)
	}
	if err := <-checked; err != nil {
		t.Error(err)
	}
	if diff := cmp.Diff([]string{
		"unmap iova=0x100000 len=0x10000",
		fmt.Sprintf("map ino=%d len=0x10000 iova=0x100000 flags=7", ino2),
	}, k.takeCalls()); diff != "" {
		t.Errorf("after the reissue (-want +got):\n%s", diff)
	}

	if _, err := c.Suspend(ctx(t), bdf); err != nil {
		t.Fatal(err)
	}
	rec.event(t, brokerv1.EventType_EVENT_TYPE_SUSPENDED)
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("the import acted on SUSPENDED: %v (it keeps the dead mapping and its IOVA)", calls)
	}
	if _, err := c.Resume(ctx(t), bdf); err != nil {
		t.Fatal(err)
	}
	if rm := rec.remap(t); rm.m.IOVA != 0x100000 || rm.m.Generation != 2 || rm.err != nil {
		t.Errorf("OnRemap after the resume: %+v, %v", rm.m, rm.err)
	}
	if diff := cmp.Diff([]string{
		"unmap iova=0x100000 len=0x10000",
		fmt.Sprintf("map ino=%d len=0x10000 iova=0x100000 flags=7", ino2),
	}, k.takeCalls()); diff != "" {
		t.Errorf("after the resume (-want +got):\n%s", diff)
	}

	if _, err := c.Revoke(ctx(t), h.ID); err != nil {
		t.Fatal(err)
	}
	if rm := rec.remap(t); rm.m != (Mapping{}) || rm.err != nil {
		t.Errorf("OnRemap at the end: %+v, %v; want the zero Mapping", rm.m, rm.err)
	}
	wait(t, h.Done(), "hold end after the revoke")
	var le *client.LeaseEndedError
	if !errors.As(h.Err(), &le) || le.Event.GetType() != brokerv1.EventType_EVENT_TYPE_REVOKED {
		t.Errorf("Held().Err() = %v, want the REVOKED LeaseEndedError", h.Err())
	}
	if m, err := im.Mapping(); m != (Mapping{}) || err != nil {
		t.Errorf("Mapping() after the end = %+v, %v", m, err)
	}
	if got := k.areas(ioas.ID()); len(got) != 0 {
		t.Errorf("areas after the end: %v", got)
	}
	if diff := cmp.Diff([]string{"unmap iova=0x100000 len=0x10000"}, k.takeCalls()); diff != "" {
		t.Errorf("at the end (-want +got):\n%s", diff)
	}
	if err := im.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := im.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("Close after the end: %v", calls)
	}
}

// Without a fixed IOVA the kernel picks one for the first fd, and every later generation
// goes to that same IOVA.
func TestImportKeepsTheKernelsIOVA(t *testing.T) {
	c, _, k, ioas := setup(t)
	rec := newRecorder()
	im := allocateAndImport(t, ioas, c, client.AllocateOptions{BDF: bdf, BAR: 0}, rec.options(MapOptions{ReadOnly: true}, nil))
	first, _ := im.Mapping()
	if first.IOVA != 0x10000000 || first.Length != 1<<20 {
		t.Fatalf("first mapping %+v, want the whole 1 MiB BAR at the fake kernel's pick", first)
	}
	if diff := cmp.Diff([]string{
		fmt.Sprintf("map ino=%d len=0x100000 iova=0x0 flags=4", im.Held().Claim().Inode), // READABLE
	}, k.takeCalls()); diff != "" {
		t.Errorf("first map (-want +got):\n%s", diff)
	}
	revokeAnother(t, c)
	if rm := rec.remap(t); rm.m.IOVA != first.IOVA || rm.m.Generation != 2 || rm.err != nil {
		t.Errorf("OnRemap after the reissue: %+v, %v; want generation 2 at %#x", rm.m, rm.err, first.IOVA)
	}
	if diff := cmp.Diff([]string{
		"unmap iova=0x10000000 len=0x100000",
		fmt.Sprintf("map ino=%d len=0x100000 iova=0x10000000 flags=5", im.Held().Claim().Inode), // FIXED_IOVA|READABLE
	}, k.takeCalls()); diff != "" {
		t.Errorf("after the reissue (-want +got):\n%s", diff)
	}
}

// A reissue that kills the fd AllocateAndImport is mapping (ENODEV) is no failure: the
// hold has claimed the new generation by then, and the import maps that one instead.
func TestImportFirstMapRacesAReissue(t *testing.T) {
	c, _, k, ioas := setup(t)
	rec := newRecorder()
	k.beforeMap = func() {
		// The device cycles; the hold claims generation 2, swaps its fd and calls
		// OnReissue, which waits for the import's lock (held by the first map).
		revokeAnother(t, c)
		waitForGoroutine(t, "iommufd.(*Import).onReissue")
		k.failNextMap(unix.ENODEV) // what the kernel answers for the dead generation
	}
	im := allocateAndImport(t, ioas, c, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: page}}},
		rec.options(MapOptions{IOVA: 0x100000, Fixed: true}, nil))
	ino2 := im.Held().Claim().Inode
	if m, err := im.Mapping(); m.Generation != 2 || m.IOVA != 0x100000 || err != nil {
		t.Errorf("Mapping() = %+v, %v; want generation 2 at 0x100000", m, err)
	}
	calls := k.takeCalls()
	if len(calls) != 2 || calls[1] != fmt.Sprintf("map ino=%d len=0x1000 iova=0x100000 flags=7", ino2) {
		t.Errorf("calls %q: want the failed map of generation 1, then generation 2's", calls)
	}
	rec.event(t, brokerv1.EventType_EVENT_TYPE_REISSUED)
	if got := k.takeCalls(); len(got) != 0 {
		t.Errorf("OnReissue re-mapped what the first map had mapped: %q", got)
	}
	select {
	case rm := <-rec.remaps:
		t.Errorf("OnRemap(%+v, %v) for the generation the first map mapped", rm.m, rm.err)
	default:
	}
}

// waitForGoroutine waits until a goroutine's stack contains fn.
func waitForGoroutine(t *testing.T, fn string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	buf := make([]byte, 1<<20)
	for !strings.Contains(string(buf[:runtime.Stack(buf, true)]), fn) {
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine in %s within 30s:\n%s", fn, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

// Import holds a lease allocated before; the caller's release ends it, which unmaps.
// A lease of two ranges is refused before anything is mapped or held.
func TestImportAllocatedLease(t *testing.T) {
	c, _, k, ioas := setup(t)
	two, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: page}, {Offset: 2 * page, Length: page}}})
	if err != nil {
		t.Fatal(err)
	}
	defer two.File.Close()
	if _, err := ioas.Import(ctx(t), c, two, ImportOptions{}); !errors.Is(err, ErrMultiRange) {
		t.Errorf("Import of a two-range lease = %v, want ErrMultiRange", err)
	}
	if _, err := two.File.Stat(); err != nil {
		t.Errorf("the caller's fd after the refusal: %v", err)
	}
	if _, err := ioas.AllocateAndImport(ctx(t), c, client.AllocateOptions{BDF: bdf, BAR: 0,
		Ranges: []*brokerv1.Range{{Offset: 8 * page, Length: page}, {Offset: 10 * page, Length: page}}}, ImportOptions{}); !errors.Is(err, ErrMultiRange) {
		t.Errorf("AllocateAndImport of two ranges = %v, want ErrMultiRange", err)
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("ioctls for refused leases: %v", calls)
	}

	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: 2 * page}}})
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	im, err := ioas.Import(ctx(t), c, l, rec.options(MapOptions{IOVA: 0x400000, Fixed: true}, nil))
	if err != nil {
		l.File.Close()
		t.Fatal(err)
	}
	defer im.Close()
	if im.Held().File() != l.File || im.Held().ID != l.ID {
		t.Fatal("Import did not hold the lease with its fd")
	}
	if m, err := im.Mapping(); m.IOVA != 0x400000 || m.Length != 2*page || m.Generation != 1 || err != nil {
		t.Errorf("Mapping() = %+v, %v", m, err)
	}
	if _, err := im.Held().Release(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if rm := rec.remap(t); rm.m != (Mapping{}) || rm.err != nil {
		t.Errorf("OnRemap at the release: %+v, %v", rm.m, rm.err)
	}
	wait(t, im.Held().Done(), "hold end after the release")
	if got := k.areas(ioas.ID()); len(got) != 0 {
		t.Errorf("areas after the release: %v", got)
	}
}

// A failed first map releases the lease AllocateAndImport allocated and returns the
// kernel's error; Import leaves the caller's lease and fd alone.
func TestImportFirstMapFails(t *testing.T) {
	c, _, k, ioas := setup(t)
	k.failNextMap(unix.ENODEV)
	if _, err := ioas.AllocateAndImport(ctx(t), c, client.AllocateOptions{BDF: bdf, BAR: 0}, ImportOptions{}); !errors.Is(err, unix.ENODEV) {
		t.Errorf("AllocateAndImport with a failing map = %v, want ENODEV", err)
	}
	resp, err := c.API().ListLeases(ctx(t), &brokerv1.ListLeasesRequest{LiveOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.GetLeases()); n != 0 {
		t.Errorf("%d live leases after the failed import, want it released", n)
	}

	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	k.failNextMap(unix.EACCES)
	if _, err := ioas.Import(ctx(t), c, l, ImportOptions{}); !errors.Is(err, unix.EACCES) {
		t.Errorf("Import with a failing map = %v, want EACCES", err)
	}
	got, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.ID})
	if err != nil || got.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Errorf("the caller's lease after a failed Import: %v, %v; want it still active", got.GetLease(), err)
	}

	// Hold refuses an ended lease: Import unmaps what it mapped.
	if _, err := c.Release(ctx(t), l.ID); err != nil {
		t.Fatal(err)
	}
	k.takeCalls()
	if _, err := ioas.Import(ctx(t), c, l, ImportOptions{}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Import of a released lease = %v, want FailedPrecondition", err)
	}
	if got := k.areas(ioas.ID()); len(got) != 0 {
		t.Errorf("areas after the refused hold: %v", got)
	}
}

// A re-map that fails is reported (OnRemap, Mapping) and the lease stays held; the next
// resume maps the fd again.
func TestImportRemapFailsThenRecovers(t *testing.T) {
	c, _, k, ioas := setup(t)
	rec := newRecorder()
	im := allocateAndImport(t, ioas, c, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: page}}},
		rec.options(MapOptions{IOVA: 0x100000, Fixed: true}, nil))
	k.failNextMap(unix.ENOMEM)
	revokeAnother(t, c)
	rm := rec.remap(t)
	if rm.m != (Mapping{}) || !errors.Is(rm.err, unix.ENOMEM) || !strings.Contains(rm.err.Error(), "generation 2") {
		t.Errorf("OnRemap of the failed re-map: %+v, %v; want ENOMEM for generation 2", rm.m, rm.err)
	}
	if m, err := im.Mapping(); m != (Mapping{}) || !errors.Is(err, unix.ENOMEM) {
		t.Errorf("Mapping() = %+v, %v; want nothing mapped and the error", m, err)
	}
	select {
	case <-im.Held().Done():
		t.Fatalf("the hold stopped: %v", im.Held().Err())
	default:
	}
	if _, err := c.Suspend(ctx(t), bdf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Resume(ctx(t), bdf); err != nil {
		t.Fatal(err)
	}
	if rm := rec.remap(t); rm.m.IOVA != 0x100000 || rm.m.Generation != 2 || rm.err != nil {
		t.Errorf("OnRemap after the resume: %+v, %v; want generation 2 mapped again", rm.m, rm.err)
	}
	if m, err := im.Mapping(); m.Generation != 2 || err != nil {
		t.Errorf("Mapping() = %+v, %v", m, err)
	}
}

// Close unmaps a live import; closing the FD first leaves Close nothing to unmap.
func TestImportClose(t *testing.T) {
	c, d, k, ioas := setup(t)
	im := allocateAndImport(t, ioas, c, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Length: page}}}, ImportOptions{})
	f := im.Held().File()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if got := k.areas(ioas.ID()); len(got) != 0 {
		t.Errorf("areas after Close: %v", got)
	}
	if _, err := f.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("the lease's fd after Close: %v, want closed", err)
	}
	resp, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: im.Held().ID})
	if err != nil || resp.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Errorf("lease after Close: %v, %v; want still active (Close does not release)", resp.GetLease(), err)
	}

	im2 := allocateAndImport(t, ioas, c, client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: page, Length: page}}}, ImportOptions{})
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := im2.Close(); err != nil {
		t.Errorf("Close after the FD's: %v", err)
	}
}
