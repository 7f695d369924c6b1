package iommufd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
)

// DefaultPath is the kernel's iommufd device node.
const DefaultPath = "/dev/iommu"

// ErrMultiRange is the error (matched with errors.Is) for a lease of more than one BAR
// range: IOMMU_IOAS_MAP_FILE maps a VFIO dma-buf only if it is one contiguous range, and
// the daemon exports a lease's ranges as one dma-buf. Lease each range on its own instead.
var ErrMultiRange = errors.New("iommufd maps only single-range dma-bufs")

// kernel is the iommufd uAPI an [FD] drives: *iommufd.FD of internal/iommufd, or a fake
// in tests.
type kernel interface {
	File() *os.File
	AllocIOAS() (uint32, error)
	Destroy(id uint32) error
	MapFile(ioas uint32, file *os.File, start, length, iova uint64, flags iommufd.MapFlags) (uint64, error)
	Unmap(ioas uint32, iova, length uint64) (uint64, error)
	Close() error
}

// FD owns an open iommufd (/dev/iommu). Every IOAS and mapping made through it lives until
// it is destroyed or the FD is closed. It is safe for concurrent use.
type FD struct {
	k kernel
}

// Open opens the iommufd device node at path ([DefaultPath] when path is ""),
// close-on-exec. A missing node means the kernel lacks CONFIG_IOMMUFD: the error then
// matches errors.ErrUnsupported as well as fs.ErrNotExist. Other errors keep their errno
// (errors.Is(err, unix.EACCES)).
func Open(path string) (*FD, error) {
	if path == "" {
		path = DefaultPath
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0) // os opens with O_CLOEXEC
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("iommufd: %w (the kernel has no CONFIG_IOMMUFD?): %w", err, errors.ErrUnsupported)
		}
		return nil, fmt.Errorf("iommufd: %w", err)
	}
	return &FD{k: iommufd.FromFile(f)}, nil
}

// FromFile returns an FD for an iommufd opened elsewhere (one the VMM already uses for
// its VFIO devices, or one inherited from a parent). It takes ownership of f: close the
// FD, not f.
func FromFile(f *os.File) *FD { return &FD{k: iommufd.FromFile(f)} }

// File returns the iommufd file, borrowed: it stays owned by d. It is what
// VFIO_DEVICE_BIND_IOMMUFD takes to bind a VFIO device cdev to this iommufd.
func (d *FD) File() *os.File { return d.k.File() }

// Close closes the iommufd, which destroys every IOAS allocated through it and every
// mapping in them (the dma-bufs they held are released). It is idempotent.
func (d *FD) Close() error { return d.k.Close() }

// AllocIOAS allocates an empty IO address space (IOMMU_IOAS_ALLOC). It lives until
// [IOAS.Destroy] or [FD.Close].
func (d *FD) AllocIOAS() (*IOAS, error) {
	id, err := d.k.AllocIOAS()
	if err != nil {
		return nil, err
	}
	return &IOAS{fd: d, id: id}, nil
}

// IOAS returns the IO address space id allocated earlier through d (for example by the
// VMM for its VFIO devices), without checking that it exists: the first map tells.
func (d *FD) IOAS(id uint32) *IOAS { return &IOAS{fd: d, id: id} }

// IOAS is an IO address space of an [FD]: the addresses (IOVAs) DMA of the devices
// attached to it uses. It owns no file descriptor.
type IOAS struct {
	fd *FD
	id uint32
}

// ID returns the IOAS id (what VFIO_DEVICE_ATTACH_IOMMUFD_PT and a VMM's configuration
// take).
func (a *IOAS) ID() uint32 { return a.id }

// Destroy destroys the IOAS and its mappings (IOMMU_DESTROY). It fails with EBUSY while
// devices are attached to it.
func (a *IOAS) Destroy() error { return a.fd.k.Destroy(a.id) }

// MapOptions say where and how to map a buffer.
type MapOptions struct {
	// IOVA is where to map the buffer when Fixed is set; the range must be unused.
	IOVA uint64
	// Fixed maps at IOVA (IOMMU_IOAS_MAP_FIXED_IOVA); otherwise the kernel picks the
	// address.
	Fixed bool
	// ReadOnly lets devices only read through the mapping (IOMMU_IOAS_MAP_READABLE); by
	// default they may read and write.
	ReadOnly bool
}

func (o MapOptions) flags() iommufd.MapFlags {
	fl := iommufd.MapReadable
	if !o.ReadOnly {
		fl |= iommufd.MapWriteable
	}
	if o.Fixed {
		fl |= iommufd.MapFixedIOVA
	}
	return fl
}

// Mapping is a buffer mapped into an IOAS: [IOVA, IOVA+Length). The zero Mapping is no
// mapping.
type Mapping struct {
	// IOAS is the id of the IO address space.
	IOAS uint32
	// IOVA is where the buffer starts in it.
	IOVA uint64
	// Length is the buffer's size in bytes.
	Length uint64
	// Generation is the lease generation whose fd is mapped; 0 when the mapping was not
	// made from a lease ([IOAS.Map]).
	Generation uint64
}

// Map maps the whole of f, a memfd or a single-range VFIO dma-buf, into the IOAS
// (IOMMU_IOAS_MAP_FILE; dma-bufs since Linux 6.19) and returns the mapping. The mapping
// holds its own reference on the buffer: closing f does not undo it, [IOAS.Unmap] does.
//
// Errors keep the kernel's errno: ENODEV for a revoked dma-buf (a revoked lease, or a
// suspended device), EOPNOTSUPP for a dma-buf iommufd cannot import (more than one range,
// or not from VFIO), EEXIST when the fixed IOVA range is in use, ENOENT for an IOAS that
// does not exist.
func (a *IOAS) Map(f *os.File, opt MapOptions) (Mapping, error) {
	if f == nil {
		return Mapping{}, errors.New("iommufd: map: no file")
	}
	fi, err := f.Stat()
	if err != nil {
		return Mapping{}, fmt.Errorf("iommufd: map: size of the buffer: %w", err)
	}
	if fi.Size() <= 0 {
		return Mapping{}, fmt.Errorf("iommufd: map %s: the buffer is empty (%d bytes)", f.Name(), fi.Size())
	}
	size := uint64(fi.Size())
	iova, err := a.fd.k.MapFile(a.id, f, 0, size, opt.IOVA, opt.flags())
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = fmt.Errorf("%w (IOMMU_IOAS_MAP_FILE takes a memfd or a VFIO dma-buf of one range)", err)
		}
		return Mapping{}, err
	}
	return Mapping{IOAS: a.id, IOVA: iova, Length: size}, nil
}

// MapLease maps the fd of a lease claimed with [client.Client.Allocate], as [IOAS.Map]
// does, after checking that the lease is of one range (else the error matches
// [ErrMultiRange], and nothing is mapped). The mapping's Generation is the lease's.
func (a *IOAS) MapLease(l *client.Lease, opt MapOptions) (Mapping, error) {
	if err := checkRanges(l); err != nil {
		return Mapping{}, err
	}
	m, err := a.Map(l.File, opt)
	if err != nil {
		return Mapping{}, fmt.Errorf("lease %s generation %d: %w", l.ID, l.Claim.Generation, err)
	}
	m.Generation = l.Claim.Generation
	return m, nil
}

// checkRanges refuses a lease that iommufd cannot map as a whole.
func checkRanges(l *client.Lease) error {
	if l == nil || l.File == nil {
		return errors.New("iommufd: no lease, or a lease without its fd")
	}
	if n := len(l.Lease.GetRanges()); n > 1 {
		return fmt.Errorf("lease %s has %d ranges: %w (IOMMU_IOAS_MAP_FILE maps one contiguous range; lease each range on its own)", l.ID, n, ErrMultiRange)
	}
	return nil
}

// Unmap removes a mapping made by [IOAS.Map] or [IOAS.MapLease] (IOMMU_IOAS_UNMAP).
// A mapping of a dma-buf revoked since can still be unmapped, and must be before its IOVA
// range can be used again.
func (a *IOAS) Unmap(m Mapping) error {
	if m.Length == 0 {
		return errors.New("iommufd: unmap: not a mapping (length 0)")
	}
	if m.IOAS != a.id {
		return fmt.Errorf("iommufd: unmap: the mapping is in IOAS %d, not %d", m.IOAS, a.id)
	}
	n, err := a.fd.k.Unmap(a.id, m.IOVA, m.Length)
	if err != nil {
		return err
	}
	if n != m.Length {
		return fmt.Errorf("iommufd: unmap ioas %d [%#x,+%#x): the kernel unmapped %#x bytes", a.id, m.IOVA, m.Length, n)
	}
	return nil
}
