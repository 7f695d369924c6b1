package vfio

import (
	"os"
	"strconv"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/iommufd"
)

// Keeper keeps copies of this process's VFIO fds outside it, so that they outlive the
// process: the systemd fd store. A VFIO device whose last fd is closed revokes every
// dma-buf it exported, and a group or iommufd closed for good takes its devices with it,
// so a daemon that must restart without revoking keeps them all there.
//
// Open asks the Keeper first for the fds a previous run kept (Take), and keeps every fd it
// opens (Keep). Before it closes an fd for good — [Device.Reopen], [Device.Close], the
// last device of a group or iommufd — it calls Forget, which must return only once the
// outside copy is closed: otherwise the close would not be the last one and nothing would
// be revoked. [Device.Detach] closes this process's copies without Forget, leaving the
// kept ones (a daemon stopping without revoking).
type Keeper interface {
	// Take returns the fd a previous run kept under name and forgets it (the caller owns
	// it), or nil.
	Take(name string) *os.File
	// TakePrefix is Take for the first kept fd whose name starts with prefix; it returns
	// that name too.
	TakePrefix(prefix string) (string, *os.File)
	// Keep keeps a copy of f under name; the caller keeps owning f.
	Keep(name string, f *os.File) error
	// Forget drops the copy kept under name and returns once it is closed.
	Forget(name string) error
}

// Names of kept fds (systemd FDNAME: printable ASCII without ':', at most 255 bytes).
const (
	keepContainer = "vfio-container."
	keepGroup     = "vfio-group."
	keepDevice    = "vfio-device."
	keepIOMMUFD   = "iommufd.ioas-"
)

// KeepName returns the name under which the fd of device bdf is kept.
func KeepName(bdf string) string { return keepDevice + strings.ReplaceAll(bdf, ":", "_") }

func groupKeepNames(n int) (group, container string) {
	s := strconv.Itoa(n)
	return keepGroup + s, keepContainer + s
}

// takeIOMMUFD returns a kept iommufd and the IOAS its devices are attached to.
func takeIOMMUFD(k Keeper) (*iommufd.FD, uint32, bool) {
	name, f := k.TakePrefix(keepIOMMUFD)
	if f == nil {
		return nil, 0, false
	}
	ioas, err := strconv.ParseUint(strings.TrimPrefix(name, keepIOMMUFD), 10, 32)
	if err != nil {
		f.Close()
		return nil, 0, false
	}
	return iommufd.FromFile(f), uint32(ioas), true
}

func iommufdKeepName(ioas uint32) string { return keepIOMMUFD + strconv.FormatUint(uint64(ioas), 10) }
