package ioctl

import (
	"fmt"
	"os"
	"syscall"
)

// WithFD calls fn with the descriptor number of c while c is kept open, for requests whose
// argument carries another file's descriptor (VFIO_GROUP_SET_CONTAINER,
// VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_MAP_FILE). The number is only valid inside fn.
// Calling [Ioctl] on other files from fn is fine. It returns fn's error, or the error of
// reaching the descriptor (e.g. os.ErrClosed).
func WithFD(c syscall.Conn, fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("with fd: %w", err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return controlError("with fd", err)
	}
	return ferr
}

// controlError explains a failure to reach a descriptor through syscall.RawConn. For an
// *os.File, Control fails only once the file is closed, but the runtime reports that with
// an internal error value ("use of closed file"), so os.ErrClosed is added to the chain.
func controlError(op string, err error) error {
	return fmt.Errorf("%s: %w (%w)", op, os.ErrClosed, err)
}
