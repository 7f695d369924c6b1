package peercred

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peerGroups reads SO_PEERGROUPS of socket s. The kernel answers ERANGE with the size it
// needs when the buffer is too small; peerGroups retries with that size. A kernel without
// SO_PEERGROUPS (before 4.13) yields nil groups and no error.
func peerGroups(s int) ([]uint32, error) {
	return peerGroupsSized(s, 16)
}

func peerGroupsSized(s, n int) ([]uint32, error) {
	for range 4 {
		if n < 1 {
			n = 1
		}
		buf := make([]uint32, n)
		size := uint32(len(buf) * 4)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch {
		case e == 0:
			if size%4 != 0 || int(size/4) > len(buf) {
				return nil, fmt.Errorf("getsockopt SO_PEERGROUPS: kernel returned %d bytes for a %d-byte buffer", size, len(buf)*4)
			}
			if size == 0 {
				return nil, nil
			}
			return buf[:size/4], nil
		case e == unix.ERANGE:
			want := int(size / 4)
			if want > maxGroups || want <= len(buf) {
				return nil, fmt.Errorf("getsockopt SO_PEERGROUPS: kernel asks for %d groups: %w", want, os.NewSyscallError("getsockopt SO_PEERGROUPS", e))
			}
			n = want
		case errors.Is(e, unix.ENOPROTOOPT):
			return nil, nil
		default:
			return nil, os.NewSyscallError("getsockopt SO_PEERGROUPS", e)
		}
	}
	return nil, fmt.Errorf("getsockopt SO_PEERGROUPS: group list kept growing: %w", unix.ERANGE)
}
