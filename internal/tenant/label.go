package tenant

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// PeerLabel returns the LSM label of the peer of a connected unix socket (getsockopt
// SOL_SOCKET SO_PEERSEC), such as "system_u:system_r:svirt_t:s0:c10,c20" under SELinux.
// It returns "" and no error when no LSM provides a label (ENOPROTOOPT). The label ends
// at its first NUL (SELinux counts the terminating NUL in the length, AppArmor does not).
// The label is the one the peer's socket got when it was created and connected; the peer
// process may have changed its own label since.
//
// Errors keep the errno (unix.ENOTSOCK for a non-socket); a label longer than [MaxLabel]
// yields errdefs.ErrInvalidArgument.
func PeerLabel(rc syscall.RawConn) (string, error) {
	var (
		label string
		serr  error
	)
	if err := rc.Control(func(fd uintptr) {
		label, serr = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_PEERSEC)
	}); err != nil {
		return "", fmt.Errorf("getsockopt SO_PEERSEC: %w", err)
	}
	switch {
	case errors.Is(serr, unix.ENOPROTOOPT):
		return "", nil
	case serr != nil:
		return "", os.NewSyscallError("getsockopt SO_PEERSEC", serr)
	case len(label) > MaxLabel:
		return "", fmt.Errorf("getsockopt SO_PEERSEC: label of %d bytes exceeds %d: %w", len(label), MaxLabel, errdefs.ErrInvalidArgument)
	}
	return label, nil
}
