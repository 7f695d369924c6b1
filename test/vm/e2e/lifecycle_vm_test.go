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
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
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
	var iofd *iommufd.FD
	var ioas uint32
	mapAt := func(iova uint64) error {
		_, err := iofd.MapFile(ioas, l.File, 0, 64<<10, iova, iommufd.MapFixedIOVA|iommufd.MapReadable|iommufd.MapWriteable)
		return err
	}
	if iommufdKernel() {
		if iofd, err = iommufd.Open("/dev"); err != nil {
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
	if iofd != nil {
		if err := mapAt(0x200000); !errors.Is(err, unix.ENODEV) {
			t.Fatalf("map while suspended: %v, want ENODEV", err)
		}
	}
	if dev, err = c.Resume(ctx(t), ivshmem); err != nil || dev.Suspended {
		t.Fatalf("resume: %v, %v", dev, err)
	}
	watchFor(t, c, e.Seq, l.ID, brokerv1.EventType_EVENT_TYPE_RESUMED)
	if iofd != nil {
		if err := mapAt(0x300000); err != nil {
			t.Fatalf("map after the resume: %v", err)
		}
	}
	if got, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.ID}); err != nil || got.Lease.Generation != 1 || got.Lease.State != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Fatalf("lease after suspend/resume: %v, %v; want the same generation, active", got, err)
	}
}
