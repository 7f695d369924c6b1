package client_test

import (
	"context"
	"fmt"
	"log"
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
