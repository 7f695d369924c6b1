package vfio

import (
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// fakeKeeper is an fd store in this process, like systemd's: Keep stores a dup, Forget
// closes it, and Take hands out a dup of a stored fd (a restarted process receives copies;
// the store keeps its own until told to forget them).
type fakeKeeper struct {
	mu   sync.Mutex
	fds  map[string]*os.File
	log  []string // "keep NAME", "forget NAME", "take NAME"
	fail error
}

func newFakeKeeper() *fakeKeeper { return &fakeKeeper{fds: map[string]*os.File{}} }

func (k *fakeKeeper) Take(name string) *os.File {
	k.mu.Lock()
	defer k.mu.Unlock()
	f := k.fds[name]
	if f == nil {
		return nil
	}
	k.log = append(k.log, "take "+name)
	c, err := dupFile(f)
	if err != nil {
		panic(err)
	}
	return c
}

func (k *fakeKeeper) TakePrefix(prefix string) (string, *os.File) {
	k.mu.Lock()
	var name string
	for n := range k.fds {
		if strings.HasPrefix(n, prefix) {
			name = n
		}
	}
	k.mu.Unlock()
	if name == "" {
		return "", nil
	}
	return name, k.Take(name)
}

func (k *fakeKeeper) Keep(name string, f *os.File) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.fail != nil {
		return k.fail
	}
	if _, dup := k.fds[name]; dup {
		panic("kept twice: " + name)
	}
	c, err := dupFile(f)
	if err != nil {
		return err
	}
	k.fds[name] = c
	k.log = append(k.log, "keep "+name)
	return nil
}

func (k *fakeKeeper) Forget(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if f := k.fds[name]; f != nil {
		f.Close()
		delete(k.fds, name)
	}
	k.log = append(k.log, "forget "+name)
	return nil
}

func (k *fakeKeeper) names() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]string, 0, len(k.fds))
	for n := range k.fds {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func (k *fakeKeeper) closeAll() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for n, f := range k.fds {
		f.Close()
		delete(k.fds, n)
	}
}

func dupFile(f *os.File) (*os.File, error) {
	c, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nf *os.File
	var derr error
	c.Control(func(fd uintptr) {
		var d int
		d, derr = dupCloexec(int(fd))
		if derr == nil {
			nf = os.NewFile(uintptr(d), f.Name())
		}
	})
	return nf, derr
}

func TestKeeperGroup(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	k := newFakeKeeper()
	defer k.closeAll()
	open := func() *Device {
		t.Helper()
		d, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "group", Sysfs: tr.Sysfs(), DevRoot: "/fakedev", Keeper: k})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d := open()
	want := []string{"vfio-container.3", "vfio-device.0000_00_03.0", "vfio-group.3"}
	if got := k.names(); !slices.Equal(got, want) {
		t.Fatalf("kept after open: %v, want %v", got, want)
	}
	if d.Restored() {
		t.Error("a fresh open reports Restored")
	}

	// A device cycle drops the kept device fd before closing its own, then keeps the new.
	k.log = nil
	if err := d.Reopen(); err != nil {
		t.Fatal(err)
	}
	if want := []string{"forget vfio-device.0000_00_03.0", "keep vfio-device.0000_00_03.0"}; !slices.Equal(k.log, want) {
		t.Errorf("Reopen: keeper calls %v, want %v", k.log, want)
	}

	// Detach leaves everything kept; the next open takes it back without opening anything.
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := k.names(); !slices.Equal(got, want) {
		t.Fatalf("kept after Detach: %v, want %v", got, want)
	}
	g0, _, n0 := be.counts()
	d = open()
	if !d.Restored() {
		t.Error("open with kept fds does not report Restored")
	}
	if g, _, n := be.counts(); g[3] != g0[3] || n != n0 {
		t.Errorf("open with kept fds opened group %d→%d times, device %d→%d", g0[3], g[3], n0, n)
	}
	// The taken fds are kept again only when reopened; Close forgets whatever is kept.
	k.log = nil
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if got := k.names(); len(got) != 0 {
		t.Errorf("kept after Close: %v", got)
	}
	if want := []string{"forget vfio-device.0000_00_03.0", "forget vfio-group.3", "forget vfio-container.3"}; !slices.Equal(k.log, want) {
		t.Errorf("Close: keeper calls %v, want %v", k.log, want)
	}
}

func TestKeeperCdev(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, true)
	r := newRegistry(be)
	k := newFakeKeeper()
	defer k.closeAll()
	d, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "cdev", Sysfs: tr.Sysfs(), DevRoot: "/fakedev", Keeper: k})
	if err != nil {
		t.Fatal(err)
	}
	_, ioas, _ := d.IOMMU()
	want := []string{iommufdKeepName(ioas), "vfio-device.0000_00_03.0"}
	if got := k.names(); !slices.Equal(got, want) {
		t.Fatalf("kept after open: %v, want %v", got, want)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	d, err = r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "cdev", Sysfs: tr.Sysfs(), DevRoot: "/fakedev", Keeper: k})
	if err != nil {
		t.Fatal(err)
	}
	if _, got, _ := d.IOMMU(); !d.Restored() || got != ioas {
		t.Errorf("reopened from the keeper: restored %v, ioas %d; want true, %d", d.Restored(), got, ioas)
	}
	if _, iommu, _ := be.counts(); iommu != 1 {
		t.Errorf("iommufd opened %d times, want once", iommu)
	}
	closeOK(t, d)
}

func TestKeeperFailureFailsOpen(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	k := newFakeKeeper()
	k.fail = os.ErrPermission
	_, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "group", Sysfs: tr.Sysfs(), DevRoot: "/fakedev", Keeper: k})
	if err == nil {
		t.Fatal("open succeeded although its fds could not be kept")
	}
	if got := k.names(); len(got) != 0 {
		t.Errorf("kept after a failed open: %v", got)
	}
}

func dupCloexec(fd int) (int, error) { return unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0) }

// TestReopenWaitsForKeptCopy: with a Keeper, a group-mode Reopen waits (leaving and
// rejoining the container, EBUSY while the old file is open anywhere) before it opens
// the device again; without one it does not need to.
func TestReopenWaitsForKeptCopy(t *testing.T) {
	testutil.FDLeakCheck(t)
	be, tr := newFakeBackend(t), fakeTree(t, false)
	r := newRegistry(be)
	k := newFakeKeeper()
	defer k.closeAll()
	d, err := r.open(pci.MustParseAddress("0000:00:03.0"), OpenOptions{Mode: "group", Sysfs: tr.Sysfs(), DevRoot: "/fakedev", Keeper: k})
	if err != nil {
		t.Fatal(err)
	}
	be.set(func(b *fakeBackend) { b.busy = 3 })
	if err := d.Reopen(); err != nil {
		t.Fatal(err)
	}
	be.set(func(b *fakeBackend) {
		if b.rejoins != 4 || b.busy != 0 {
			t.Errorf("rejoin tried %d times (%d EBUSY left), want 4: three EBUSY, then success", b.rejoins, b.busy)
		}
	})
	closeOK(t, d)

	plain := mustOpen(t, r, tr, "0000:00:03.0", "group")
	be.set(func(b *fakeBackend) { b.rejoins = 0 })
	if err := plain.Reopen(); err != nil {
		t.Fatal(err)
	}
	be.set(func(b *fakeBackend) {
		if b.rejoins != 0 {
			t.Errorf("Reopen without a Keeper left and rejoined the container %d times", b.rejoins)
		}
	})
	closeOK(t, plain)
}
