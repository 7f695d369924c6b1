package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"golang.org/x/sys/unix"
)

// kernelBackend opens the real /dev/vfio and /dev/iommu nodes.
type kernelBackend struct{}

// openGroup follows the legacy sequence (docs/kernel.md §1.2): open the container, check
// the API version and type1v2 support, open the group, check it is viable, put it in the
// container and set the IOMMU type.
func (kernelBackend) openGroup(devRoot string, n int) (group, container *os.File, err error) {
	cpath := filepath.Join(devRoot, "vfio", "vfio")
	ctr, err := os.OpenFile(cpath, os.O_RDWR, 0) // os opens with O_CLOEXEC
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil, fmt.Errorf("%w (is the vfio module loaded?): %w", err, errdefs.ErrNotSupported)
		}
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			ctr.Close()
		}
	}()
	v, err := ioctl.Value(ctr, "VFIO_GET_API_VERSION", VFIO_GET_API_VERSION, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", cpath, err)
	}
	if v != VFIO_API_VERSION {
		return nil, nil, fmt.Errorf("%s: VFIO API version %d, want %d: %w", cpath, v, VFIO_API_VERSION, errdefs.ErrNotSupported)
	}
	ok, err := ioctl.Value(ctr, "VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", cpath, err)
	}
	if ok == 0 {
		return nil, nil, fmt.Errorf("%s: no type1v2 IOMMU driver (try: modprobe vfio_iommu_type1): %w", cpath, errdefs.ErrNotSupported)
	}

	gpath := filepath.Join(devRoot, "vfio", strconv.Itoa(n))
	grp, err := os.OpenFile(gpath, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return nil, nil, fmt.Errorf("%w (the group is open elsewhere, or a device of it is bound to an iommufd)", err)
		}
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			grp.Close()
		}
	}()
	st := newGroupStatus()
	if _, err := ioctl.Ioctl(grp, "VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", gpath, err)
	}
	if st.Flags&VFIO_GROUP_FLAGS_VIABLE == 0 {
		return nil, nil, fmt.Errorf("%s: iommu group %d is not viable (bind every device of the group to vfio-pci, or unbind it): %w",
			gpath, n, errdefs.ErrFailedPrecondition)
	}
	err = ioctl.WithFD(ctr, func(cfd int) error {
		fd := int32(cfd)
		_, err := ioctl.Ioctl(grp, "VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER, &fd)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", gpath, err)
	}
	if _, err := ioctl.Value(ctr, "VFIO_SET_IOMMU", VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", cpath, err)
	}
	return grp, ctr, nil
}

func (kernelBackend) openIOMMUFD(devRoot string) (*iommufd.FD, uint32, error) {
	fd, err := iommufd.Open(devRoot)
	if err != nil {
		return nil, 0, err
	}
	ioas, err := fd.AllocIOAS()
	if err != nil {
		fd.Close()
		return nil, 0, err
	}
	return fd, ioas, nil
}

// groupDevice gets a device fd from an open group (VFIO_GROUP_GET_DEVICE_FD). The kernel
// always creates it O_CLOEXEC.
func (kernelBackend) groupDevice(g *groupRef, bdf string) (*os.File, error) {
	name := append([]byte(bdf), 0)
	fd, err := ioctl.Bytes(g.group, "VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD, name)
	if err != nil {
		return nil, fmt.Errorf("group %d: %w", g.key.group, err)
	}
	return os.NewFile(fd, "vfio-device:"+bdf), nil
}

// cdevDevice opens a VFIO cdev, binds it to the iommufd and attaches it to the IOAS.
func (kernelBackend) cdevDevice(i *iommuRef, path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0) // O_CLOEXEC
	if err != nil {
		return nil, err
	}
	bind := newBindIOMMUFD(-1)
	err = ioctl.WithFD(i.fd.File(), func(fd int) error {
		bind.IOMMUFD = int32(fd)
		_, err := ioctl.Ioctl(f, "VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD, &bind)
		return err
	})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	at := newAttachIOMMUFDPT(i.ioas)
	if _, err := ioctl.Ioctl(f, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: attach to ioas %d: %w", path, i.ioas, err)
	}
	return f, nil
}

func (kernelBackend) query(f *os.File) (deviceState, error) { return queryDevice(f) }

func (kernelBackend) checkGroup(grp *os.File) error {
	st := newGroupStatus()
	if _, err := ioctl.Ioctl(grp, "VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS, &st); err != nil {
		return err
	}
	const want = VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET
	if st.Flags&want != want {
		return fmt.Errorf("kept group: status %#x, want viable and in a container: %w", st.Flags, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func (kernelBackend) rejoin(g *groupRef) error {
	if _, err := ioctl.Value(g.group, "VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER, 0); err != nil {
		return err // EBUSY: a device of the group is still open
	}
	err := ioctl.WithFD(g.container, func(cfd int) error {
		fd := int32(cfd)
		_, err := ioctl.Ioctl(g.group, "VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER, &fd)
		return err
	})
	if err != nil {
		return fmt.Errorf("group %d: rejoin its container: %w", g.key.group, err)
	}
	if _, err := ioctl.Value(g.container, "VFIO_SET_IOMMU", VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU); err != nil {
		return fmt.Errorf("group %d: rejoin its container: %w", g.key.group, err)
	}
	return nil
}
