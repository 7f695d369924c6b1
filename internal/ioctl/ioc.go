package ioctl

// Direction bits of an ioctl request number (_IOC_NONE, _IOC_WRITE, _IOC_READ in
// include/uapi/asm-generic/ioctl.h). "Write" means user space writes to the kernel.
const (
	DirNone  = 0 // _IOC_NONE
	DirWrite = 1 // _IOC_WRITE
	DirRead  = 2 // _IOC_READ
)

// Field widths and shifts of include/uapi/asm-generic/ioctl.h.
const (
	nrBits    = 8
	typeBits  = 8
	sizeBits  = 14
	dirBits   = 2
	nrShift   = 0
	typeShift = nrShift + nrBits
	sizeShift = typeShift + typeBits
	dirShift  = sizeShift + sizeBits

	// MaxSize is the largest argument size an ioctl number can encode (14 bits).
	MaxSize = 1<<sizeBits - 1
)

// IOC encodes an ioctl request number like the kernel's _IOC(dir, type, nr, size). Fields
// wider than their bit width are truncated, as in C; size must be at most [MaxSize].
func IOC(dir, typ, nr, size uintptr) uintptr {
	return (dir&(1<<dirBits-1))<<dirShift |
		(size&(1<<sizeBits-1))<<sizeShift |
		(typ&(1<<typeBits-1))<<typeShift |
		(nr&(1<<nrBits-1))<<nrShift
}

// IO encodes _IO(type, nr): a request without a size-encoded argument.
func IO(typ, nr uintptr) uintptr { return IOC(DirNone, typ, nr, 0) }

// IOR encodes _IOR(type, nr, T) for an argument of size bytes that the kernel writes.
func IOR(typ, nr, size uintptr) uintptr { return IOC(DirRead, typ, nr, size) }

// IOW encodes _IOW(type, nr, T) for an argument of size bytes that the kernel reads.
func IOW(typ, nr, size uintptr) uintptr { return IOC(DirWrite, typ, nr, size) }

// IOWR encodes _IOWR(type, nr, T) for an argument of size bytes read and written.
func IOWR(typ, nr, size uintptr) uintptr { return IOC(DirRead|DirWrite, typ, nr, size) }

// Dir returns the direction field of req (_IOC_DIR).
func Dir(req uintptr) uintptr { return req >> dirShift & (1<<dirBits - 1) }

// Type returns the type ("magic") field of req (_IOC_TYPE).
func Type(req uintptr) uintptr { return req >> typeShift & (1<<typeBits - 1) }

// Nr returns the number field of req (_IOC_NR).
func Nr(req uintptr) uintptr { return req >> nrShift & (1<<nrBits - 1) }

// Size returns the argument-size field of req (_IOC_SIZE).
func Size(req uintptr) uintptr { return req >> sizeShift & (1<<sizeBits - 1) }
