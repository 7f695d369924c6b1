package client_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// A VMM leases 64 KiB of BAR 2, imports the fd, and follows its lease's events so that it
// can re-import the fd after a reissue.
func Example() {
	c, err := client.Dial(client.DefaultSocket)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lease, err := c.Allocate(ctx, client.AllocateOptions{
		BDF:    "0000:3b:00.0",
		BAR:    2,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 64 << 10}},
		VMName: "vm1",
	})
	if err != nil {
		log.Fatalf("allocate: %v (code %v)", err, status.Code(err))
	}
	fmt.Println("dma-buf inode", lease.Claim.Inode)
	// … map lease.File with IOMMU_IOAS_MAP_FILE …

	for e, err := range c.Watch(context.Background(), 0) {
		if err != nil {
			log.Fatal(err)
		}
		if e.GetLease().GetId() != lease.ID {
			continue
		}
		switch e.GetType() {
		case brokerv1.EventType_EVENT_TYPE_REISSUED:
			f, _, err := c.Claim(context.Background(), lease.ID, e.GetClaimToken())
			if err != nil {
				log.Fatal(err)
			}
			lease.File.Close() // dead since the device was revoked
			lease.File = f     // … re-import it …
		case brokerv1.EventType_EVENT_TYPE_REVOKED:
			lease.File.Close()
			return
		}
	}
}

// A VMM holds a lease with a time to live: the client claims reissued generations by
// itself, the VMM re-imports them, renews the lease, and gives it back when an
// administrator asks.
func ExampleClient_AllocateAndHold() {
	c, err := client.Dial(client.DefaultSocket)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	revokeRequested := make(chan struct{}, 1)
	h, err := c.AllocateAndHold(ctx, client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 2, TTL: time.Hour},
		client.HoldOptions{
			OnReissue: func(f *os.File, info client.ClaimInfo) {
				// … unmap the old fd, IOMMU_IOAS_MAP_FILE f (generation info.Generation) …
			},
			OnEvent: func(e *brokerv1.Event) {
				switch e.GetType() {
				case brokerv1.EventType_EVENT_TYPE_RESUMED:
					// … the device is back: map h.File() again …
				case brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED:
					select {
					case revokeRequested <- struct{}{}:
					default:
					}
				}
			},
		})
	if err != nil {
		log.Fatal(err)
	}
	defer h.Close()
	// … map h.File() …

	renew := time.NewTicker(30 * time.Minute)
	defer renew.Stop()
	for {
		select {
		case <-renew.C:
			if _, err := c.Renew(context.Background(), h.ID, 0); err != nil {
				log.Print(err)
			}
		case <-revokeRequested:
			// … quiesce the device, unmap …
			if _, err := h.Release(context.Background()); err != nil {
				log.Print(err)
			}
			return
		case <-h.Done():
			log.Printf("lease ended: %v", h.Err())
			return
		}
	}
}
