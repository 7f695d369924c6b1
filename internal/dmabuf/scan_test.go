package dmabuf

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// fakeProc builds a procfs-shaped tree: fd links are symlinks whose target is the text
// readlink returns, as in procfs.
type fakeProc struct {
	t    *testing.T
	root string
}

func newFakeProc(t *testing.T) *fakeProc {
	return &fakeProc{t: t, root: t.TempDir()}
}

func (p *fakeProc) process(pid int, comm string, uid uint32) string {
	dir := filepath.Join(p.root, strconv.Itoa(pid))
	for _, d := range []string{"fd", "fdinfo"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			p.t.Fatal(err)
		}
	}
	p.write(filepath.Join(dir, "comm"), comm+"\n")
	p.write(filepath.Join(dir, "status"), fmt.Sprintf("Name:\t%s\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t%d\t%d\t%d\t%d\n", comm, uid, uid, uid, uid))
	return dir
}

func (p *fakeProc) fd(pid, fd int, link, fdinfo string) {
	dir := filepath.Join(p.root, strconv.Itoa(pid))
	if err := os.Symlink(link, filepath.Join(dir, "fd", strconv.Itoa(fd))); err != nil {
		p.t.Fatal(err)
	}
	if fdinfo != "" {
		p.write(filepath.Join(dir, "fdinfo", strconv.Itoa(fd)), fdinfo)
	}
}

func (p *fakeProc) write(path, s string) {
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

func vfioInfo(ino uint64, name string) string {
	return fmt.Sprintf("pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t%d\nsize:\t65536\ncount:\t3\nexp_name:\tvfio_pci_core\nname:\t%s\n", ino, name)
}

func TestScanProcesses(t *testing.T) {
	p := newFakeProc(t)
	p.process(10, "mmiobrokerd", 0)
	p.fd(10, 3, "socket:[99]", "pos:\t0\nflags:\t02\nmnt_id:\t8\nino:\t99\n")
	p.fd(10, 7, "/dmabuf:mmb-aa", vfioInfo(501, "mmb-aa"))
	p.process(20, "qemu-system-x86", 107)
	p.fd(20, 40, "/dmabuf:mmb-aa", vfioInfo(501, "mmb-aa"))
	p.fd(20, 9, "/dmabuf:", udmabufFDInfo)
	p.fd(20, 41, "/dmabuf:mmb-bb", "garbage\n")                  // closed and reused meanwhile
	p.fd(20, 42, "/dmabuf:mmb-cc", "")                           // closed before fdinfo was read
	p.fd(20, 43, "/dev/null", "")                                // not a dma-buf
	p.fd(20, 44, "anon_inode:[eventfd]", eventfdFDInfo)          // not a dma-buf
	p.fd(20, 45, "/dmabuf:a\nname:\tmmb-zz", vfioInfo(502, "x")) // a hostile name
	p.process(30, "sleep", 1000)
	if err := os.MkdirAll(filepath.Join(p.root, "self"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(p.root, "40"), 0o755); err != nil { // exited: no fd dir
		t.Fatal(err)
	}

	s, err := ScanProcesses(ScanOptions{Root: p.root})
	if err != nil {
		t.Fatal(err)
	}
	want := []Ref{
		{PID: 10, FD: 7, Info: FDInfo{Flags: 0o2000002, MntID: 16, Inode: 501, Size: 65536, Count: 3, ExpName: "vfio_pci_core", Name: "mmb-aa"}},
		{PID: 20, FD: 9, Info: FDInfo{Flags: 0o100002, MntID: 16, Inode: 7, Size: 8192, Count: 1, ExpName: "udmabuf"}},
		{PID: 20, FD: 40, Info: FDInfo{Flags: 0o2000002, MntID: 16, Inode: 501, Size: 65536, Count: 3, ExpName: "vfio_pci_core", Name: "mmb-aa"}},
		{PID: 20, FD: 45, Info: FDInfo{Flags: 0o2000002, MntID: 16, Inode: 502, Size: 65536, Count: 3, ExpName: "vfio_pci_core", Name: "x"}},
	}
	if d := cmp.Diff(want, s.Refs); d != "" {
		t.Errorf("Refs (-want +got):\n%s", d)
	}
	wantProcs := map[int]Process{10: {PID: 10, Comm: "mmiobrokerd", UID: 0}, 20: {PID: 20, Comm: "qemu-system-x86", UID: 107}}
	if d := cmp.Diff(wantProcs, s.Processes); d != "" {
		t.Errorf("Processes (-want +got):\n%s", d)
	}
	if s.Scanned != 3 || s.Inaccessible != 0 || s.Truncated {
		t.Errorf("Scanned %d Inaccessible %d Truncated %v, want 3 0 false", s.Scanned, s.Inaccessible, s.Truncated)
	}

	// Keep filters; MaxRefs bounds and says so.
	s, err = ScanProcesses(ScanOptions{Root: p.root, Keep: func(i FDInfo) bool { return i.ExpName == "vfio_pci_core" }})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Refs) != 3 || s.Truncated {
		t.Errorf("Keep vfio_pci_core: %d refs (truncated %v), want 3", len(s.Refs), s.Truncated)
	}
	s, err = ScanProcesses(ScanOptions{Root: p.root, MaxRefs: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Refs) != 2 || !s.Truncated {
		t.Errorf("MaxRefs 2: %d refs (truncated %v), want 2 and truncated", len(s.Refs), s.Truncated)
	}
}

// A process whose descriptors cannot be listed is counted, not reported as an error. (A
// mode-0 directory would not do: the tests run as root in CI; a file where the fd directory
// should be fails the listing the same way.)
func TestScanProcessesInaccessible(t *testing.T) {
	p := newFakeProc(t)
	dir := p.process(20, "qemu", 107)
	if err := os.Remove(filepath.Join(dir, "fd")); err != nil {
		t.Fatal(err)
	}
	p.write(filepath.Join(dir, "fd"), "")
	p.process(21, "qemu", 107)
	p.fd(21, 40, "/dmabuf:mmb-aa", vfioInfo(501, "mmb-aa"))
	s, err := ScanProcesses(ScanOptions{Root: p.root})
	if err != nil {
		t.Fatal(err)
	}
	if s.Inaccessible != 1 || s.Scanned != 1 || len(s.Refs) != 1 {
		t.Errorf("got Inaccessible %d Scanned %d Refs %d, want 1 1 1", s.Inaccessible, s.Scanned, len(s.Refs))
	}
}

func TestScanProcessesNoProcfs(t *testing.T) {
	if _, err := ScanProcesses(ScanOptions{Root: filepath.Join(t.TempDir(), "none")}); err == nil {
		t.Fatal("scan of a missing procfs succeeded")
	}
}

// The real procfs: this process's own descriptors are always readable, and a test
// process has no dma-buf (the fake exporter uses memfds), so the scan finds this process
// and reports nothing for it.
func TestScanProcessesSelf(t *testing.T) {
	s, err := ScanProcesses(ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Scanned == 0 {
		t.Fatal("the scan read no process, not even itself")
	}
	if _, ok := s.Processes[os.Getpid()]; ok {
		t.Errorf("the scan reports a dma-buf in this test process: %+v", s.Refs)
	}
}
