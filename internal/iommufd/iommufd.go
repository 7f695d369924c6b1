package iommufd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
)

// Request numbers (include/uapi/linux/iommufd.h): _IO(IOMMUFD_TYPE=';', IOMMUFD_CMD_*).
const (
	IOMMU_DESTROY       uintptr = 0x3b80 // _IO(';', 0x80)
	IOMMU_IOAS_ALLOC    uintptr = 0x3b81 // _IO(';', 0x81)
	IOMMU_IOAS_MAP      uintptr = 0x3b85 // _IO(';', 0x85)
	IOMMU_IOAS_UNMAP    uintptr = 0x3b86 // _IO(';', 0x86)
	IOMMU_IOAS_MAP_FILE uintptr = 0x3b8f // _IO(';', 0x8f)
)

// MapFlags are the flags of IOMMU_IOAS_MAP and IOMMU_IOAS_MAP_FILE (enum
// iommufd_ioas_map_flags).
type MapFlags uint32

// Map flags.
const (
	// MapFixedIOVA (IOMMU_IOAS_MAP_FIXED_IOVA) places the mapping at the given IOVA
	// instead of letting the kernel choose; the range must be unused.
	MapFixedIOVA MapFlags = 1 << 0
	// MapWriteable (IOMMU_IOAS_MAP_WRITEABLE) lets DMA write through the mapping.
	MapWriteable MapFlags = 1 << 1
	// MapReadable (IOMMU_IOAS_MAP_READABLE) lets DMA read through the mapping.
	MapReadable MapFlags = 1 << 2
)

// Error is an iommufd operation that failed. Err keeps the errno, so
// errors.Is(err, unix.ENODEV) works on it.
type Error struct {
	Op  string // "alloc-ioas", "map-file", …
	Err error
}

func (e *Error) Error() string { return "iommufd: " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

func opError(op string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Err: err}
}

// FD owns an open /dev/iommu. It is safe for concurrent use.
type FD struct {
	f         *os.File
	closeOnce sync.Once
	closeErr  error
}

// Open opens devRoot/iommu ("/dev/iommu" when devRoot is ""). A missing device node means
// the kernel lacks CONFIG_IOMMUFD; that error matches errdefs.ErrNotSupported as well as
// fs.ErrNotExist.
func Open(devRoot string) (*FD, error) {
	if devRoot == "" {
		devRoot = "/dev"
	}
	path := filepath.Join(devRoot, "iommu")
	f, err := os.OpenFile(path, os.O_RDWR, 0) // os opens with O_CLOEXEC
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, opError("open", fmt.Errorf("%w (kernel without CONFIG_IOMMUFD?): %w", err, errdefs.ErrNotSupported))
		}
		return nil, opError("open", err)
	}
	return &FD{f: f}, nil
}

// FromFile wraps an iommufd fd opened earlier (for example one a previous run of the
// process kept in the systemd fd store). It takes ownership of f.
func FromFile(f *os.File) *FD { return &FD{f: f} }

// File returns the /dev/iommu file, borrowed: it stays owned by d. It is what
// VFIO_DEVICE_BIND_IOMMUFD takes.
func (d *FD) File() *os.File { return d.f }

// AllocIOAS allocates an empty IO address space and returns its id (IOMMU_IOAS_ALLOC).
func (d *FD) AllocIOAS() (uint32, error) {
	arg := newIOASAlloc()
	if _, err := ioctl.Ioctl(d.f, "IOMMU_IOAS_ALLOC", IOMMU_IOAS_ALLOC, &arg); err != nil {
		return 0, opError("alloc-ioas", err)
	}
	return arg.OutIOASID, nil
}

// Destroy destroys the iommufd object id, e.g. an IOAS (IOMMU_DESTROY). It fails with
// EBUSY while devices are attached to it.
func (d *FD) Destroy(id uint32) error {
	arg := newDestroy(id)
	_, err := ioctl.Ioctl(d.f, "IOMMU_DESTROY", IOMMU_DESTROY, &arg)
	return opError(fmt.Sprintf("destroy %d", id), err)
}

// MapFile maps length bytes of file, from byte offset start, into ioas
// (IOMMU_IOAS_MAP_FILE). file is a memfd or a single-range VFIO dma-buf. With
// [MapFixedIOVA] in flags the mapping is placed at iova, otherwise the kernel picks the
// address. It returns the IOVA of the mapping. flags needs [MapReadable] and/or
// [MapWriteable]. A revoked dma-buf fails with ENODEV, a multi-range one with EOPNOTSUPP,
// a range beyond the file with EINVAL.
func (d *FD) MapFile(ioas uint32, file *os.File, start, length, iova uint64, flags MapFlags) (uint64, error) {
	arg := newIOASMapFile()
	arg.Flags = uint32(flags)
	arg.IOASID = ioas
	arg.Start = start
	arg.Length = length
	arg.IOVA = iova
	err := ioctl.WithFD(file, func(fd int) error {
		arg.FD = int32(fd)
		_, err := ioctl.Ioctl(d.f, "IOMMU_IOAS_MAP_FILE", IOMMU_IOAS_MAP_FILE, &arg)
		return err
	})
	if err != nil {
		return 0, opError(fmt.Sprintf("map-file ioas %d [%#x,+%#x)", ioas, start, length), err)
	}
	return arg.IOVA, nil
}

// Unmap unmaps [iova, iova+length) from ioas (IOMMU_IOAS_UNMAP) and returns the number of
// bytes unmapped. The range must cover whole mappings; iova 0 with length 1<<64-1 unmaps
// everything.
func (d *FD) Unmap(ioas uint32, iova, length uint64) (uint64, error) {
	arg := newIOASUnmap(ioas, iova, length)
	if _, err := ioctl.Ioctl(d.f, "IOMMU_IOAS_UNMAP", IOMMU_IOAS_UNMAP, &arg); err != nil {
		return 0, opError(fmt.Sprintf("unmap ioas %d [%#x,+%#x)", ioas, iova, length), err)
	}
	return arg.Length, nil
}

// Close closes the /dev/iommu file, destroying every object allocated through it. It is
// idempotent: later calls return the first call's result.
func (d *FD) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.f.Close() })
	return d.closeErr
}
