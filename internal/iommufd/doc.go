// Package iommufd drives /dev/iommu, the iommufd uAPI (include/uapi/linux/iommufd.h,
// Linux 6.2+; IOMMU_IOAS_MAP_FILE 6.13+, dma-buf files accepted since 6.19).
//
// mmiobroker uses it twice: the vfio package binds VFIO cdevs to an [FD] and attaches them
// to an IO address space (IOAS), and clients import a BAR dma-buf into their own IOAS with
// [FD.MapFile] for peer-to-peer DMA. VMMs outside this module use the public importer
// built on it, package client/iommufd, which also follows a lease's reissues.
//
// # Descriptor lifetime
//
// An [FD] owns one open /dev/iommu file; every object allocated through it (IOAS ids, the
// mappings in them, devices bound to it) lives until it is destroyed or the file is closed.
// [FD.Close] is idempotent. A dma-buf mapped with MapFile holds a reference on the dma-buf
// file until the area is unmapped or the IOAS destroyed, so closing the caller's dma-buf fd
// does not undo the mapping.
//
// # Revocation
//
// When the exporting VFIO device revokes its dma-bufs (memory decode cleared, reset, or the
// last close of its device fd), iommufd unmaps the area from the IOMMU for good: it never
// maps it again, even after the exporter un-revokes. While a dma-buf is revoked, MapFile
// fails with ENODEV. To recover after a temporary revoke, [FD.Unmap] the dead area and map
// the dma-buf again; after a permanent revoke only a newly exported dma-buf maps.
// Only single-range VFIO dma-bufs are accepted (EOPNOTSUPP otherwise).
//
// A kernel without CONFIG_IOMMUFD (Debian's stock 7.2 build) has no /dev/iommu; [Open]
// then fails with an error that matches errdefs.ErrNotSupported.
package iommufd
