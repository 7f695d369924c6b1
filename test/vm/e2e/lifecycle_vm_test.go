//go:build vmtest

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

// watchFor returns the first event of type typ for lease id on c's stream from cursor.
func watchFor(t *testing.T, c *client.Client, cursor uint64, id string, typ brokerv1.EventType) *brokerv1.Event {
	t.Helper()
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for e, err := range c.Watch(wctx, cursor) {
		if err != nil {
			t.Fatalf("waiting for %v of %s: %v", typ, id, err)
		}
		if e.Lease.GetId() == id && e.Type == typ {
			return e
		}
	}
	t.Fatalf("event stream ended before %v of %s", typ, id)
	return nil
}

// TestE2EHolderExit: a VMM holding a lease (mmiobrokerctl allocate in hold mode) is killed;
// the daemon notices through the pidfd it pinned at allocation, releases the lease with
// reason HOLDER_EXITED and revokes its dma-buf (the device's other lease is reissued).
func TestE2EHolderExit(t *testing.T) {
	d := startDaemon(t)
	c := d.client(t)
	ivshmem := env(t, "IVSHMEM")
	other, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer other.File.Close()

	hold := exec.Command("mmiobrokerctl", "-socket", d.control, "-claim-socket", d.claim, "-json",
		"allocate", "-range", "0x1000:0x1000", ivshmem, "2")
	out, err := hold.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	hold.Stderr = os.Stderr
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	defer hold.Process.Kill()
	var held struct {
		Lease struct {
			ID string `json:"id"`
		} `json:"lease"`
	}
	if err := json.NewDecoder(out).Decode(&held); err != nil || held.Lease.ID == "" {
		t.Fatalf("allocate -json printed no lease: %+v, %v", held, err)
	}
	got, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: held.Lease.ID})
	if err != nil || got.Lease.State != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Fatalf("held lease %v, %v; want ACTIVE", got, err)
	}
	start := time.Now()
	hold.Process.Kill()
	e := watchFor(t, c, 1, held.Lease.ID, brokerv1.EventType_EVENT_TYPE_RELEASED)
	t.Logf("lease of the killed holder released %v after SIGKILL", time.Since(start))
	if e.Lease.EndReason != brokerv1.EndReason_END_REASON_HOLDER_EXITED {
		t.Fatalf("released with %v, want HOLDER_EXITED", e.Lease.EndReason)
	}
	watchFor(t, c, e.Seq, other.ID, brokerv1.EventType_EVENT_TYPE_REISSUED)
	hold.Wait()
}

// TestE2ESuspendResume: SuspendDevice turns memory decode off — every dma-buf of the device
// is unusable, holders get SUSPENDED — and ResumeDevice turns it on again (RESUMED); an
// importer then maps the same fd again (on the iommufd kernel: MAP_FILE gives ENODEV while
// suspended and works after the resume).
func TestE2ESuspendResume(t *testing.T) {
	d := startDaemon(t)
	c := d.client(t)
	ivshmem := env(t, "IVSHMEM")
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Length: 64 << 10}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	var ioas *iommufd.IOAS
	mapAt := func(iova uint64) error {
		_, err := ioas.MapLease(l, iommufd.MapOptions{IOVA: iova, Fixed: true})
		return err
	}
	if iommufdKernel() {
		iofd, err := iommufd.Open("")
		if err != nil {
			t.Fatal(err)
		}
		defer iofd.Close()
		if ioas, err = iofd.AllocIOAS(); err != nil {
			t.Fatal(err)
		}
		if err := mapAt(0x100000); err != nil {
			t.Fatalf("map before the suspend: %v", err)
		}
	}
	dev, err := c.Suspend(ctx(t), ivshmem)
	if err != nil || !dev.Suspended {
		t.Fatalf("suspend: %v, %v", dev, err)
	}
	e := watchFor(t, c, 1, l.ID, brokerv1.EventType_EVENT_TYPE_SUSPENDED)
	if _, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Offset: 64 << 10, Length: 4096}}}); err == nil {
		t.Fatal("allocation on a suspended device succeeded")
	}
	if ioas != nil {
		if err := mapAt(0x200000); !errors.Is(err, unix.ENODEV) {
			t.Fatalf("map while suspended: %v, want ENODEV", err)
		}
	}
	if dev, err = c.Resume(ctx(t), ivshmem); err != nil || dev.Suspended {
		t.Fatalf("resume: %v, %v", dev, err)
	}
	watchFor(t, c, e.Seq, l.ID, brokerv1.EventType_EVENT_TYPE_RESUMED)
	if ioas != nil {
		if err := mapAt(0x300000); err != nil {
			t.Fatalf("map after the resume: %v", err)
		}
	}
	if got, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.ID}); err != nil || got.Lease.Generation != 1 || got.Lease.State != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Fatalf("lease after suspend/resume: %v, %v; want the same generation, active", got, err)
	}
}

// TestE2EImport: a VMM's importer (client/iommufd) on the iommufd kernel, with real VFIO
// dma-bufs of the ivshmem BAR. A lease of two ranges is refused before the kernel is asked
// (the kernel itself refuses such a dma-buf: EOPNOTSUPP). An imported lease is mapped at
// its IOVA; after a reissue (another lease of the device revoked) the new generation is
// mapped at the same IOVA, which the kernel accepts only once the dead generation's area
// is gone; after a suspend (the fd stops mapping: ENODEV) and a resume it is mapped there
// again; at the lease's end the IOVA is free.
func TestE2EImport(t *testing.T) {
	if !iommufdKernel() {
		t.Skip("kernel " + os.Getenv("MMIOBROKER_VM_KERNEL") + " has no iommufd (CONFIG_IOMMUFD): nothing imports a dma-buf there")
	}
	d := startDaemon(t)
	c := d.client(t)
	ivshmem := env(t, "IVSHMEM")
	iofd, err := iommufd.Open("")
	if err != nil {
		t.Fatal(err)
	}
	defer iofd.Close()
	ioas, err := iofd.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	const iova, size = 0x100000, 64 << 10
	at := iommufd.MapOptions{IOVA: iova, Fixed: true}

	two, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2,
		Ranges: []*brokerv1.Range{{Offset: 0x80000, Length: 4096}, {Offset: 0x90000, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ioas.MapLease(two, at); !errors.Is(err, iommufd.ErrMultiRange) {
		t.Errorf("MapLease of a two-range lease: %v, want ErrMultiRange", err)
	}
	if _, err := ioas.Map(two.File, at); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("IOMMU_IOAS_MAP_FILE of a two-range dma-buf: %v, want EOPNOTSUPP", err)
	}
	two.File.Close()
	if _, err := c.Release(ctx(t), two.ID); err != nil {
		t.Fatal(err)
	}

	remaps := make(chan iommufd.Mapping, 8)
	events := make(chan *brokerv1.Event, 64)
	im, err := ioas.AllocateAndImport(ctx(t), c, client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Length: size}}},
		iommufd.ImportOptions{
			Map: at,
			OnRemap: func(m iommufd.Mapping, err error) {
				if err != nil {
					t.Errorf("OnRemap: %v", err)
				}
				remaps <- m
			},
			Hold: client.HoldOptions{OnEvent: func(e *brokerv1.Event) { events <- e }},
		})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	h := im.Held()
	remapped := func(what string) iommufd.Mapping {
		t.Helper()
		select {
		case m := <-remaps:
			return m
		case <-time.After(30 * time.Second): // a bound on failure, not a timing assertion
			t.Fatalf("%s: no re-map within 30 s", what)
		}
		return iommufd.Mapping{}
	}
	event := func(typ brokerv1.EventType) {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for {
			select {
			case e := <-events:
				if e.GetType() == typ {
					return
				}
			case <-deadline:
				t.Fatalf("no %v event within 30 s", typ)
			}
		}
	}
	// occupied checks that the import's area is at the IOVA: the kernel refuses another
	// mapping over it.
	occupied := func(when string) {
		t.Helper()
		if _, err := ioas.Map(h.File(), at); !errors.Is(err, unix.EEXIST) {
			t.Errorf("%s: a second map at %#x: %v, want EEXIST (the import's area is there)", when, iova, err)
		}
	}
	if m, err := im.Mapping(); err != nil || m.IOVA != iova || m.Length != size || m.Generation != 1 {
		t.Fatalf("first mapping %+v, %v", m, err)
	}
	occupied("generation 1")
	gen1 := h.Claim().Inode

	victim, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: ivshmem, BAR: 2, Ranges: []*brokerv1.Range{{Offset: size, Length: size}}})
	if err != nil {
		t.Fatal(err)
	}
	defer victim.File.Close()
	if _, err := c.Revoke(ctx(t), victim.ID); err != nil {
		t.Fatal(err)
	}
	if m := remapped("reissue"); m.IOVA != iova || m.Length != size || m.Generation != 2 {
		t.Errorf("after the reissue: %+v, want generation 2 at %#x", m, iova)
	}
	if h.Claim().Generation != 2 || h.Claim().Inode == gen1 {
		t.Errorf("held claim %+v, want generation 2 with a new inode", h.Claim())
	}
	occupied("generation 2")
	if m, err := ioas.Map(h.File(), iommufd.MapOptions{IOVA: 0x200000, Fixed: true}); err != nil {
		t.Errorf("the reissued fd does not map elsewhere: %v", err)
	} else if err := ioas.Unmap(m); err != nil {
		t.Error(err)
	}
	if _, err := ioas.MapLease(victim, iommufd.MapOptions{IOVA: 0x200000, Fixed: true}); !errors.Is(err, unix.ENODEV) {
		t.Errorf("the revoked victim's fd: %v, want ENODEV", err)
	}

	if _, err := c.Suspend(ctx(t), ivshmem); err != nil {
		t.Fatal(err)
	}
	event(brokerv1.EventType_EVENT_TYPE_SUSPENDED)
	if _, err := ioas.Map(h.File(), iommufd.MapOptions{IOVA: 0x200000, Fixed: true}); !errors.Is(err, unix.ENODEV) {
		t.Errorf("map while suspended: %v, want ENODEV", err)
	}
	if _, err := c.Resume(ctx(t), ivshmem); err != nil {
		t.Fatal(err)
	}
	if m := remapped("resume"); m.IOVA != iova || m.Generation != 2 {
		t.Errorf("after the resume: %+v, want generation 2 at %#x", m, iova)
	}
	occupied("resumed")

	if _, err := c.Revoke(ctx(t), h.ID); err != nil {
		t.Fatal(err)
	}
	if m := remapped("revoke"); m != (iommufd.Mapping{}) {
		t.Errorf("at the end: %+v, want unmapped", m)
	}
	select {
	case <-h.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the hold did not stop after the revoke")
	}
	var le *client.LeaseEndedError
	if !errors.As(h.Err(), &le) || le.Event.GetType() != brokerv1.EventType_EVENT_TYPE_REVOKED {
		t.Errorf("hold ended with %v, want REVOKED", h.Err())
	}
	fd, err := unix.MemfdCreate("e2e-import", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(fd), "memfd")
	defer mem.Close()
	if err := mem.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if m, err := ioas.Map(mem, at); err != nil {
		t.Errorf("the IOVA after the lease's end: %v, want it free", err)
	} else if err := ioas.Unmap(m); err != nil {
		t.Error(err)
	}
}
