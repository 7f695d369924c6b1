//go:build vmtest

package dmabuf_test

import (
	"encoding/binary"
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// UDMABUF_CREATE is _IOW('u', 0x42, struct udmabuf_create) (include/uapi/linux/udmabuf.h);
// struct udmabuf_create { __u32 memfd; __u32 flags; __u64 offset; __u64 size; } is 24 bytes.
const (
	udmabufCreate       = 0x40187542
	udmabufFlagsCloexec = 0x01
)

// newUdmabuf makes a real dma-buf of size bytes from a sealed memfd through /dev/udmabuf,
// or skips t if the kernel has no udmabuf.
func newUdmabuf(t *testing.T, size uint64) *os.File {
	t.Helper()
	dev, err := os.OpenFile("/dev/udmabuf", os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		t.Skip("no /dev/udmabuf: this kernel lacks CONFIG_UDMABUF (Debian's stock kernel has it; the iommufd rig kernel needs CONFIG_UDMABUF=y in test/vm/kernel/iommufd.config)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	mfd, err := unix.MemfdCreate("mmb-udmabuf", unix.MFD_ALLOW_SEALING|unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	memfd := os.NewFile(uintptr(mfd), "memfd")
	defer memfd.Close()
	if err := memfd.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(mfd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK); err != nil {
		t.Fatalf("F_ADD_SEALS: %v", err)
	}
	arg := make([]byte, 24)
	binary.LittleEndian.PutUint32(arg[0:], uint32(mfd))
	binary.LittleEndian.PutUint32(arg[4:], udmabufFlagsCloexec)
	binary.LittleEndian.PutUint64(arg[8:], 0)
	binary.LittleEndian.PutUint64(arg[16:], size)
	fd, err := ioctl.Bytes(dev, "UDMABUF_CREATE", udmabufCreate, arg)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(fd, "udmabuf")
}

func rawFD(t *testing.T, f *os.File) int {
	t.Helper()
	var n int
	if err := ioctl.WithFD(f, func(fd int) error { n = fd; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestK5FdinfoInode checks a dma-buf's identity on a real kernel: st_ino, fdinfo, the
// /proc fd link, SET_NAME and the reference count.
func TestK5FdinfoInode(t *testing.T) {
	testutil.FDLeakCheck(t)
	const size = 2 * 4096
	b, err := dmabuf.New(newUdmabuf(t, size))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	fi, err := b.File().Stat()
	if err != nil {
		t.Fatal(err)
	}
	if ino := fi.Sys().(*syscall.Stat_t).Ino; b.Inode() != ino || ino == 0 {
		t.Errorf("Inode() = %d, fstat st_ino = %d", b.Inode(), ino)
	}
	if b.Size() != size {
		t.Errorf("Size() = %d, want %d", b.Size(), size)
	}

	info, err := b.Info()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fdinfo: %+v", info)
	if info.Inode != b.Inode() || info.Size != size || info.ExpName != "udmabuf" || info.Name != "" {
		t.Errorf("fdinfo = %+v; want ino %d size %d exp_name udmabuf, no name", info, b.Inode(), size)
	}
	if info.Flags&unix.O_CLOEXEC == 0 {
		t.Errorf("fdinfo flags %#o lack O_CLOEXEC (UDMABUF_FLAGS_CLOEXEC was set)", info.Flags)
	}

	fd := rawFD(t, b.File())
	link := func() string {
		l, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	if l := link(); l != "/dmabuf:" {
		t.Errorf("unnamed dma-buf links to %q, want /dmabuf:", l)
	}

	const name = "mmb-k5-test"
	if err := b.SetName(name); err != nil {
		t.Fatal(err)
	}
	if info, err = b.Info(); err != nil || info.Name != name {
		t.Errorf("after SetName: fdinfo name %q, %v; want %q", info.Name, err, name)
	}
	if l := link(); l != "/dmabuf:"+name {
		t.Errorf("named dma-buf links to %q, want /dmabuf:%s", l, name)
	}
	looked, err := dmabuf.Lookup(os.Getpid(), fd)
	if err != nil || looked.Inode != b.Inode() || looked.Name != name {
		t.Errorf("Lookup(self, %d) = %+v, %v", fd, looked, err)
	}

	// The longest name is accepted by the kernel; one byte more is refused by SetName before
	// the syscall, and the kernel agrees that it is too long.
	long := strings.Repeat("x", dmabuf.MaxNameLen)
	if err := b.SetName(long); err != nil {
		t.Errorf("SetName of %d bytes: %v", len(long), err)
	}
	if err := b.SetName(long + "x"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("SetName of %d bytes = %v; want ErrInvalidArgument", len(long)+1, err)
	}
	if _, err := ioctl.Bytes(b.File(), "DMA_BUF_SET_NAME_B", dmabuf.DMA_BUF_SET_NAME_B, []byte(long+"x\x00")); !errors.Is(err, unix.EINVAL) {
		t.Errorf("kernel SET_NAME of %d bytes = %v; want EINVAL", len(long)+1, err)
	}

	base := info.Count
	dup, err := b.Dup()
	if err != nil {
		t.Fatal(err)
	}
	if info, err = b.Info(); err != nil || info.Count != base+1 {
		t.Errorf("after Dup: count %d, %v; want %d", info.Count, err, base+1)
	}
	dfi, err := dup.Stat()
	if err != nil || dfi.Sys().(*syscall.Stat_t).Ino != b.Inode() {
		t.Errorf("dup stat: %v, %v", dfi, err)
	}
	if err := dup.Close(); err != nil {
		t.Fatal(err)
	}
	if info, err = b.Info(); err != nil || info.Count != base {
		t.Errorf("after closing the dup: count %d, %v; want %d", info.Count, err, base)
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestK5InodesUnique checks that two dma-bufs have different inodes.
func TestK5InodesUnique(t *testing.T) {
	testutil.FDLeakCheck(t)
	a, err := dmabuf.New(newUdmabuf(t, 4096))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := dmabuf.New(newUdmabuf(t, 4096))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Inode() == b.Inode() {
		t.Fatalf("two dma-bufs share inode %d", a.Inode())
	}
}

// TestNewRejectsMemfd checks the statfs magic against a real non-dma-buf anonymous file.
func TestNewRejectsMemfd(t *testing.T) {
	testutil.FDLeakCheck(t)
	mfd, err := unix.MemfdCreate("mmb-not-dmabuf", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dmabuf.New(os.NewFile(uintptr(mfd), "memfd")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("New(memfd) = %v; want ErrInvalidArgument", err)
	}
}
