package vfio

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
)

// backend is how devices reach the kernel when they are opened; tests substitute a fake.
type backend interface {
	// openGroup opens the container and group n under devRoot and joins them with a
	// type1v2 IOMMU.
	openGroup(devRoot string, n int) (group, container *os.File, err error)
	// openIOMMUFD opens devRoot/iommu and allocates the IOAS devices attach to.
	openIOMMUFD(devRoot string) (fd *iommufd.FD, ioas uint32, err error)
	// groupDevice gets the fd of device bdf from an open group.
	groupDevice(g *groupRef, bdf string) (*os.File, error)
	// cdevDevice opens the cdev at path, binds it to the iommufd and attaches it to the
	// IOAS.
	cdevDevice(i *iommuRef, path string) (*os.File, error)
	// query reads what a Device caches about a freshly opened device fd.
	query(f *os.File) (deviceState, error)
	// checkGroup checks that a group fd kept by an earlier run is viable and in its
	// container.
	checkGroup(group *os.File) error
	// rejoin takes the group out of its container and puts it back (type1v2 IOMMU set
	// again). Taking it out fails with EBUSY while any device of the group is open:
	// Reopen uses that to learn that a kept copy of the device fd has been closed.
	rejoin(g *groupRef) error
}

// registry tracks what this process has open, so that devices share what the kernel lets
// a process open only once: a VFIO group (its chardev opens exclusively) with its
// container, and the iommufd with its IOAS. Each is reference counted and closed with its
// last device. It also makes sure a device is open at most once per process, which is what
// makes [Device.Reopen] the device's last close.
type registry struct {
	be backend

	mu      sync.Mutex
	groups  map[groupKey]*groupRef // guarded by mu
	iommus  map[string]*iommuRef   // guarded by mu; keyed by devRoot
	devices map[string]bool        // guarded by mu; BDFs open in this process
}

type groupKey struct {
	devRoot string
	group   int
}

// groupRef is an open VFIO group joined to its own type1v2 container.
type groupRef struct {
	key       groupKey
	refs      int // guarded by registry.mu
	group     *os.File
	container *os.File
	keeper    Keeper // nil: not kept
}

// iommuRef is an open iommufd with the IOAS that cdev devices attach to.
type iommuRef struct {
	devRoot string
	refs    int // guarded by registry.mu
	fd      *iommufd.FD
	ioas    uint32
	keeper  Keeper // nil: not kept
	// borrowed marks an iommufd the caller of Open passed in (OpenOptions.IOMMUFD): it is
	// not in the registry, counts no references and is never closed here.
	borrowed bool
}

func newRegistry(be backend) *registry {
	return &registry{
		be:      be,
		groups:  make(map[groupKey]*groupRef),
		iommus:  make(map[string]*iommuRef),
		devices: make(map[string]bool),
	}
}

// defaultRegistry is the process-wide registry behind [Open]. It has to be process-wide:
// the kernel allows one open of a group chardev, and one bind of a cdev, at a time.
var defaultRegistry = newRegistry(kernelBackend{})

// claimDevice records that bdf is being opened; a second open in this process fails.
func (r *registry) claimDevice(bdf string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.devices[bdf] {
		return fmt.Errorf("device is already open in this process: %w", errdefs.ErrAlreadyExists)
	}
	r.devices[bdf] = true
	return nil
}

func (r *registry) releaseDevice(bdf string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.devices, bdf)
}

// acquireGroup returns group n, opening it (and its container) on first use: from the
// Keeper if a previous run kept them and they still check out, else from devRoot.
func (r *registry) acquireGroup(devRoot string, n int, kp Keeper) (*groupRef, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := groupKey{devRoot, n}
	if g := r.groups[k]; g != nil {
		g.refs++
		return g, nil
	}
	gname, cname := groupKeepNames(n)
	if kp != nil {
		grp, ctr := kp.Take(gname), kp.Take(cname)
		if grp != nil && ctr != nil && r.be.checkGroup(grp) == nil {
			g := &groupRef{key: k, refs: 1, group: grp, container: ctr, keeper: kp}
			r.groups[k] = g
			return g, nil
		}
		for _, f := range []*os.File{grp, ctr} {
			if f != nil {
				f.Close()
			}
		}
	}
	grp, ctr, err := r.be.openGroup(devRoot, n)
	if err != nil {
		return nil, err
	}
	if kp != nil {
		if err := errors.Join(kp.Keep(cname, ctr), kp.Keep(gname, grp)); err != nil {
			kp.Forget(gname)
			kp.Forget(cname)
			return nil, errors.Join(fmt.Errorf("keep the group and container fds: %w", err), grp.Close(), ctr.Close())
		}
	}
	g := &groupRef{key: k, refs: 1, group: grp, container: ctr, keeper: kp}
	r.groups[k] = g
	return g, nil
}

// onlyDevice reports whether g has one device open in this process.
func (r *registry) onlyDevice(g *groupRef) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return g.refs == 1
}

// releaseGroup drops a reference; the last one closes the group, then its container
// (with forget, their kept copies are dropped first).
func (r *registry) releaseGroup(g *groupRef, forget bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	g.refs--
	if g.refs > 0 {
		return nil
	}
	delete(r.groups, g.key)
	var errs []error
	if forget && g.keeper != nil {
		gname, cname := groupKeepNames(g.key.group)
		errs = append(errs, g.keeper.Forget(gname), g.keeper.Forget(cname))
	}
	return errors.Join(append(errs, g.group.Close(), g.container.Close())...)
}

// acquireIOMMU returns the iommufd for devRoot, opening it and allocating its IOAS on
// first use, or taking them from the Keeper if a previous run kept them.
func (r *registry) acquireIOMMU(devRoot string, kp Keeper) (*iommuRef, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i := r.iommus[devRoot]; i != nil {
		i.refs++
		return i, nil
	}
	if kp != nil {
		if fd, ioas, ok := takeIOMMUFD(kp); ok {
			i := &iommuRef{devRoot: devRoot, refs: 1, fd: fd, ioas: ioas, keeper: kp}
			r.iommus[devRoot] = i
			return i, nil
		}
	}
	fd, ioas, err := r.be.openIOMMUFD(devRoot)
	if err != nil {
		return nil, err
	}
	if kp != nil {
		if err := kp.Keep(iommufdKeepName(ioas), fd.File()); err != nil {
			return nil, errors.Join(fmt.Errorf("keep the iommufd: %w", err), fd.Close())
		}
	}
	i := &iommuRef{devRoot: devRoot, refs: 1, fd: fd, ioas: ioas, keeper: kp}
	r.iommus[devRoot] = i
	return i, nil
}

// releaseIOMMU drops a reference; the last one closes the iommufd (and with it the IOAS;
// with forget, its kept copy is dropped first).
func (r *registry) releaseIOMMU(i *iommuRef, forget bool) error {
	if i.borrowed {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	i.refs--
	if i.refs > 0 {
		return nil
	}
	delete(r.iommus, i.devRoot)
	var err error
	if forget && i.keeper != nil {
		err = i.keeper.Forget(iommufdKeepName(i.ioas))
	}
	return errors.Join(err, i.fd.Close())
}
