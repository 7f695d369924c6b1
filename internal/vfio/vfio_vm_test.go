//go:build vmtest

package vfio

import (
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// These tests run as root inside the QEMU guest of test/vm against real vfio-pci devices:
// edu (BAR0 1 MiB of registers; ident 0x010000ed at offset 0), ivshmem-plain (BAR0 256 B of
// registers, BAR2 1 MiB of RAM) and pci-testdev (BAR1 I/O ports), all bound to vfio-pci.
// MMIOBROKER_VM_KERNEL says which kernel runs: "stock" (Debian's, no iommufd) or
// "iommufd" (the same source with IOMMUFD and VFIO_DEVICE_CDEV).

const (
	mib           = 1 << 20
	dmaBufMagic   = 0x444d4142 // DMA_BUF_MAGIC, statfs f_type of a dma-buf
	eduIdent      = 0x010000ed
	kernelIOMMUFD = "iommufd"
)

func vmEnv(t *testing.T, name string) pci.Address {
	t.Helper()
	testutil.SkipUnlessRoot(t)
	s := os.Getenv(name)
	if s == "" {
		t.Skipf("%s is not set: run inside the VM rig (make test-vm)", name)
	}
	a, err := pci.ParseAddress(s)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return a
}

func vmKernel() string { return os.Getenv("MMIOBROKER_VM_KERNEL") }

// vmModes lists the open modes the running kernel offers.
func vmModes() []Mode {
	if vmKernel() == kernelIOMMUFD {
		return []Mode{ModeGroup, ModeCdev}
	}
	return []Mode{ModeGroup}
}

func vmOpen(t *testing.T, a pci.Address, mode Mode) *Device {
	t.Helper()
	d, err := Open(a, OpenOptions{Mode: string(mode)})
	if err != nil {
		t.Fatalf("Open(%s, %s): %v", a, mode, err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if err := d.SetMemoryEnable(true); err != nil {
		t.Fatalf("SetMemoryEnable(true): %v", err)
	}
	return d
}

// exportRaw sends req as it is, bypassing the Go-side checks; for tests of the kernel's.
func (d *Device) exportRaw(req dmaBufRequest) (*os.File, error) {
	var f *os.File
	err := d.use("export-dma-buf", func(file *os.File) error {
		var err error
		f, err = d.exportLocked(file, req)
		return err
	})
	return f, err
}

// readBAR preads b at off of BAR bar through the device fd.
func (d *Device) readBAR(bar int, off int64, b []byte) error {
	return d.use("read-bar", func(f *os.File) error { return regionIO(f, d.bars[bar], off, b, false) })
}

func readU32(t *testing.T, d *Device, bar int, off int64) uint32 {
	t.Helper()
	var b [4]byte
	if err := d.readBAR(bar, off, b[:]); err != nil {
		t.Fatalf("read BAR%d+%#x: %v", bar, off, err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

// checkDMABuf checks that f is a dma-buf of size bytes with close-on-exec set.
func checkDMABuf(t *testing.T, f *os.File, size int64) {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size {
		t.Errorf("dma-buf size %d, want %d", fi.Size(), size)
	}
	var sfs unix.Statfs_t
	var fl int
	err = withFD(f, func(fd int) error {
		if err := unix.Fstatfs(fd, &sfs); err != nil {
			return err
		}
		fl, err = unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if sfs.Type != dmaBufMagic {
		t.Errorf("statfs type %#x, want DMA_BUF_MAGIC %#x", sfs.Type, dmaBufMagic)
	}
	if fl&unix.FD_CLOEXEC == 0 {
		t.Error("dma-buf fd is not close-on-exec")
	}
}

func withFD(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func TestK1GroupContainerOpen(t *testing.T) {
	edu1, edu2 := vmEnv(t, "MMIOBROKER_VM_EDU1"), vmEnv(t, "MMIOBROKER_VM_EDU2")
	testutil.FDLeakCheck(t)
	d := vmOpen(t, edu1, ModeGroup)
	if d.Mode() != ModeGroup {
		t.Fatalf("mode %s", d.Mode())
	}
	info := d.Info()
	if !info.PCI() || info.NumRegions != VFIO_PCI_NUM_REGIONS || info.NumIRQs != 5 {
		t.Errorf("info %+v: want PCI flag, 9 regions, 5 irqs", info)
	}
	bar0, err := d.Region(0)
	if err != nil {
		t.Fatal(err)
	}
	if bar0.Size != mib || !bar0.Readable() || !bar0.Writable() || !bar0.Mappable() || bar0.Offset != 0 {
		t.Errorf("BAR0 %+v: want 1 MiB, read/write/mmap, offset 0", bar0)
	}
	if bar1, err := d.Region(1); err != nil || bar1.Size != 0 || bar1.Flags != 0 {
		t.Errorf("BAR1 %+v, %v: want unimplemented", bar1, err)
	}
	cfg, err := d.Region(VFIO_PCI_CONFIG_REGION_INDEX)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Offset != 7<<40 || (cfg.Size != 256 && cfg.Size != 4096) || cfg.Mappable() {
		t.Errorf("config region %+v", cfg)
	}
	var id [4]byte
	if err := d.ReadConfig(PCI_VENDOR_ID, id[:]); err != nil {
		t.Fatal(err)
	}
	if v, dev := binary.LittleEndian.Uint16(id[0:]), binary.LittleEndian.Uint16(id[2:]); v != 0x1234 || dev != 0x11e8 {
		t.Errorf("config vendor:device %04x:%04x, want 1234:11e8", v, dev)
	}
	if got := readU32(t, d, 0, 0); got != eduIdent {
		t.Errorf("BAR0+0 = %#x, want edu ident %#x", got, eduIdent)
	}
	if err := d.DMABufSupported(); err != nil {
		t.Errorf("DMABufSupported = %v on Linux 7.2", err)
	}

	// A second device of another group, and a reopen: the group stays open.
	d2 := vmOpen(t, edu2, ModeGroup)
	if d2.grp == d.grp {
		t.Log("both edu devices share an IOMMU group")
	}
	grp := d.grp
	if err := d.Reopen(); err != nil {
		t.Fatalf("Reopen: %v", err)
	}
	if d.grp != grp {
		t.Error("Reopen replaced the group")
	}
	if err := d.SetMemoryEnable(true); err != nil {
		t.Fatal(err)
	}
	if got := readU32(t, d, 0, 0); got != eduIdent {
		t.Errorf("after Reopen BAR0+0 = %#x", got)
	}

	// The same device cannot be open twice in one process.
	if _, err := Open(edu1, OpenOptions{Mode: "group"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Open = %v, want ErrAlreadyExists", err)
	}
}

func TestK2CdevIommufdOpen(t *testing.T) {
	edu1, edu2 := vmEnv(t, "MMIOBROKER_VM_EDU1"), vmEnv(t, "MMIOBROKER_VM_EDU2")
	if vmKernel() != kernelIOMMUFD {
		// The stock kernel has neither the cdev nor /dev/iommu: auto must pick group, and
		// cdev must say why it cannot work.
		_, err := Open(edu1, OpenOptions{Mode: "cdev"})
		if !errors.Is(err, errdefs.ErrNotSupported) {
			t.Errorf("cdev Open on the stock kernel = %v, want ErrNotSupported", err)
		}
		d := vmOpen(t, edu1, ModeAuto)
		if d.Mode() != ModeGroup {
			t.Errorf("auto mode on the stock kernel = %s, want group", d.Mode())
		}
		t.Skip("kernel " + vmKernel() + " has no CONFIG_IOMMUFD/CONFIG_VFIO_DEVICE_CDEV; cdev checked to be refused")
	}
	testutil.FDLeakCheck(t)
	d := vmOpen(t, edu1, ModeAuto)
	if d.Mode() != ModeCdev {
		t.Fatalf("auto mode on the iommufd kernel = %s, want cdev", d.Mode())
	}
	if info := d.Info(); !info.PCI() || info.NumRegions != VFIO_PCI_NUM_REGIONS {
		t.Errorf("info %+v", info)
	}
	if got := readU32(t, d, 0, 0); got != eduIdent {
		t.Errorf("BAR0+0 = %#x, want %#x", got, eduIdent)
	}
	d2 := vmOpen(t, edu2, ModeCdev)
	if d2.iommu != d.iommu {
		t.Error("cdev devices do not share the iommufd")
	}
	io := d.iommu
	if err := d.Reopen(); err != nil {
		t.Fatalf("Reopen: %v", err)
	}
	if d.iommu != io {
		t.Error("Reopen replaced the iommufd")
	}
	if err := d.SetMemoryEnable(true); err != nil {
		t.Fatal(err)
	}
	if got := readU32(t, d, 0, 0); got != eduIdent {
		t.Errorf("after Reopen BAR0+0 = %#x", got)
	}
	// The same device cannot be open twice in one process.
	if _, err := Open(edu1, OpenOptions{Mode: "group"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Open = %v, want ErrAlreadyExists", err)
	}
}

func TestK3ExportErrnoMatrix(t *testing.T) {
	edu := vmEnv(t, "MMIOBROKER_VM_EDU1")
	ivshmem := vmEnv(t, "MMIOBROKER_VM_IVSHMEM")
	testdev := os.Getenv("MMIOBROKER_VM_TESTDEV")
	page := uint64(os.Getpagesize())
	u32 := func(v uint32) *uint32 { return &v }
	type tc struct {
		name  string
		req   dmaBufRequest
		errno unix.Errno // 0: success with size bytes
		size  int64
	}
	for _, mode := range vmModes() {
		t.Run(string(mode), func(t *testing.T) {
			testutil.FDLeakCheck(t)
			d := vmOpen(t, edu, mode)
			get := uint32(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF)
			cases := []tc{
				{"whole-bar", dmaBufRequest{Ranges: []DMARange{{0, mib}}}, 0, mib},
				{"two-ranges", dmaBufRequest{Ranges: []DMARange{{0, page}, {2 * page, page}}}, 0, int64(2 * page)},
				{"flags-nonzero", dmaBufRequest{Flags: 1, Ranges: []DMARange{{0, page}}}, unix.EINVAL, 0},
				{"nr-ranges-0", dmaBufRequest{NrRanges: u32(0), Ranges: []DMARange{{0, page}}}, unix.EINVAL, 0},
				{"unaligned-offset", dmaBufRequest{Ranges: []DMARange{{page / 2, page}}}, unix.EINVAL, 0},
				{"unaligned-length", dmaBufRequest{Ranges: []DMARange{{0, page + 1}}}, unix.EINVAL, 0},
				{"zero-length", dmaBufRequest{Ranges: []DMARange{{0, page}, {page, 0}}}, unix.EINVAL, 0},
				{"beyond-bar", dmaBufRequest{Ranges: []DMARange{{mib - page, 2 * page}}}, unix.EINVAL, 0},
				{"rom-index", dmaBufRequest{Region: VFIO_PCI_ROM_REGION_INDEX, Ranges: []DMARange{{0, page}}}, unix.ENODEV, 0},
				{"config-index", dmaBufRequest{Region: VFIO_PCI_CONFIG_REGION_INDEX, Ranges: []DMARange{{0, page}}}, unix.ENODEV, 0},
				{"zero-length-bar", dmaBufRequest{Region: 1, Ranges: []DMARange{{0, page}}}, unix.ENODEV, 0},
				{"get-and-set", dmaBufRequest{FeatureFlags: get | VFIO_DEVICE_FEATURE_SET, Ranges: []DMARange{{0, page}}}, unix.EINVAL, 0},
				{"set", dmaBufRequest{FeatureFlags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_BUF, Ranges: []DMARange{{0, page}}}, unix.EINVAL, 0},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					c.req.OpenFlags = unix.O_RDWR | unix.O_CLOEXEC
					f, err := d.exportRaw(c.req)
					if c.errno != 0 {
						if f != nil {
							f.Close()
						}
						if !errors.Is(err, c.errno) {
							t.Fatalf("export = %v, want %v", err, c.errno)
						}
						if !strings.HasPrefix(err.Error(), "vfio "+edu.String()+": export-dma-buf: ") {
							t.Errorf("error %q does not name the device and operation", err)
						}
						return
					}
					if err != nil {
						t.Fatalf("export: %v", err)
					}
					defer f.Close()
					checkDMABuf(t, f, c.size)
				})
			}
			t.Run("probe", func(t *testing.T) {
				if err := d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET); err != nil {
					t.Errorf("PROBE|GET|11 = %v, want 0", err)
				}
				if err := d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF, 0); err != nil {
					t.Errorf("PROBE|11 = %v, want 0", err)
				}
				if err := d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_SET); !errors.Is(err, unix.EINVAL) {
					t.Errorf("PROBE|SET|11 = %v, want EINVAL", err)
				}
				err := d.ProbeFeature(VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE, VFIO_DEVICE_FEATURE_SET)
				if !errors.Is(err, unix.ENOTTY) || !errors.Is(err, errdefs.ErrNotSupported) {
					t.Errorf("PROBE|SET|13 = %v, want ENOTTY (no per-buffer revoke in 7.2)", err)
				}
			})
			t.Run("go-validation", func(t *testing.T) {
				// The public entry point refuses what the kernel would, before asking it.
				for _, r := range [][]DMARange{nil, {{0, 0}}, {{1, page}}, {{mib, page}}} {
					if _, err := d.ExportDMABuf(0, r, unix.O_RDWR); !errors.Is(err, errdefs.ErrInvalidArgument) {
						t.Errorf("ExportDMABuf(0, %v) = %v, want ErrInvalidArgument", r, err)
					}
				}
				for _, bar := range []int{1, 6, 7} {
					if _, err := d.ExportDMABuf(bar, []DMARange{{0, page}}, unix.O_RDWR); !errors.Is(err, errdefs.ErrInvalidArgument) {
						t.Errorf("ExportDMABuf(bar %d) = %v, want ErrInvalidArgument", bar, err)
					}
				}
				f, err := d.ExportDMABuf(0, []DMARange{{page, page}}, unix.O_RDONLY) // O_CLOEXEC added
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				checkDMABuf(t, f, int64(page))
			})

			iv := vmOpen(t, ivshmem, mode)
			t.Run("ivshmem", func(t *testing.T) {
				f, err := iv.ExportDMABuf(2, []DMARange{{0, mib}}, unix.O_RDWR)
				if err != nil {
					t.Fatalf("ivshmem BAR2: %v", err)
				}
				defer f.Close()
				checkDMABuf(t, f, mib)
				// BAR0 is 256 bytes: no page-sized range fits.
				if _, err := iv.exportRaw(dmaBufRequest{Region: 0, Ranges: []DMARange{{0, page}}}); !errors.Is(err, unix.EINVAL) {
					t.Errorf("ivshmem BAR0 (256 B) = %v, want EINVAL", err)
				}
				if _, err := iv.exportRaw(dmaBufRequest{Region: 1, Ranges: []DMARange{{0, page}}}); !errors.Is(err, unix.ENODEV) {
					t.Errorf("ivshmem BAR1 (absent) = %v, want ENODEV", err)
				}
			})
			t.Run("io-bar", func(t *testing.T) {
				if testdev == "" {
					t.Skip("MMIOBROKER_VM_TESTDEV not set")
				}
				a, err := pci.ParseAddress(testdev)
				if err != nil {
					t.Fatal(err)
				}
				td := vmOpen(t, a, mode)
				if !td.PCI().BARs[1].IO {
					t.Skipf("pci-testdev BAR1 is not an I/O BAR: %+v", td.PCI().BARs[1])
				}
				if _, err := td.exportRaw(dmaBufRequest{Region: 1, Ranges: []DMARange{{0, page}}}); !errors.Is(err, unix.EINVAL) {
					t.Errorf("I/O BAR = %v, want EINVAL (no p2p provider)", err)
				}
				if err := td.Close(); err != nil {
					t.Error(err)
				}
			})
		})
	}
}

// iommufdImport opens a client iommufd with an IOAS, as an importer would.
func iommufdImport(t *testing.T) (*iommufd.FD, uint32) {
	t.Helper()
	fd, err := iommufd.Open("")
	if err != nil {
		t.Fatalf("iommufd: %v", err)
	}
	t.Cleanup(func() { fd.Close() })
	ioas, err := fd.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	return fd, ioas
}

func mapFile(fd *iommufd.FD, ioas uint32, buf *os.File, size uint64) (uint64, error) {
	return fd.MapFile(ioas, buf, 0, size, 0, iommufd.MapReadable|iommufd.MapWriteable)
}

func TestK6MemoryDisableRevoke(t *testing.T) {
	edu := vmEnv(t, "MMIOBROKER_VM_EDU1")
	for _, mode := range vmModes() {
		t.Run(string(mode), func(t *testing.T) {
			testutil.FDLeakCheck(t)
			d := vmOpen(t, edu, mode)
			buf, err := d.ExportDMABuf(0, []DMARange{{0, mib}}, unix.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer buf.Close()

			if err := d.SetMemoryEnable(false); err != nil {
				t.Fatal(err)
			}
			if on, err := d.MemoryEnabled(); err != nil || on {
				t.Fatalf("MemoryEnabled = %v, %v after disabling", on, err)
			}
			// Export still works with memory decode off; the buffer is born revoked.
			born, err := d.ExportDMABuf(0, []DMARange{{0, mib}}, unix.O_RDWR)
			if err != nil {
				t.Fatalf("export with memory disabled: %v", err)
			}
			defer born.Close()
			checkDMABuf(t, born, mib)
			if err := d.SetMemoryEnable(true); err != nil {
				t.Fatal(err)
			}

			if vmKernel() != kernelIOMMUFD {
				t.Skip("no importer on the stock kernel (no CONFIG_IOMMUFD): revoke is only observable through importers; export with memory off checked")
			}
			io, ioas := iommufdImport(t)
			iova, err := mapFile(io, ioas, buf, mib)
			if err != nil {
				t.Fatalf("MAP_FILE of a live dma-buf: %v", err)
			}
			if err := d.SetMemoryEnable(false); err != nil {
				t.Fatal(err)
			}
			if _, err := mapFile(io, ioas, buf, mib); !errors.Is(err, unix.ENODEV) {
				t.Errorf("MAP_FILE with memory disabled = %v, want ENODEV", err)
			}
			if _, err := mapFile(io, ioas, born, mib); !errors.Is(err, unix.ENODEV) {
				t.Errorf("MAP_FILE of a buffer born revoked = %v, want ENODEV", err)
			}
			if err := d.SetMemoryEnable(true); err != nil {
				t.Fatal(err)
			}
			// Un-revoked: both map again (the old area stays dead and is unmapped).
			if _, err := mapFile(io, ioas, buf, mib); err != nil {
				t.Errorf("MAP_FILE after re-enabling memory: %v", err)
			}
			if _, err := mapFile(io, ioas, born, mib); err != nil {
				t.Errorf("MAP_FILE of the born-revoked buffer after enabling memory: %v", err)
			}
			if n, err := io.Unmap(ioas, iova, mib); err != nil || n != mib {
				t.Errorf("Unmap of the revoked area = %d, %v", n, err)
			}
			// Two ranges: iommufd takes single-range dma-bufs only.
			two, err := d.ExportDMABuf(0, []DMARange{{0, 0x1000}, {0x2000, 0x1000}}, unix.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer two.Close()
			if _, err := mapFile(io, ioas, two, 0x2000); !errors.Is(err, unix.EOPNOTSUPP) {
				t.Errorf("MAP_FILE of a 2-range dma-buf = %v, want EOPNOTSUPP", err)
			}
		})
	}
}

func TestK7RevokeByCycle(t *testing.T) {
	edu := vmEnv(t, "MMIOBROKER_VM_EDU1")
	for _, mode := range vmModes() {
		t.Run(string(mode), func(t *testing.T) {
			testutil.FDLeakCheck(t)
			d := vmOpen(t, edu, mode)
			old, err := d.ExportDMABuf(0, []DMARange{{0, mib}}, unix.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer old.Close()
			var io *iommufd.FD
			var ioas uint32
			if vmKernel() == kernelIOMMUFD {
				io, ioas = iommufdImport(t)
				if _, err := mapFile(io, ioas, old, mib); err != nil {
					t.Fatalf("MAP_FILE before the cycle: %v", err)
				}
			}

			// Revoke = memory off, reopen, memory on.
			if err := d.SetMemoryEnable(false); err != nil {
				t.Fatal(err)
			}
			if err := d.Reopen(); err != nil {
				t.Fatalf("Reopen: %v", err)
			}
			if err := d.SetMemoryEnable(true); err != nil {
				t.Fatal(err)
			}
			if got := readU32(t, d, 0, 0); got != eduIdent {
				t.Errorf("BAR0+0 after the cycle = %#x", got)
			}
			// The old buffer's fd stays valid (it is still a dma-buf of the same size).
			checkDMABuf(t, old, mib)
			fresh, err := d.ExportDMABuf(0, []DMARange{{0, mib}}, unix.O_RDWR)
			if err != nil {
				t.Fatalf("export after the cycle: %v", err)
			}
			defer fresh.Close()
			checkDMABuf(t, fresh, mib)

			if io == nil {
				t.Skip("no importer on the stock kernel (no CONFIG_IOMMUFD): old buffer and new export checked as fds only")
			}
			if _, err := mapFile(io, ioas, old, mib); !errors.Is(err, unix.ENODEV) {
				t.Errorf("MAP_FILE of the old buffer after the cycle = %v, want ENODEV", err)
			}
			if _, err := mapFile(io, ioas, fresh, mib); err != nil {
				t.Errorf("MAP_FILE of a new export: %v", err)
			}
			// Permanent: toggling memory again does not bring the old buffer back.
			if err := d.SetMemoryEnable(false); err != nil {
				t.Fatal(err)
			}
			if err := d.SetMemoryEnable(true); err != nil {
				t.Fatal(err)
			}
			if _, err := mapFile(io, ioas, old, mib); !errors.Is(err, unix.ENODEV) {
				t.Errorf("MAP_FILE of the old buffer after another toggle = %v, want ENODEV", err)
			}
		})
	}
}
