//go:build vmtest

package vfio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// The edu device's DMA engine (QEMU docs/specs/edu.rst): registers in BAR0, a 4 KiB
// buffer at 0x40000 inside the device, a 28-bit DMA mask, and a 100 ms virtual-clock
// timer per transfer.
const (
	eduDMASrc      = 0x80
	eduDMADst      = 0x88
	eduDMACount    = 0x90
	eduDMACmd      = 0x98
	eduDMAStart    = 0x1 // command: start; reads back set while the transfer runs
	eduDMAToPCI    = 0x2 // command: direction edu buffer -> bus address (else bus -> buffer)
	eduBuffer      = 0x40000
	eduBufferSize  = 4096
	eduDMATimeout  = 10 * time.Second
	eduDMAMaskBits = 28
)

// eduDMA programs one transfer of n bytes and waits for the engine to finish by polling
// the command register until its start bit clears, up to eduDMATimeout.
func eduDMA(t *testing.T, edu *Device, src, dst, n uint64, toPCI bool) time.Duration {
	t.Helper()
	if src >= 1<<eduDMAMaskBits || dst >= 1<<eduDMAMaskBits {
		t.Fatalf("edu DMA [%#x -> %#x]: beyond the 28-bit DMA mask", src, dst)
	}
	w := func(reg int64, v uint64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		if err := edu.WriteBAR(0, reg, b[:]); err != nil {
			t.Fatalf("edu BAR0+%#x = %#x: %v", reg, v, err)
		}
	}
	cmd := uint64(eduDMAStart)
	if toPCI {
		cmd |= eduDMAToPCI
	}
	start := time.Now()
	w(eduDMASrc, src)
	w(eduDMADst, dst)
	w(eduDMACount, n)
	w(eduDMACmd, cmd)
	deadline := start.Add(eduDMATimeout)
	for {
		var b [8]byte
		if err := edu.ReadBAR(0, eduDMACmd, b[:]); err != nil {
			t.Fatalf("edu DMA status: %v", err)
		}
		if binary.LittleEndian.Uint64(b[:])&eduDMAStart == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("edu DMA [%#x -> %#x, %d bytes] still running after %v", src, dst, n, eduDMATimeout)
		}
		// The transfer completes on QEMU's virtual clock; yield rather than spin the vCPU.
		time.Sleep(time.Millisecond)
	}
}

// kmsg follows the kernel log from now on (/dev/kmsg, read through the runtime poller).
type kmsg struct{ f *os.File }

func openKmsg(t *testing.T) *kmsg {
	t.Helper()
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Logf("cannot read the kernel log: %v", err)
		return nil
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Logf("seek to the end of /dev/kmsg: %v", err)
		return nil
	}
	return &kmsg{f: f}
}

// await returns the kernel log lines that contain every one of words, reading new
// records until one matches or until wait has passed.
func (k *kmsg) await(wait time.Duration, words ...string) []string {
	if k == nil {
		return nil
	}
	k.f.SetReadDeadline(time.Now().Add(wait))
	var found []string
	buf := make([]byte, 8192)
	for {
		n, err := k.f.Read(buf)
		if errors.Is(err, unix.EPIPE) {
			continue // records were overwritten before we read them
		}
		if err != nil {
			return found // the deadline
		}
		// A record is "prio,seq,time,flags;message\n".
		_, text, _ := strings.Cut(strings.TrimSpace(string(buf[:n])), ";")
		match := true
		for _, w := range words {
			match = match && strings.Contains(text, w)
		}
		if match {
			found = append(found, text)
			k.f.SetReadDeadline(time.Now().Add(200 * time.Millisecond)) // collect the burst
		}
	}
}

func memfd(t *testing.T, size int) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("k9-dma-source", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd:k9-dma-source")
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	return f
}

// pattern returns n bytes that start with tag, for recognising a DMA'd block.
func pattern(tag string, n int) []byte {
	b := bytes.Repeat([]byte{'.'}, n)
	copy(b, tag)
	return b
}

// TestK9PeerToPeerDMA: a client that owns an edu device through its own VFIO cdev,
// attached to its own IOAS, maps a brokered ivshmem BAR2 dma-buf at IOVA X and has the edu
// DMA engine copy a pattern there: the pattern lands in the BAR. After the exporter
// revokes (memory decode off and a device-fd cycle), the same DMA with another pattern
// does not land, and the guest kernel logs the IOMMU fault.
func TestK9PeerToPeerDMA(t *testing.T) {
	ivAddr := vmEnv(t, "MMIOBROKER_VM_IVSHMEM")
	eduAddr := vmEnv(t, "MMIOBROKER_VM_EDU2")
	if vmKernel() != kernelIOMMUFD {
		t.Skip("kernel " + vmKernel() + " has no iommufd (CONFIG_IOMMUFD), the only importer of VFIO dma-bufs: no peer-to-peer DMA through a dma-buf")
	}
	testutil.FDLeakCheck(t)
	const (
		iovaRAM  = 0x100000 // the client's source buffer (a memfd)
		iovaBAR  = 0x400000 // X: the brokered ivshmem BAR2 dma-buf
		barOff   = 0x20000  // where in BAR2 the DMA writes
		blockLen = 64
	)

	// The broker's side: ivshmem opened through the process-wide iommufd, BAR2 exported.
	iv := vmOpen(t, ivAddr, ModeCdev)
	if err := iv.WriteBAR(2, barOff, pattern("K9-BEFORE", blockLen)); err != nil {
		t.Fatal(err)
	}
	buf, err := iv.ExportDMABuf(2, []DMARange{{0, mib}}, unix.O_RDWR)
	if err != nil {
		t.Fatalf("export ivshmem BAR2: %v", err)
	}
	defer buf.Close()

	// The client's side: its own iommufd and IOAS, edu bound and attached to it, the
	// dma-buf and a source buffer mapped into that IOAS.
	cio, err := iommufd.Open("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cio.Close() }) // after the edu device's cleanup (LIFO)
	cioas, err := cio.AllocIOAS()
	if err != nil {
		t.Fatal(err)
	}
	edu, err := Open(eduAddr, OpenOptions{IOMMUFD: cio, IOAS: cioas})
	if err != nil {
		t.Fatalf("open edu into the client's IOAS: %v", err)
	}
	t.Cleanup(func() {
		if err := edu.Close(); err != nil {
			t.Errorf("close edu: %v", err)
		}
	})
	if fd, ioas, ok := edu.IOMMU(); fd != cio || ioas != cioas || !ok || edu.Mode() != ModeCdev {
		t.Fatalf("edu attached to %p/%d (%v, mode %s), want the client's %p/%d", fd, ioas, ok, edu.Mode(), cio, cioas)
	}
	if err := edu.SetMemoryEnable(true); err != nil {
		t.Fatal(err)
	}
	if err := edu.SetBusMaster(true); err != nil {
		t.Fatal(err)
	}
	src := memfd(t, 4096)
	flags := iommufd.MapFixedIOVA | iommufd.MapReadable | iommufd.MapWriteable
	if _, err := cio.MapFile(cioas, src, 0, 4096, iovaRAM, flags); err != nil {
		t.Fatalf("MAP_FILE memfd at %#x: %v", iovaRAM, err)
	}
	if _, err := cio.MapFile(cioas, buf, 0, mib, iovaBAR, flags); err != nil {
		t.Fatalf("MAP_FILE ivshmem dma-buf at %#x: %v", iovaBAR, err)
	}

	// The pattern: memfd -> edu buffer -> X + barOff.
	first := pattern("MMB-K9-P2P-DMA-LANDED", blockLen)
	if _, err := src.WriteAt(first, 0); err != nil {
		t.Fatal(err)
	}
	in := eduDMA(t, edu, iovaRAM, eduBuffer, blockLen, false)
	out := eduDMA(t, edu, eduBuffer, iovaBAR+barOff, blockLen, true)
	got := make([]byte, blockLen)
	if err := iv.ReadBAR(2, barOff, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, first) {
		t.Fatalf("ivshmem BAR2+%#x after the DMA = %q, want %q", barOff, got, first)
	}
	t.Logf("P2P DMA landed: memfd@IOVA %#x -> edu buffer (%v), edu -> ivshmem BAR2+%#x via dma-buf @IOVA %#x (%v)",
		iovaRAM, in.Round(time.Millisecond), barOff, iovaBAR, out.Round(time.Millisecond))

	// Revoke on the exporter: memory decode off, device fd cycled, memory decode on.
	log := openKmsg(t)
	start := time.Now()
	if err := iv.SetMemoryEnable(false); err != nil {
		t.Fatal(err)
	}
	if err := iv.Reopen(); err != nil {
		t.Fatal(err)
	}
	if err := iv.SetMemoryEnable(true); err != nil {
		t.Fatal(err)
	}
	t.Logf("exporter revoke (memory off, reopen, memory on) took %v", time.Since(start).Round(time.Microsecond))

	second := pattern("MMB-K9-REVOKED-MUST-NOT-LAND", blockLen)
	if _, err := src.WriteAt(second, 0); err != nil {
		t.Fatal(err)
	}
	eduDMA(t, edu, iovaRAM, eduBuffer, blockLen, false)
	eduDMA(t, edu, eduBuffer, iovaBAR+barOff, blockLen, true)
	if err := iv.ReadBAR(2, barOff, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, first) {
		t.Fatalf("ivshmem BAR2+%#x after the revoked DMA = %q, want still %q", barOff, got, first)
	}
	if faults := log.await(3*time.Second, "DMAR", "fault"); len(faults) > 0 {
		t.Logf("guest kernel log: %s", strings.Join(faults, " | "))
	} else {
		t.Log("no DMAR fault line in the kernel log within 3 s (the write did not land either way)")
	}
	// The old dma-buf is dead for good; a new export maps.
	if _, err := cio.MapFile(cioas, buf, 0, mib, 0x800000, flags); !errors.Is(err, unix.ENODEV) {
		t.Errorf("MAP_FILE of the revoked dma-buf = %v, want ENODEV", err)
	}
	fresh, err := iv.ExportDMABuf(2, []DMARange{{0, mib}}, unix.O_RDWR)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	if _, err := cio.MapFile(cioas, fresh, 0, mib, 0x800000, flags); err != nil {
		t.Errorf("MAP_FILE of a new export: %v", err)
	}
	third := pattern("MMB-K9-REISSUED-LANDED", blockLen)
	if _, err := src.WriteAt(third, 0); err != nil {
		t.Fatal(err)
	}
	eduDMA(t, edu, iovaRAM, eduBuffer, blockLen, false)
	eduDMA(t, edu, eduBuffer, 0x800000+barOff+0x1000, blockLen, true)
	if err := iv.ReadBAR(2, barOff+0x1000, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, third) {
		t.Errorf("ivshmem BAR2+%#x after DMA through the new export = %q, want %q", barOff+0x1000, got, third)
	}
	// What the host can check in the ivshmem backing file after the run.
	t.Logf("host-side expectation: backing file holds %q at %#x and %q at %#x, and no %q",
		first[:21], barOff, third[:22], barOff+0x1000, second[:28])
}

// isPCIe walks the config space capability list for the PCI Express capability (id 0x10).
func isPCIe(t *testing.T, d *Device) bool {
	t.Helper()
	var st [2]byte
	if err := d.ReadConfig(0x06, st[:]); err != nil { // PCI_STATUS
		t.Fatal(err)
	}
	if st[0]&0x10 == 0 { // PCI_STATUS_CAP_LIST
		return false
	}
	var p [1]byte
	if err := d.ReadConfig(0x34, p[:]); err != nil { // PCI_CAPABILITY_LIST
		t.Fatal(err)
	}
	for pos, n := int64(p[0]&^3), 0; pos != 0 && n < 48; n++ {
		var c [2]byte
		if err := d.ReadConfig(pos, c[:]); err != nil {
			t.Fatal(err)
		}
		if c[0] == 0x10 {
			return true
		}
		pos = int64(c[1] &^ 3)
	}
	return false
}

func testEventfd(t *testing.T) *os.File {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// TestVMIRQNotifiers registers the device request (REQ) and AER error (ERR) notifiers on
// every rig device: REQ works everywhere and is dropped with the device fd (so it must be
// registered again after Reopen); ERR exists only on PCI Express devices, and the others
// say so with ErrNotSupported.
func TestVMIRQNotifiers(t *testing.T) {
	devs := map[string]string{}
	for _, env := range []string{"MMIOBROKER_VM_EDU1", "MMIOBROKER_VM_IVSHMEM", "MMIOBROKER_VM_TESTDEV"} {
		devs[env] = vmEnv(t, env).String()
	}
	for env, bdf := range devs {
		for _, mode := range vmModes() {
			t.Run(fmt.Sprintf("%s/%s", strings.TrimPrefix(env, "MMIOBROKER_VM_"), mode), func(t *testing.T) {
				testutil.FDLeakCheck(t)
				d := vmOpen(t, vmEnv(t, env), mode)
				req, err := d.IRQ(VFIO_PCI_REQ_IRQ_INDEX)
				if err != nil || req.Count != 1 || req.Flags&VFIO_IRQ_INFO_EVENTFD == 0 {
					t.Errorf("REQ irq info %+v, %v; want count 1 with EVENTFD", req, err)
				}
				ev := testEventfd(t)
				if err := d.SetIRQEventfd(VFIO_PCI_REQ_IRQ_INDEX, ev); err != nil {
					t.Fatalf("register REQ: %v", err)
				}
				if err := d.ClearIRQ(VFIO_PCI_REQ_IRQ_INDEX); err != nil {
					t.Errorf("clear REQ: %v", err)
				}
				if err := d.ClearIRQ(VFIO_PCI_REQ_IRQ_INDEX); !errors.Is(err, unix.EINVAL) {
					t.Errorf("clear REQ twice = %v, want EINVAL (nothing registered)", err)
				}
				if err := d.SetIRQEventfd(VFIO_PCI_REQ_IRQ_INDEX, ev); err != nil {
					t.Fatal(err)
				}
				if err := d.Reopen(); err != nil {
					t.Fatal(err)
				}
				if err := d.ClearIRQ(VFIO_PCI_REQ_IRQ_INDEX); !errors.Is(err, unix.EINVAL) {
					t.Errorf("clear REQ after Reopen = %v, want EINVAL: the registration went with the old fd", err)
				}

				pcie := isPCIe(t, d)
				err = d.SetIRQEventfd(VFIO_PCI_ERR_IRQ_INDEX, testEventfd(t))
				switch {
				case pcie && err != nil:
					t.Errorf("register ERR on a PCI Express device: %v", err)
				case pcie:
					if err := d.ClearIRQ(VFIO_PCI_ERR_IRQ_INDEX); err != nil {
						t.Errorf("clear ERR: %v", err)
					}
					t.Logf("%s is PCI Express: ERR notifier registered and cleared", bdf)
				default:
					var fe *FeatureError
					if !errors.As(err, &fe) || !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.EINVAL) {
						t.Errorf("register ERR on a conventional PCI device = %v, want a FeatureError (ErrNotSupported, EINVAL)", err)
					}
					t.Logf("%s is conventional PCI: %v", bdf, err)
				}
			})
		}
	}
}

// TestVMDMABufRevokeProbe: Linux 7.2 has no per-buffer revoke.
func TestVMDMABufRevokeProbe(t *testing.T) {
	a := vmEnv(t, "MMIOBROKER_VM_EDU1")
	for _, mode := range vmModes() {
		t.Run(string(mode), func(t *testing.T) {
			testutil.FDLeakCheck(t)
			d := vmOpen(t, a, mode)
			err := d.DMABufRevokeSupported()
			var fe *FeatureError
			if !errors.As(err, &fe) || !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOTTY) {
				t.Fatalf("DMABufRevokeSupported = %v, want a FeatureError with ENOTTY", err)
			}
			t.Log(err)
			buf, err := d.ExportDMABuf(0, []DMARange{{0, mib}}, unix.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			defer buf.Close()
			if err := d.RevokeDMABuf(buf); !errors.As(err, &fe) {
				t.Errorf("RevokeDMABuf = %v, want the FeatureError", err)
			}
			if vmKernel() == kernelIOMMUFD {
				io, ioas := iommufdImport(t)
				if _, err := mapFile(io, ioas, buf, mib); err != nil {
					t.Errorf("the buffer is not live after the refused per-buffer revoke: %v", err)
				}
			}
		})
	}
}
