// Package iommufd imports the dma-buf of an mmiobrokerd lease into the caller's iommufd IO
// address space (IOAS), so that the VFIO devices attached to that IOAS — the VM's devices —
// reach the leased BAR range by DMA (peer-to-peer). It is the importer side of package
// client: client leases and claims the fd and follows the lease's events; this package maps
// the fd with IOMMU_IOAS_MAP_FILE and keeps the mapping right as the lease changes.
//
// It needs a kernel with iommufd (CONFIG_IOMMUFD, /dev/iommu) that accepts dma-bufs in
// IOMMU_IOAS_MAP_FILE (Linux 6.19+). On a kernel without iommufd (Debian's stock build)
// [Open] fails with an error matching errors.ErrUnsupported: such a host can lease and hold
// fds, but nothing there can map them.
//
// # Flow
//
//	fd, err := iommufd.Open("")                  // /dev/iommu; or FromFile(the VMM's own iommufd)
//	defer fd.Close()
//	ioas, err := fd.AllocIOAS()                  // or fd.IOAS(id) of the VMM's IOAS
//	// … bind and attach the VM's VFIO devices to fd.File() and ioas.ID() …
//	c, err := client.Dial(client.DefaultSocket)
//	im, err := ioas.AllocateAndImport(ctx, c,
//		client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 2},
//		iommufd.ImportOptions{Map: iommufd.MapOptions{IOVA: 0x100000000, Fixed: true}})
//	defer im.Close()
//	m, _ := im.Mapping()                         // the BAR is at m.IOVA for the VM's devices
//	<-im.Held().Done()                           // the lease ended (im.Held().Err() says how)
//
// [IOAS.AllocateAndImport] (or [IOAS.Import] for a lease from [client.Client.Allocate])
// returns an [Import]: a [client.HeldLease] whose fd stays mapped at one IOVA across the
// lease's events (see [Import] for each). [IOAS.MapLease], [IOAS.Map] and [IOAS.Unmap] are
// the single steps, for a VMM that follows the events itself.
//
// # One range
//
// IOMMU_IOAS_MAP_FILE maps a VFIO dma-buf only if it covers one contiguous range of the
// BAR, and the daemon exports a lease's ranges (up to 16) as one dma-buf. So the importers
// here refuse a lease of more than one range with [ErrMultiRange] before asking the kernel
// (which would fail with EOPNOTSUPP); lease each range on its own instead. A lease without
// ranges is the whole BAR, one range. The whole dma-buf is always mapped.
//
// # Descriptors and lifetime
//
// An [FD] owns its iommufd; closing it destroys every IOAS allocated through it and every
// mapping in them. An [IOAS] owns no descriptor. A mapping holds its own reference on the
// dma-buf until it is unmapped, so closing the fd does not undo it. An [Import] owns its
// hold, and with it the lease's current fd: [Import.Close] closes that fd and unmaps it
// (close Imports before their FD). Nothing here releases a lease: call
// Import.Held().Release, or [client.Client.Release].
//
// # Revocation
//
// When a VFIO device revokes its dma-bufs (a lease of the device was revoked, the device
// was suspended, reset or lost), iommufd removes their mappings' pages from the IOMMU at
// once, and never puts them back: a later MAP_FILE of a revoked dma-buf fails with ENODEV,
// and even after the device comes back (RESUMED) the old mapping stays empty until it is
// unmapped and the fd mapped again. A reissued lease has a new fd (new generation); the old
// one is dead for good. [Import] does the unmapping and mapping; the IOVA stays the same.
//
// Errors keep the kernel's errno: errors.Is(err, unix.ENODEV) and the like work on them.
package iommufd
