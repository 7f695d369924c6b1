package iommufd

import (
	"fmt"
	"os"
	"sort"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/iommufd"
)

// fakeKernel is the iommufd uAPI in memory: IOASes with their areas, the kernel's errno
// for overlapping, missing and unknown ranges, and a log of every map and unmap. Buffers
// are told apart by inode, as the kernel would by file.
type fakeKernel struct {
	f *os.File

	mu     sync.Mutex
	next   uint32
	ioas   map[uint32]map[uint64]area // IOAS id -> IOVA -> area
	calls  []string
	mapErr []error // the next MapFile calls fail with these, in order
	closed bool
	// beforeMap, if set, runs at the start of the next MapFile (once).
	beforeMap func()
}

type area struct {
	length uint64
	inode  uint64
	flags  iommufd.MapFlags
}

func newFakeKernel(t *testing.T) *fakeKernel {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "iommu")
	if err != nil {
		t.Fatal(err)
	}
	return &fakeKernel{f: f, ioas: map[uint32]map[uint64]area{}}
}

// fakeFD returns an FD on a new fake kernel, closed when the test ends.
func fakeFD(t *testing.T) (*FD, *fakeKernel) {
	t.Helper()
	k := newFakeKernel(t)
	d := &FD{k: k}
	t.Cleanup(func() { d.Close() })
	return d, k
}

func kerr(op string, e syscall.Errno) error {
	return &iommufd.Error{Op: op, Err: os.NewSyscallError("ioctl "+op, e)}
}

func inodeOf(f *os.File) uint64 {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func (k *fakeKernel) File() *os.File { return k.f }

func (k *fakeKernel) AllocIOAS() (uint32, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return 0, os.ErrClosed
	}
	k.next++
	k.ioas[k.next] = map[uint64]area{}
	return k.next, nil
}

func (k *fakeKernel) Destroy(id uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.ioas[id]; !ok {
		return kerr("IOMMU_DESTROY", unix.ENOENT)
	}
	delete(k.ioas, id)
	return nil
}

func (k *fakeKernel) MapFile(ioas uint32, file *os.File, start, length, iova uint64, flags iommufd.MapFlags) (uint64, error) {
	k.mu.Lock()
	hook := k.beforeMap
	k.beforeMap = nil
	k.mu.Unlock()
	if hook != nil {
		hook()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	ino := inodeOf(file)
	k.calls = append(k.calls, fmt.Sprintf("map ino=%d len=%#x iova=%#x flags=%d", ino, length, iova, flags))
	if k.closed {
		return 0, os.ErrClosed
	}
	if len(k.mapErr) > 0 {
		err := k.mapErr[0]
		k.mapErr = k.mapErr[1:]
		return 0, err
	}
	as, ok := k.ioas[ioas]
	switch {
	case !ok:
		return 0, kerr("IOMMU_IOAS_MAP_FILE", unix.ENOENT)
	case start != 0 || length == 0 || flags&(iommufd.MapReadable|iommufd.MapWriteable) == 0:
		return 0, kerr("IOMMU_IOAS_MAP_FILE", unix.EINVAL)
	}
	if flags&iommufd.MapFixedIOVA == 0 {
		iova = 0x10000000 // the kernel's pick: after every area
		for at, a := range as {
			iova = max(iova, (at+a.length+0xfff)&^0xfff)
		}
	}
	for at, a := range as {
		if iova < at+a.length && at < iova+length {
			return 0, kerr("IOMMU_IOAS_MAP_FILE", unix.EEXIST)
		}
	}
	as[iova] = area{length: length, inode: ino, flags: flags}
	return iova, nil
}

func (k *fakeKernel) Unmap(ioas uint32, iova, length uint64) (uint64, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = append(k.calls, fmt.Sprintf("unmap iova=%#x len=%#x", iova, length))
	if k.closed {
		return 0, os.ErrClosed
	}
	as, ok := k.ioas[ioas]
	if !ok {
		return 0, kerr("IOMMU_IOAS_UNMAP", unix.ENOENT)
	}
	a, ok := as[iova]
	if !ok || a.length != length {
		return 0, kerr("IOMMU_IOAS_UNMAP", unix.ENOENT)
	}
	delete(as, iova)
	return length, nil
}

func (k *fakeKernel) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	k.ioas = nil
	return k.f.Close()
}

// areas lists the areas of ioas as "iova len inode" lines, by IOVA.
func (k *fakeKernel) areas(ioas uint32) []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for at, a := range k.ioas[ioas] {
		out = append(out, fmt.Sprintf("%#x+%#x ino=%d", at, a.length, a.inode))
	}
	sort.Strings(out)
	return out
}

// takeCalls returns the calls logged since the last takeCalls.
func (k *fakeKernel) takeCalls() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	c := k.calls
	k.calls = nil
	return c
}

// failNextMap makes the next MapFile fail with errno e.
func (k *fakeKernel) failNextMap(e syscall.Errno) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.mapErr = append(k.mapErr, kerr("IOMMU_IOAS_MAP_FILE", e))
}
