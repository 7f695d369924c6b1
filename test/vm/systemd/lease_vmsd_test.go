//go:build vmsystemd

package systemd

import (
	"context"
	"os"
	"testing"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

// TestRestartKeepsLease: a lease allocated and claimed before `systemctl restart` is still
// live afterwards, and its holder's dma-buf still imports (iommufd kernel: maps into a
// fresh IOAS, which a revoked buffer refuses). The daemon keeps its devices across the
// restart in systemd's fd store and its leases in the journal.
func TestRestartKeepsLease(t *testing.T) {
	requireDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.Dial(controlSock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bdf := env(t, "IVSHMEM")
	l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 2})
	if err != nil {
		t.Fatalf("allocate %s bar 2: %v\n%s", bdf, err, journal(service, 30))
	}
	defer l.File.Close()
	t.Cleanup(func() {
		rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if c2, err := client.Dial(controlSock); err == nil {
			c2.Release(rctx, l.ID)
			c2.Close()
		}
	})
	t.Logf("lease %s: %s bar 2, dma-buf inode %d, %d bytes", l.ID, bdf, l.Claim.Inode, l.Claim.Size)
	iommufdKernel := os.Getenv("MMIOBROKER_VM_KERNEL") == "iommufd"
	mapFresh := func(when string) {
		t.Helper()
		if !iommufdKernel {
			return
		}
		fd, err := iommufd.Open("")
		if err != nil {
			t.Fatal(err)
		}
		defer fd.Close()
		ioas, err := fd.AllocIOAS()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ioas.MapLease(l, iommufd.MapOptions{IOVA: 0x100000, Fixed: true}); err != nil {
			t.Fatalf("%s: IOMMU_IOAS_MAP_FILE of the holder's dma-buf into a fresh IOAS: %v (revoked?)", when, err)
		}
		t.Logf("%s: the holder's dma-buf maps into a fresh IOAS", when)
	}
	mapFresh("before the restart")

	before := show(t, service)
	must(t, "systemctl", "restart", service)
	waitUnit(t, "restarted", 30*time.Second, func(s unitState) bool { return active(s) && s.MainPID != before.MainPID })

	c2, err := client.Dial(controlSock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	resp, err := c2.API().ListLeases(ctx, &brokerv1.ListLeasesRequest{LiveOnly: true})
	if err != nil {
		t.Fatalf("list leases after the restart: %v\n%s", err, journal(service, 30))
	}
	found := false
	for _, got := range resp.GetLeases() {
		if got.GetId() == l.ID {
			found = true
			t.Logf("after the restart: lease %s %v", got.GetId(), got.GetState())
		}
	}
	if !found {
		t.Errorf("lease %s is not listed after the restart (live leases: %v)", l.ID, resp.GetLeases())
	}
	mapFresh("after the restart")
}
