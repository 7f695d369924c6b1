//go:build vmtest

package iommufd_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

// A VMM keeps 64 KiB of a device's BAR 4 mapped at IOVA 1 MiB of its IOAS while it holds
// the lease. An administrator revokes another lease of the device, which kills this
// lease's fd too: the client claims the reissued generation and the import maps it where
// the dead one was. When the VMM gives the lease back, the import unmaps it.
func ExampleIOAS_AllocateAndImport() {
	fd, err := iommufd.Open("")
	if err != nil {
		log.Fatal(err)
	}
	defer fd.Close()
	ioas, err := fd.AllocIOAS()
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.Dial(controlSocket) // client.DefaultSocket on a real host
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	remapped := make(chan struct{}, 1)
	im, err := ioas.AllocateAndImport(ctx, c,
		client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 4, Ranges: []*brokerv1.Range{{Length: 64 << 10}}},
		iommufd.ImportOptions{
			Map: iommufd.MapOptions{IOVA: 1 << 20, Fixed: true},
			OnRemap: func(m iommufd.Mapping, err error) {
				if err != nil {
					log.Fatal(err)
				}
				if m.Length == 0 {
					fmt.Println("unmapped")
					return
				}
				fmt.Printf("generation %d mapped at IOVA %#x\n", m.Generation, m.IOVA)
				remapped <- struct{}{}
			},
		})
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	m, _ := im.Mapping()
	fmt.Printf("generation %d mapped at IOVA %#x (%d bytes)\n", m.Generation, m.IOVA, m.Length)

	anAdministratorRevokesAnotherLease("0000:3b:00.0")
	<-remapped

	if _, err := im.Held().Release(ctx); err != nil {
		log.Fatal(err)
	}
	<-im.Held().Done()
	var ended *client.LeaseEndedError
	if errors.As(im.Held().Err(), &ended) {
		fmt.Println("lease ended:", ended.Event.GetLease().GetEndReason())
	}
	// Output:
	// generation 1 mapped at IOVA 0x100000 (65536 bytes)
	// generation 2 mapped at IOVA 0x100000
	// unmapped
	// lease ended: END_REASON_RELEASED
}

// A VMM that follows its lease's events itself maps the claimed fd with MapLease and
// unmaps it with Unmap. A lease of two ranges is one dma-buf of two ranges, which
// IOMMU_IOAS_MAP_FILE cannot map: MapLease says so before asking the kernel.
func ExampleIOAS_MapLease() {
	fd, err := iommufd.Open("")
	if err != nil {
		log.Fatal(err)
	}
	defer fd.Close()
	ioas, err := fd.AllocIOAS()
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.Dial(controlSocket) // client.DefaultSocket on a real host
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	lease, err := c.Allocate(ctx, client.AllocateOptions{BDF: "0000:3c:00.0", BAR: 4, Ranges: []*brokerv1.Range{{Length: 64 << 10}}})
	if err != nil {
		log.Fatal(err)
	}
	defer lease.File.Close()
	m, err := ioas.MapLease(lease, iommufd.MapOptions{}) // the kernel picks the IOVA
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("generation %d mapped: %d bytes\n", m.Generation, m.Length)
	if err := ioas.Unmap(m); err != nil {
		log.Fatal(err)
	}
	fmt.Println("unmapped")

	two, err := c.Allocate(ctx, client.AllocateOptions{BDF: "0000:3c:00.0", BAR: 4,
		Ranges: []*brokerv1.Range{{Offset: 1 << 20, Length: 4096}, {Offset: 2 << 20, Length: 4096}}})
	if err != nil {
		log.Fatal(err)
	}
	defer two.File.Close()
	_, err = ioas.MapLease(two, iommufd.MapOptions{})
	fmt.Println(errors.Is(err, iommufd.ErrMultiRange))

	for _, l := range []*client.Lease{lease, two} {
		if _, err := c.Release(ctx, l.ID); err != nil {
			log.Fatal(err)
		}
	}
	// Output:
	// generation 1 mapped: 65536 bytes
	// unmapped
	// true
}

// anAdministratorRevokesAnotherLease plays an administrator who revokes another lease of
// the device bdf, which reissues the device's other leases.
func anAdministratorRevokesAnotherLease(bdf string) {
	if err := exampleDaemon.RevokeAnotherLease(bdf); err != nil {
		log.Fatal(err)
	}
}
