//go:build vmtest

package iommufd_test

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/client/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestVMKernel runs the public API against the guest kernel's iommufd with a memfd (the
// rig's e2e TestE2EImport does it with VFIO dma-bufs): the errno of each refusal comes
// through. On a kernel without iommufd, Open says so, and the examples are skipped too.
func TestVMKernel(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	kernel := os.Getenv("MMIOBROKER_VM_KERNEL")
	if kernel == "" {
		t.Skip("MMIOBROKER_VM_KERNEL is not set: run inside the VM rig (make test-vm)")
	}
	testutil.FDLeakCheck(t)
	fd, err := iommufd.Open("")
	if kernel != "iommufd" {
		if !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("Open on kernel %s = %v, want ErrUnsupported", kernel, err)
		}
		t.Skipf("kernel %s has no iommufd (Open: %v): the examples are skipped as well", kernel, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	ioas, err := fd.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	mfd, err := unix.MemfdCreate("client-iommufd-vm", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(mfd), "memfd")
	defer mem.Close()
	if err := mem.Truncate(64 << 10); err != nil {
		t.Fatal(err)
	}

	at := iommufd.MapOptions{IOVA: 0x100000, Fixed: true}
	m, err := ioas.Map(mem, at)
	if err != nil || m.IOVA != 0x100000 || m.Length != 64<<10 || m.IOAS != ioas.ID() {
		t.Fatalf("Map(fixed) = %+v, %v", m, err)
	}
	if _, err := ioas.Map(mem, iommufd.MapOptions{IOVA: 0x108000, Fixed: true}); !errors.Is(err, unix.EEXIST) {
		t.Errorf("Map over a used range = %v, want EEXIST", err)
	}
	ro, err := ioas.Map(mem, iommufd.MapOptions{ReadOnly: true})
	if err != nil || ro.IOVA == m.IOVA || ro.IOVA%4096 != 0 {
		t.Errorf("Map(read-only, the kernel's IOVA) = %+v, %v", ro, err)
	}
	for _, mm := range []iommufd.Mapping{m, ro} {
		if err := ioas.Unmap(mm); err != nil {
			t.Errorf("Unmap(%+v): %v", mm, err)
		}
	}
	if err := ioas.Unmap(m); !errors.Is(err, unix.ENOENT) {
		t.Errorf("second Unmap = %v, want ENOENT", err)
	}
	if err := ioas.Destroy(); err != nil {
		t.Fatal(err)
	}
	if _, err := ioas.Map(mem, at); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Map into a destroyed IOAS = %v, want ENOENT", err)
	}
	if _, err := fd.IOAS(ioas.ID()+100).Map(mem, at); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Map into an IOAS that never existed = %v, want ENOENT", err)
	}
}
