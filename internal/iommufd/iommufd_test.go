package iommufd

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRequestNumbers(t *testing.T) {
	for _, tt := range []struct {
		name      string
		got, want uintptr
	}{
		{"IOMMU_DESTROY", IOMMU_DESTROY, ioctl.IO(';', 0x80)},
		{"IOMMU_IOAS_ALLOC", IOMMU_IOAS_ALLOC, ioctl.IO(';', 0x81)},
		{"IOMMU_IOAS_MAP", IOMMU_IOAS_MAP, ioctl.IO(';', 0x85)},
		{"IOMMU_IOAS_UNMAP", IOMMU_IOAS_UNMAP, ioctl.IO(';', 0x86)},
		{"IOMMU_IOAS_MAP_FILE", IOMMU_IOAS_MAP_FILE, ioctl.IO(';', 0x8f)},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
}

func TestOpenMissing(t *testing.T) {
	testutil.FDLeakCheck(t)
	_, err := Open(t.TempDir())
	if !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Open(empty dir) = %v, want ErrNotSupported and ErrNotExist", err)
	}
	var ie *Error
	if !errors.As(err, &ie) || ie.Op != "open" {
		t.Errorf("error %v is not an *Error{Op: open}", err)
	}
}

// A regular file stands in for /dev/iommu: every request fails with ENOTTY, which shows
// the errno survives the wrapping, and Close is idempotent.
func TestFakeDevice(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "iommu"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.AllocIOAS(); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("AllocIOAS = %v, want ENOTTY", err)
	}
	if err := d.Destroy(1); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Destroy = %v, want ENOTTY", err)
	}
	if _, err := d.MapFile(1, d.File(), 0, 4096, 0, MapReadable); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("MapFile = %v, want ENOTTY", err)
	} else if got, want := err.Error(), "iommufd: map-file ioas 1 [0x0,+0x1000): ioctl IOMMU_IOAS_MAP_FILE: inappropriate ioctl for device"; got != want {
		t.Errorf("MapFile error = %q, want %q", got, want)
	}
	if _, err := d.Unmap(1, 0, 4096); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("Unmap = %v, want ENOTTY", err)
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
