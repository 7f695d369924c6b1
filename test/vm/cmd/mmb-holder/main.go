// Command mmb-holder is the rig's lease holder for the systemd guest tests
// (test/vm/systemd): `mmiobrokerctl allocate -exec BDF BAR -- mmb-holder` gives it the
// lease's dma-buf as fd 3 (MMIO_LEASE_* in its environment), and it holds that fd while
// the test restarts, kills or swaps the daemon. The test drives it on stdin, one command a
// line; every answer is one line on stdout, "ok ..." or "err ...":
//
//	info              the lease id, generation and inode of fd 3 (fstat)
//	map               (iommufd kernels) open an iommufd, allocate an IOAS and map fd 3 at
//	                  IOVA 0x400000 (client/iommufd): the mapping the holder keeps across
//	                  restarts
//	edu BDF           open the edu device BDF (VFIO cdev) into that IOAS, bus master on,
//	                  a memfd mapped at IOVA 0x100000: the DMA engine of `dma`
//	dma TAG OFF       edu DMA of a 64-byte block starting with TAG from the memfd into
//	                  the dma-buf at OFF (through the mapping made by `map`), then back
//	                  from there into the memfd: ok if the block read back is the one
//	                  written (peer-to-peer through the IOMMU, both ways)
//	fresh             map fd 3 into a fresh iommufd and IOAS (a revoked dma-buf refuses:
//	                  ENODEV), then close them
//	quit              exit 0 (mmiobrokerctl then releases the lease)
//
// On EOF it exits as for quit.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/mmiobroker/mmiobroker/client/iommufd"
	internaliommufd "github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
	"golang.org/x/sys/unix"
)

// The edu device's DMA engine (QEMU docs/specs/edu.rst), as in internal/vfio's K9 test.
const (
	eduDMASrc     = 0x80
	eduDMADst     = 0x88
	eduDMACount   = 0x90
	eduDMACmd     = 0x98
	eduDMAStart   = 0x1
	eduDMAToPCI   = 0x2
	eduBuffer     = 0x40000
	eduDMATimeout = 10 * time.Second

	iovaRAM  = 0x100000 // the memfd: block written at 0, read back at 0x800
	iovaBuf  = 0x400000 // the lease's dma-buf
	blockLen = 64
)

type holder struct {
	buf     *os.File
	size    uint64
	io      *iommufd.FD
	ioas    *iommufd.IOAS
	eduIO   *internaliommufd.FD // io's file (a dup) in the form internal/vfio binds devices to
	edu     *vfio.Device
	memfd   *os.File
	leaseID string
}

func main() {
	h := &holder{buf: os.NewFile(3, "lease-dmabuf"), leaseID: os.Getenv("MMIO_LEASE_ID")}
	h.size, _ = strconv.ParseUint(os.Getenv("MMIO_LEASE_SIZE"), 10, 64)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		if f[0] == "quit" {
			break
		}
		msg, err := h.do(f)
		if err != nil {
			fmt.Printf("err %s: %v\n", f[0], err)
		} else {
			fmt.Printf("ok %s\n", msg)
		}
	}
	if h.edu != nil {
		h.edu.Close()
	}
	if h.eduIO != nil {
		h.eduIO.Close()
	}
	if h.io != nil {
		h.io.Close()
	}
	fmt.Println("ok bye")
}

func (h *holder) do(f []string) (string, error) {
	switch {
	case f[0] == "info":
		var st unix.Stat_t
		if err := unix.Fstat(3, &st); err != nil {
			return "", err
		}
		return fmt.Sprintf("id=%s inode=%d gen=%s size=%d pid=%d", h.leaseID, st.Ino, os.Getenv("MMIO_LEASE_GENERATION"), h.size, os.Getpid()), nil
	case f[0] == "map":
		if h.io != nil {
			return "", errors.New("already mapped")
		}
		io, err := iommufd.Open("")
		if err != nil {
			return "", err
		}
		ioas, err := io.AllocIOAS()
		if err != nil {
			io.Close()
			return "", err
		}
		m, err := ioas.Map(h.buf, iommufd.MapOptions{IOVA: iovaBuf, Fixed: true})
		if err != nil {
			io.Close()
			return "", fmt.Errorf("IOMMU_IOAS_MAP_FILE of the dma-buf (%d bytes) at %#x: %w", h.size, iovaBuf, err)
		}
		h.io, h.ioas = io, ioas
		return fmt.Sprintf("mapped %d bytes at IOVA %#x", m.Length, m.IOVA), nil
	case f[0] == "edu" && len(f) == 2:
		if h.io == nil {
			return "", errors.New("map first")
		}
		addr, err := pci.ParseAddress(f[1])
		if err != nil {
			return "", err
		}
		// internal/vfio binds the device to an iommufd of internal/iommufd: the holder's,
		// through a duplicate of its descriptor (the same iommufd, the same IOAS ids).
		dup, err := dupFile(h.io.File())
		if err != nil {
			return "", err
		}
		eduIO := internaliommufd.FromFile(dup)
		edu, err := vfio.Open(addr, vfio.OpenOptions{IOMMUFD: eduIO, IOAS: h.ioas.ID()})
		if err != nil {
			eduIO.Close()
			return "", err
		}
		fail := func(err error) (string, error) {
			edu.Close()
			eduIO.Close()
			return "", err
		}
		if err := edu.SetMemoryEnable(true); err != nil {
			return fail(err)
		}
		if err := edu.SetBusMaster(true); err != nil {
			return fail(err)
		}
		fd, err := unix.MemfdCreate("mmb-holder-dma", unix.MFD_CLOEXEC)
		if err != nil {
			return fail(err)
		}
		m := os.NewFile(uintptr(fd), "memfd")
		if err := m.Truncate(4096); err != nil {
			m.Close()
			return fail(err)
		}
		if _, err := h.ioas.Map(m, iommufd.MapOptions{IOVA: iovaRAM, Fixed: true}); err != nil {
			m.Close()
			return fail(fmt.Errorf("map the memfd: %w", err))
		}
		h.eduIO = eduIO
		h.edu, h.memfd = edu, m
		return "edu " + f[1] + " attached to the holder's IOAS", nil
	case f[0] == "dma" && len(f) == 3:
		if h.edu == nil {
			return "", errors.New("edu first")
		}
		off, err := strconv.ParseUint(f[2], 0, 64)
		if err != nil || off+blockLen > h.size {
			return "", fmt.Errorf("offset %q: %v (dma-buf of %d bytes)", f[2], err, h.size)
		}
		block := bytes.Repeat([]byte{'.'}, blockLen)
		copy(block, f[1])
		if _, err := h.memfd.WriteAt(block, 0); err != nil {
			return "", err
		}
		if _, err := h.memfd.WriteAt(make([]byte, blockLen), 0x800); err != nil {
			return "", err
		}
		start := time.Now()
		for _, s := range []struct {
			src, dst uint64
			toPCI    bool
		}{
			{iovaRAM, eduBuffer, false},                // memfd -> edu buffer
			{eduBuffer, iovaBuf + off, true},           // edu buffer -> dma-buf (the BAR)
			{iovaBuf + off, eduBuffer + 0x100, false},  // the BAR -> edu buffer
			{eduBuffer + 0x100, iovaRAM + 0x800, true}, // edu buffer -> memfd
		} {
			if err := h.eduDMA(s.src, s.dst, blockLen, s.toPCI); err != nil {
				return "", err
			}
		}
		got := make([]byte, blockLen)
		if _, err := h.memfd.ReadAt(got, 0x800); err != nil {
			return "", err
		}
		if !bytes.Equal(got, block) {
			return "", fmt.Errorf("read back %q from the dma-buf at %#x, want %q", got, off, block)
		}
		return fmt.Sprintf("%s landed at %#x and read back (%v)", f[1], off, time.Since(start).Round(time.Millisecond)), nil
	case f[0] == "fresh":
		io, err := iommufd.Open("")
		if err != nil {
			return "", err
		}
		defer io.Close()
		ioas, err := io.AllocIOAS()
		if err != nil {
			return "", err
		}
		if _, err := ioas.Map(h.buf, iommufd.MapOptions{IOVA: iovaBuf, Fixed: true}); err != nil {
			return "", fmt.Errorf("IOMMU_IOAS_MAP_FILE into a fresh IOAS: %w", err)
		}
		return "maps into a fresh IOAS", nil
	}
	return "", fmt.Errorf("unknown command %q", strings.Join(f, " "))
}

// dupFile duplicates f's descriptor (close-on-exec).
func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), derr)
	}
	return os.NewFile(uintptr(dup), f.Name()), nil
}

// eduDMA runs one transfer and waits for the engine (start bit clear), up to eduDMATimeout.
func (h *holder) eduDMA(src, dst, n uint64, toPCI bool) error {
	w := func(reg int64, v uint64) error {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		return h.edu.WriteBAR(0, reg, b[:])
	}
	cmd := uint64(eduDMAStart)
	if toPCI {
		cmd |= eduDMAToPCI
	}
	for _, r := range []struct {
		reg int64
		v   uint64
	}{{eduDMASrc, src}, {eduDMADst, dst}, {eduDMACount, n}, {eduDMACmd, cmd}} {
		if err := w(r.reg, r.v); err != nil {
			return fmt.Errorf("edu BAR0+%#x = %#x: %w", r.reg, r.v, err)
		}
	}
	deadline := time.Now().Add(eduDMATimeout)
	for {
		var b [8]byte
		if err := h.edu.ReadBAR(0, eduDMACmd, b[:]); err != nil {
			return err
		}
		if binary.LittleEndian.Uint64(b[:])&eduDMAStart == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("edu DMA %#x -> %#x still running after %v", src, dst, eduDMATimeout)
		}
		time.Sleep(time.Millisecond) // the transfer runs on QEMU's virtual clock
	}
}
