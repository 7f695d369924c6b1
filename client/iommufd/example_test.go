package iommufd_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

// A VMM leases a device's BAR 2 and keeps it mapped into the IOAS its VFIO devices are
// attached to, at IOVA 4 GiB, for as long as the lease lives: the import re-maps the fd
// when the lease is reissued or its device resumed, and unmaps it when the lease ends.
// (Runnable versions, on the VM rig's iommufd kernel: example_vm_test.go.)
func Example() {
	fd, err := iommufd.Open("") // /dev/iommu
	if errors.Is(err, errors.ErrUnsupported) {
		log.Fatal("this kernel has no iommufd: nothing can map a dma-buf here")
	} else if err != nil {
		log.Fatal(err)
	}
	defer fd.Close()
	ioas, err := fd.AllocIOAS()
	if err != nil {
		log.Fatal(err)
	}
	// … bind the VM's VFIO device cdevs to fd.File() and attach them to ioas.ID() …

	c, err := client.Dial(client.DefaultSocket)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	im, err := ioas.AllocateAndImport(context.Background(), c,
		client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 2, VMName: "vm1"},
		iommufd.ImportOptions{
			Map: iommufd.MapOptions{IOVA: 4 << 30, Fixed: true},
			OnRemap: func(m iommufd.Mapping, err error) {
				if err != nil {
					log.Printf("the BAR is not mapped any more: %v", err) // … stop the VM's DMA to it …
				}
			},
		})
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	m, _ := im.Mapping()
	fmt.Printf("BAR 2 of 0000:3b:00.0 (%d bytes) is at IOVA %#x\n", m.Length, m.IOVA)

	<-im.Held().Done() // … run the VM; an operator may revoke the lease …
	log.Printf("lease ended: %v", im.Held().Err())
}
