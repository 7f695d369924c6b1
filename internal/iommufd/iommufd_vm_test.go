//go:build vmtest

package iommufd

import (
	"errors"
	"os"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// Runs as root inside the test/vm guest; MMIOBROKER_VM_KERNEL is "stock" (no iommufd) or
// "iommufd". The dma-buf import paths are covered by internal/vfio's K6 and K7.
func TestVMMapMemfd(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	kernel := os.Getenv("MMIOBROKER_VM_KERNEL")
	if kernel == "" {
		t.Skip("MMIOBROKER_VM_KERNEL is not set: run inside the VM rig (make test-vm)")
	}
	testutil.FDLeakCheck(t)
	d, err := Open("")
	if kernel != "iommufd" {
		if !errors.Is(err, errdefs.ErrNotSupported) {
			t.Fatalf("Open on kernel %s = %v, want ErrNotSupported", kernel, err)
		}
		t.Skipf("kernel %s has no CONFIG_IOMMUFD; Open checked to say so", kernel)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	ioas, err := d.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	page := uint64(os.Getpagesize())
	mfd, err := unix.MemfdCreate("mmb-iommufd-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(mfd), "memfd")
	defer mem.Close()
	if err := mem.Truncate(int64(2 * page)); err != nil {
		t.Fatal(err)
	}

	const fixed = 0x100000
	iova, err := d.MapFile(ioas, mem, 0, 2*page, fixed, MapFixedIOVA|MapReadable|MapWriteable)
	if err != nil {
		t.Fatalf("MapFile(fixed): %v", err)
	}
	if iova != fixed {
		t.Errorf("fixed mapping at %#x, want %#x", iova, fixed)
	}
	if _, err := d.MapFile(ioas, mem, 0, page, fixed, MapFixedIOVA|MapReadable); !errors.Is(err, unix.EEXIST) {
		t.Errorf("MapFile over a used IOVA = %v, want EEXIST", err)
	}
	auto, err := d.MapFile(ioas, mem, page, page, 0, MapReadable)
	if err != nil {
		t.Fatalf("MapFile(kernel-chosen IOVA): %v", err)
	}
	if auto%page != 0 {
		t.Errorf("kernel-chosen IOVA %#x not page aligned", auto)
	}
	if _, err := d.MapFile(ioas, mem, 0, page, 0, 0); !errors.Is(err, unix.EINVAL) {
		t.Errorf("MapFile without READABLE/WRITEABLE = %v, want EINVAL", err)
	}
	if _, err := d.MapFile(ioas+1000, mem, 0, page, 0, MapReadable); !errors.Is(err, unix.ENOENT) {
		t.Errorf("MapFile into a missing IOAS = %v, want ENOENT", err)
	}
	if n, err := d.Unmap(ioas, fixed, 2*page); err != nil || n != 2*page {
		t.Errorf("Unmap = %d, %v; want %d", n, err, 2*page)
	}
	if n, err := d.Unmap(ioas, 0, ^uint64(0)); err != nil || n != page {
		t.Errorf("Unmap(everything) = %d, %v; want %d", n, err, page)
	}
	if err := d.Destroy(ioas); err != nil {
		t.Errorf("Destroy: %v", err)
	}
	if err := d.Destroy(ioas); !errors.Is(err, unix.ENOENT) {
		t.Errorf("second Destroy = %v, want ENOENT", err)
	}
}
