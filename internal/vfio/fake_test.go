package vfio

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/pci/pcitest"
)

// fakeBackend stands in for the kernel: groups and containers are /dev/null, the iommufd
// is a regular file, and a device fd is a regular file holding a 256-byte config space at
// fakeCfgOffset. ioctls on these files fail with ENOTTY, which the tests use to check
// error wrapping.
type fakeBackend struct {
	dir string

	mu          sync.Mutex
	groupOpens  map[int]int // guarded by mu
	iommuOpens  int         // guarded by mu
	deviceOpens int         // guarded by mu
	failGroup   error       // guarded by mu
	failIOMMU   error       // guarded by mu
	failDevice  error       // guarded by mu
	busy        int         // guarded by mu; rejoin answers EBUSY this many times
	rejoins     int         // guarded by mu
}

const fakeCfgOffset = 0x1000

func newFakeBackend(t *testing.T) *fakeBackend {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "iommu"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return &fakeBackend{dir: dir, groupOpens: make(map[int]int)}
}

func (b *fakeBackend) set(fn func(b *fakeBackend)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	fn(b)
}

func (b *fakeBackend) counts() (groups map[int]int, iommu, devices int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	g := make(map[int]int)
	for k, v := range b.groupOpens {
		g[k] = v
	}
	return g, b.iommuOpens, b.deviceOpens
}

func (b *fakeBackend) openGroup(devRoot string, n int) (*os.File, *os.File, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failGroup != nil {
		return nil, nil, b.failGroup
	}
	g, err := os.Open(os.DevNull)
	if err != nil {
		return nil, nil, err
	}
	c, err := os.Open(os.DevNull)
	if err != nil {
		g.Close()
		return nil, nil, err
	}
	b.groupOpens[n]++
	return g, c, nil
}

func (b *fakeBackend) openIOMMUFD(devRoot string) (*iommufd.FD, uint32, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failIOMMU != nil {
		return nil, 0, b.failIOMMU
	}
	fd, err := iommufd.Open(b.dir)
	if err != nil {
		return nil, 0, err
	}
	b.iommuOpens++
	return fd, 1, nil
}

func (b *fakeBackend) device(name string) (*os.File, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failDevice != nil {
		return nil, b.failDevice
	}
	path := filepath.Join(b.dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err == nil && fi.Size() == 0 {
		cfg := make([]byte, 256)
		copy(cfg, []byte{0x34, 0x12, 0xe8, 0x11, 0x07, 0x01}) // edu; COMMAND = IO|MEM|MASTER|SERR
		if _, err := f.WriteAt(cfg, fakeCfgOffset); err != nil {
			f.Close()
			return nil, err
		}
	}
	b.deviceOpens++
	return f, nil
}

func (b *fakeBackend) groupDevice(g *groupRef, bdf string) (*os.File, error) {
	return b.device("group-" + bdf)
}

func (b *fakeBackend) cdevDevice(i *iommuRef, path string) (*os.File, error) {
	return b.device("cdev-" + filepath.Base(path))
}

func (b *fakeBackend) checkGroup(*os.File) error { return nil }

func (b *fakeBackend) rejoin(*groupRef) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rejoins++
	if b.busy > 0 {
		b.busy--
		return unix.EBUSY
	}
	return nil
}

func (b *fakeBackend) query(f *os.File) (deviceState, error) {
	var st deviceState
	st.info = DeviceInfo{Flags: VFIO_DEVICE_FLAGS_PCI, NumRegions: 9, NumIRQs: 5}
	st.cfg = RegionInfo{Index: VFIO_PCI_CONFIG_REGION_INDEX, Flags: 3, Size: 256, Offset: fakeCfgOffset}
	for i := range st.bars {
		st.bars[i].Index = i
	}
	st.bars[0].Size = 1 << 20
	st.bars[1].Size = 0x100 // an I/O bar in the sysfs snapshot
	st.bars[2].Size = 1 << 20
	return st, nil
}

// fakeTree returns a sysfs tree with edu-like devices: 00:03.0 and 00:04.0 in group 3,
// 00:05.0 in group 4, all bound to vfio-pci; cdev selects whether they have VFIO cdevs.
func fakeTree(t *testing.T, cdev bool) *pcitest.Tree {
	tr := pcitest.New(t)
	for _, d := range []struct {
		bdf   string
		group int
	}{{"0000:00:03.0", 3}, {"0000:00:04.0", 3}, {"0000:00:05.0", 4}} {
		tr.AddDevice(t, pcitest.DeviceSpec{
			Address: pci.MustParseAddress(d.bdf), Vendor: 0x1234, DeviceID: 0x11e8, Class: 0xff0000,
			Driver: pci.VFIODriver, IOMMUGroup: d.group, Cdev: cdev,
			BARs: []pci.BAR{
				{Index: 0, Start: 0xfe000000, Size: 1 << 20, Flags: pci.IORESOURCE_MEM},
				{Index: 1, Start: 0xc000, Size: 0x100, Flags: pci.IORESOURCE_IO},
				{Index: 2, Start: 0xfd000000, Size: 1 << 20, Flags: pci.IORESOURCE_MEM | pci.IORESOURCE_PREFETCH},
			},
		})
	}
	return tr
}

func (r *registry) snapshot() (groups map[groupKey]int, iommus map[string]int, devices []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	groups = make(map[groupKey]int)
	for k, g := range r.groups {
		groups[k] = g.refs
	}
	iommus = make(map[string]int)
	for k, i := range r.iommus {
		iommus[k] = i.refs
	}
	for b := range r.devices {
		devices = append(devices, b)
	}
	return groups, iommus, devices
}

func assertEmpty(t *testing.T, r *registry) {
	t.Helper()
	g, i, d := r.snapshot()
	if len(g) != 0 || len(i) != 0 || len(d) != 0 {
		t.Errorf("registry not empty: groups %v iommus %v devices %v", g, i, d)
	}
}

func mustOpen(t *testing.T, r *registry, tr *pcitest.Tree, bdf, mode string) *Device {
	t.Helper()
	d, err := r.open(pci.MustParseAddress(bdf), OpenOptions{Mode: mode, Sysfs: tr.Sysfs(), DevRoot: "/fakedev"})
	if err != nil {
		t.Fatalf("open %s: %v", bdf, err)
	}
	return d
}

func closeOK(t *testing.T, d *Device) {
	t.Helper()
	if err := d.Close(); err != nil {
		t.Errorf("close %s: %v", d.bdf, err)
	}
}
