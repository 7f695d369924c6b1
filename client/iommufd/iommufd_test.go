package iommufd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

const page = 4096

func memfd(t *testing.T, size int64) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("iommufd-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd:iommufd-test")
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestOpenMissing(t *testing.T) {
	testutil.FDLeakCheck(t)
	_, err := Open(filepath.Join(t.TempDir(), "iommu"))
	if !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("Open(missing node) = %v, want ErrUnsupported, ErrNotExist and ENOENT", err)
	}
}

// A regular file stands in for /dev/iommu: every request reaches the kernel and fails
// with ENOTTY, which shows the errno survives; Close is idempotent.
func TestOpenNotIommufd(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := filepath.Join(t.TempDir(), "iommu")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if d.File() == nil || d.File().Name() != path {
		t.Errorf("File() = %v, want the opened %s", d.File(), path)
	}
	if _, err := d.AllocIOAS(); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("AllocIOAS = %v, want ENOTTY", err)
	}
	ioas := d.IOAS(7)
	if _, err := ioas.Map(memfd(t, page), MapOptions{}); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Map = %v, want ENOTTY", err)
	}
	if err := ioas.Unmap(Mapping{IOAS: 7, IOVA: 0, Length: page}); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Unmap = %v, want ENOTTY", err)
	}
	if err := ioas.Destroy(); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Destroy = %v, want ENOTTY", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := d.AllocIOAS(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("AllocIOAS after Close = %v, want os.ErrClosed", err)
	}
}

func TestFromFileTakesOwnership(t *testing.T) {
	testutil.FDLeakCheck(t)
	f, err := os.CreateTemp(t.TempDir(), "iommu")
	if err != nil {
		t.Fatal(err)
	}
	d := FromFile(f)
	if d.File() != f {
		t.Fatal("File() is not the file given")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Stat(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("the file after FD.Close: Stat = %v, want os.ErrClosed", err)
	}
}

// Map maps the whole buffer with the flags MapOptions ask for; the kernel picks the IOVA
// unless Fixed.
func TestMapFlagsAndLength(t *testing.T) {
	d, k := fakeFD(t)
	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	buf := memfd(t, 3*page)
	ino := inodeOf(buf)

	m, err := ioas.Map(buf, MapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := (Mapping{IOAS: ioas.ID(), IOVA: 0x10000000, Length: 3 * page}); m != want {
		t.Errorf("Map (kernel's IOVA) = %+v, want %+v", m, want)
	}
	fixed, err := ioas.Map(buf, MapOptions{IOVA: 0x100000, Fixed: true, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if fixed.IOVA != 0x100000 || fixed.Length != 3*page {
		t.Errorf("Map (fixed) = %+v", fixed)
	}
	if diff := cmp.Diff([]string{
		fmt.Sprintf("map ino=%d len=0x3000 iova=0x0 flags=6", ino),      // READABLE|WRITEABLE
		fmt.Sprintf("map ino=%d len=0x3000 iova=0x100000 flags=5", ino), // FIXED_IOVA|READABLE
	}, k.takeCalls()); diff != "" {
		t.Errorf("ioctls (-want +got):\n%s", diff)
	}
	// The range is taken now: the kernel's EEXIST comes through.
	if _, err := ioas.Map(buf, MapOptions{IOVA: 0x101000, Fixed: true}); !errors.Is(err, unix.EEXIST) {
		t.Errorf("Map over a used range = %v, want EEXIST", err)
	}
	for _, m := range []Mapping{m, fixed} {
		if err := ioas.Unmap(m); err != nil {
			t.Errorf("Unmap(%+v): %v", m, err)
		}
	}
	if got := k.areas(ioas.ID()); len(got) != 0 {
		t.Errorf("areas after unmapping both: %v", got)
	}
	if err := ioas.Unmap(m); !errors.Is(err, unix.ENOENT) {
		t.Errorf("second Unmap = %v, want ENOENT", err)
	}
}

func TestMapRefusesBeforeTheKernel(t *testing.T) {
	d, k := fakeFD(t)
	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ioas.Map(nil, MapOptions{}); err == nil {
		t.Error("Map(nil) succeeded")
	}
	if _, err := ioas.Map(memfd(t, 0), MapOptions{}); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("Map(empty buffer) = %v, want an error saying it is empty", err)
	}
	closed := memfd(t, page)
	closed.Close()
	if _, err := ioas.Map(closed, MapOptions{}); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Map(closed file) = %v, want os.ErrClosed", err)
	}
	if err := ioas.Unmap(Mapping{}); err == nil {
		t.Error("Unmap(zero Mapping) succeeded")
	}
	if err := ioas.Unmap(Mapping{IOAS: ioas.ID() + 1, Length: page}); err == nil {
		t.Error("Unmap of another IOAS's mapping succeeded")
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("ioctls issued: %v", calls)
	}
}

// The kernel refuses a dma-buf it cannot import with EOPNOTSUPP; the error keeps the
// errno and says what MAP_FILE takes.
func TestMapNotImportable(t *testing.T) {
	d, k := fakeFD(t)
	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	k.failNextMap(unix.EOPNOTSUPP)
	_, err = ioas.Map(memfd(t, page), MapOptions{})
	if !errors.Is(err, unix.EOPNOTSUPP) || !strings.Contains(err.Error(), "of one range") {
		t.Errorf("Map = %v, want EOPNOTSUPP with a hint", err)
	}
}

func lease(t *testing.T, gen uint64, ranges ...*brokerv1.Range) *client.Lease {
	t.Helper()
	return &client.Lease{ID: "0123456789abcdef01234567", File: memfd(t, 4*page),
		Lease: &brokerv1.Lease{Id: "0123456789abcdef01234567", Ranges: ranges, Generation: gen},
		Claim: client.ClaimInfo{Generation: gen, Size: 4 * page}}
}

func TestMapLease(t *testing.T) {
	d, k := fakeFD(t)
	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	two := lease(t, 1, &brokerv1.Range{Offset: 0, Length: 2 * page}, &brokerv1.Range{Offset: 8 * page, Length: 2 * page})
	if _, err := ioas.MapLease(two, MapOptions{}); !errors.Is(err, ErrMultiRange) || !strings.Contains(err.Error(), "2 ranges") {
		t.Errorf("MapLease(2 ranges) = %v, want ErrMultiRange", err)
	}
	if _, err := ioas.MapLease(nil, MapOptions{}); err == nil {
		t.Error("MapLease(nil) succeeded")
	}
	if calls := k.takeCalls(); len(calls) != 0 {
		t.Errorf("ioctls for refused leases: %v", calls)
	}

	one := lease(t, 3, &brokerv1.Range{Offset: 8 * page, Length: 4 * page})
	m, err := ioas.MapLease(one, MapOptions{IOVA: 0x200000, Fixed: true})
	if err != nil {
		t.Fatal(err)
	}
	if want := (Mapping{IOAS: ioas.ID(), IOVA: 0x200000, Length: 4 * page, Generation: 3}); m != want {
		t.Errorf("MapLease = %+v, want %+v", m, want)
	}
	if got, want := k.areas(ioas.ID()), []string{fmt.Sprintf("0x200000+0x4000 ino=%d", inodeOf(one.File))}; !cmp.Equal(got, want) {
		t.Errorf("areas %v, want %v", got, want)
	}
	// A revoked dma-buf: the kernel's ENODEV, with the lease named.
	k.failNextMap(unix.ENODEV)
	if _, err := ioas.MapLease(one, MapOptions{}); !errors.Is(err, unix.ENODEV) || !strings.Contains(err.Error(), "lease 0123456789abcdef01234567 generation 3") {
		t.Errorf("MapLease of a revoked fd = %v, want ENODEV naming the lease", err)
	}
}
