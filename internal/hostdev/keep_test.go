package hostdev

import (
	"errors"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// storeKeeper is an in-process fd store: Keep stores a dup, Take hands out a dup, Forget
// closes the stored one.
type storeKeeper struct {
	mu    sync.Mutex
	fds   map[string]*os.File
	calls []string
}

func (k *storeKeeper) Take(name string) *os.File {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = append(k.calls, "take "+name)
	if f := k.fds[name]; f != nil {
		return dup(f)
	}
	return nil
}

func (k *storeKeeper) TakePrefix(prefix string) (string, *os.File) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for n, f := range k.fds {
		if strings.HasPrefix(n, prefix) {
			return n, dup(f)
		}
	}
	return "", nil
}

func (k *storeKeeper) Keep(name string, f *os.File) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = append(k.calls, "keep "+name)
	k.fds[name] = dup(f)
	return nil
}

func (k *storeKeeper) Forget(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls = append(k.calls, "forget "+name)
	if f := k.fds[name]; f != nil {
		f.Close()
		delete(k.fds, name)
	}
	return nil
}

func dup(f *os.File) *os.File {
	c, err := os.Open("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
	if err != nil {
		panic(err)
	}
	return c
}

func TestKeeperDetach(t *testing.T) {
	testutil.FDLeakCheck(t)
	tr := tree(t, "e1000e")
	fv := &fakeVFIO{}
	k := &storeKeeper{fds: map[string]*os.File{}}
	d, err := openFake(t, tr, Options{ManagedBind: true, Keeper: k}, fv, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Export, the kept dma-buf and AdoptBuffer need a real dma-buf: hostdev_vm_test.go.
	if _, err := d.AdoptBuffer(12345); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("AdoptBuffer of a buffer never kept = %v, want ErrNotFound", err)
	}

	// Detach keeps the device where it is: no driver restore, no close of kept fds.
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if p, _ := tr.Sysfs().Device(edu); p.Driver != pci.VFIODriver {
		t.Errorf("after Detach: driver %q, want it left on %s", p.Driver, pci.VFIODriver)
	}
	calls := fv.Calls()
	if diff := cmp.Diff("detach", calls[len(calls)-1]); diff != "" || slices.Contains(calls, "close") {
		t.Errorf("vfio calls %v: want detach last and no close", calls)
	}
	if err := d.Close(); err != nil {
		t.Errorf("Close after Detach: %v", err)
	}
	// The test tree still has the device on vfio-pci; put the original driver back.
	if err := tr.Sysfs().RestoreDriver(edu, "e1000e"); err != nil {
		t.Fatal(err)
	}
}
