package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"syscall"
	"time"

	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// The examples run against a daemon in the test process on fake devices (its dma-bufs are
// memfds): see example_daemon_test.go. controlSocket is its control socket, which a real
// VMM would not name: it dials client.DefaultSocket.

// A VMM leases 64 KiB of a device's BAR 4, checks the fd it received, and gives the lease
// back when its VM stops.
func Example() {
	c, err := client.Dial(controlSocket) // client.DefaultSocket on a real host
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lease, err := c.Allocate(ctx, client.AllocateOptions{
		BDF:    "0000:3b:00.0",
		BAR:    4,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 64 << 10}},
		VMName: "vm1",
	})
	if err != nil {
		log.Fatalf("allocate: %v (code %v)", err, status.Code(err))
	}
	defer lease.File.Close()
	fi, err := lease.File.Stat()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("leased %d bytes of %s BAR %d, generation %d\n", lease.Claim.Size, lease.Claim.BDF, lease.Claim.BAR, lease.Claim.Generation)
	fmt.Println("the fd is the claimed dma-buf:", fi.Sys().(*syscall.Stat_t).Ino == lease.Claim.Inode)
	// … import lease.File into the VM (client/iommufd) and run the VM …

	released, err := c.Release(ctx, lease.ID)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(released.GetState(), released.GetEndReason())
	// Output:
	// leased 65536 bytes of 0000:3b:00.0 BAR 4, generation 1
	// the fd is the claimed dma-buf: true
	// LEASE_STATE_RELEASED END_REASON_RELEASED
}

// A VMM follows its lease's events with Watch: when the lease is reissued (an
// administrator revoked another lease of the device, which killed this lease's fd too) it
// claims the new generation with the event's token and re-imports it. [Client.AllocateAndHold]
// does all of this by itself.
func ExampleClient_Watch() {
	c, err := client.Dial(controlSocket) // client.DefaultSocket on a real host
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const bdf = "0000:3c:00.0"
	lease, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: 64 << 10}}})
	if err != nil {
		log.Fatal(err)
	}
	defer func() { lease.File.Close() }()
	fmt.Println("holding generation", lease.Claim.Generation)

	anAdministratorRevokesAnotherLeaseOnceWatched(bdf)
	for e, err := range c.Watch(ctx, 0) {
		if err != nil {
			log.Fatal(err)
		}
		if e.GetLease().GetId() != lease.ID {
			continue
		}
		fmt.Println(e.GetType())
		switch e.GetType() {
		case brokerv1.EventType_EVENT_TYPE_REISSUED:
			f, info, err := c.Claim(ctx, lease.ID, e.GetClaimToken())
			if err != nil {
				log.Fatal(err)
			}
			lease.File.Close() // dead since the device's dma-bufs were revoked
			lease.File, lease.Claim = f, info
			fmt.Println("claimed generation", info.Generation)
			// … re-import the new fd; then, the VM done, give the lease back:
			if _, err := c.Release(ctx, lease.ID); err != nil {
				log.Fatal(err)
			}
		case brokerv1.EventType_EVENT_TYPE_RELEASED, brokerv1.EventType_EVENT_TYPE_REVOKED,
			brokerv1.EventType_EVENT_TYPE_EXPIRED, brokerv1.EventType_EVENT_TYPE_DEVICE_LOST:
			fmt.Println("lease ended:", e.GetLease().GetEndReason())
			return
		}
	}
	// Output:
	// holding generation 1
	// EVENT_TYPE_REISSUED
	// claimed generation 2
	// EVENT_TYPE_CLAIMED
	// EVENT_TYPE_RELEASED
	// lease ended: END_REASON_RELEASED
}

// A VMM holds a lease with a time to live: the client claims reissued generations by
// itself, the VMM re-imports them, renews the lease, and gives it back when an
// administrator asks.
func ExampleClient_AllocateAndHold() {
	c, err := client.Dial(controlSocket) // client.DefaultSocket on a real host
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const bdf = "0000:3d:00.0"
	revokeRequested := make(chan struct{}, 1)
	h, err := c.AllocateAndHold(ctx, client.AllocateOptions{BDF: bdf, BAR: 4, Ranges: []*brokerv1.Range{{Length: 64 << 10}}, TTL: time.Hour},
		client.HoldOptions{
			OnReissue: func(f *os.File, info client.ClaimInfo) {
				// … unmap the old fd, map f (client/iommufd does both: IOAS.AllocateAndImport) …
				fmt.Println("re-import generation", info.Generation)
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
	fmt.Println("holding generation", h.Claim().Generation)
	// … map h.File() …

	anAdministratorRevokesAnotherLease(bdf)
	anAdministratorAsksForTheLeaseBack(h.ID)

	renew := time.NewTicker(30 * time.Minute)
	defer renew.Stop()
	for {
		select {
		case <-renew.C:
			if _, err := c.Renew(ctx, h.ID, 0); err != nil {
				log.Print(err)
			}
		case <-revokeRequested:
			fmt.Println("asked to give the lease back")
			// … quiesce the device, unmap …
			if _, err := h.Release(ctx); err != nil {
				log.Print(err)
			}
		case <-h.Done():
			var ended *client.LeaseEndedError
			if errors.As(h.Err(), &ended) {
				fmt.Println("lease ended:", ended.Event.GetLease().GetEndReason())
			} else {
				fmt.Println("hold stopped:", h.Err())
			}
			return
		}
	}
	// Output:
	// holding generation 1
	// re-import generation 2
	// asked to give the lease back
	// lease ended: END_REASON_RELEASED
}
