package iommufd

import (
	"structs"
	"unsafe"
)

// ioasAlloc mirrors struct iommu_ioas_alloc (include/uapi/linux/iommufd.h, Linux 6.2).
type ioasAlloc struct {
	_         structs.HostLayout
	Size      uint32
	Flags     uint32 // must be 0
	OutIOASID uint32
}

// destroy mirrors struct iommu_destroy (include/uapi/linux/iommufd.h, Linux 6.2).
type destroy struct {
	_    structs.HostLayout
	Size uint32
	ID   uint32
}

// ioasMapFile mirrors struct iommu_ioas_map_file (include/uapi/linux/iommufd.h,
// Linux 6.13; dma-buf fds accepted since 6.19).
type ioasMapFile struct {
	_      structs.HostLayout
	Size   uint32
	Flags  uint32 // MapFlags
	IOASID uint32
	FD     int32
	Start  uint64
	Length uint64
	IOVA   uint64 // in with MapFixedIOVA, else out
}

// ioasUnmap mirrors struct iommu_ioas_unmap (include/uapi/linux/iommufd.h, Linux 6.2).
type ioasUnmap struct {
	_      structs.HostLayout
	Size   uint32
	IOASID uint32
	IOVA   uint64
	Length uint64 // in: bytes to unmap; out: bytes unmapped
}

func newIOASAlloc() ioasAlloc {
	return ioasAlloc{Size: uint32(unsafe.Sizeof(ioasAlloc{}))}
}

func newDestroy(id uint32) destroy {
	return destroy{Size: uint32(unsafe.Sizeof(destroy{})), ID: id}
}

func newIOASMapFile() ioasMapFile {
	return ioasMapFile{Size: uint32(unsafe.Sizeof(ioasMapFile{}))}
}

func newIOASUnmap(ioas uint32, iova, length uint64) ioasUnmap {
	return ioasUnmap{Size: uint32(unsafe.Sizeof(ioasUnmap{})), IOASID: ioas, IOVA: iova, Length: length}
}
