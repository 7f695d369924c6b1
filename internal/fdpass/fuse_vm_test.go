//go:build vmtest

package fdpass

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// FUSE opcodes and sizes (include/uapi/linux/fuse.h).
const (
	fuseLookup      = 1
	fuseForget      = 2
	fuseGetattr     = 3
	fuseOpen        = 14
	fuseRelease     = 18
	fuseFlush       = 25
	fuseInit        = 26
	fuseInterrupt   = 36
	fuseDestroy     = 38
	fuseBatchForget = 42

	fuseInHeaderSize = 40
	fuseRootID       = 1
	stuckNodeID      = 2
	stuckName        = "stuck"
)

// stuckFS is a FUSE file system served from this process through /dev/fuse: one file,
// "stuck", whose FLUSH is never answered — unless it comes from a thread registered as
// friendly (the attacker closing its own copy, as a hostile FUSE server would answer its
// owner). RELEASE is never answered either (the kernel sends it without waiting).
type stuckFS struct {
	dir  string
	dev  *os.File
	done chan struct{}

	friendly sync.Map     // tid → struct{}: FLUSH from these threads is answered
	stalled  atomic.Int64 // FLUSH requests left unanswered
	released atomic.Int64 // RELEASE requests seen
	abort    func()       // closes /dev/fuse: the kernel aborts the connection, stuck requests fail
}

// mountStuckFS mounts a stuckFS, or skips when the kernel has no FUSE.
func mountStuckFS(t *testing.T) *stuckFS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	fss, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(fss, []byte("\tfuse\n")) {
		t.Skip("the kernel has no FUSE file system (CONFIG_FUSE_FS is a module that the busybox image does not load; the iommufd kernel builds it in)")
	}
	devPath := "/dev/fuse"
	if _, err := os.Stat(devPath); errors.Is(err, os.ErrNotExist) {
		devPath = filepath.Join(t.TempDir(), "fuse")
		if err := unix.Mknod(devPath, unix.S_IFCHR|0o600, int(unix.Mkdev(10, 229))); err != nil {
			t.Fatalf("mknod %s: %v", devPath, err)
		}
	}
	// Mount first, then hand the fd to the poller: before the mount, /dev/fuse polls as
	// EPOLLERR and the runtime would mark it not pollable. With the poller, closing the
	// file wakes the reader.
	fd, err := unix.Open(devPath, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatalf("open %s: %v", devPath, err)
	}
	dir := t.TempDir()
	opts := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)
	if err := unix.Mount("mmb-stuck", dir, "fuse", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		unix.Close(fd)
		t.Fatalf("mount fuse on %s: %v", dir, err)
	}
	dev := os.NewFile(uintptr(fd), devPath)
	fs := &stuckFS{dir: dir, dev: dev, done: make(chan struct{})}
	fs.abort = sync.OnceFunc(func() {
		dev.Close()
		<-fs.done
	})
	go fs.serve(t)
	t.Cleanup(func() {
		fs.abort()
		if err := unix.Unmount(fs.dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", fs.dir, err)
		}
	})
	return fs
}

func (fs *stuckFS) serve(t *testing.T) {
	defer close(fs.done)
	buf := make([]byte, 1<<20)
	for {
		n, err := fs.dev.Read(buf)
		if err != nil {
			// ErrClosed after abort; ENODEV (or EPOLLERR: not pollable) once the
			// connection is gone.
			if !errors.Is(err, os.ErrClosed) && !errors.Is(err, unix.ENODEV) && !strings.Contains(err.Error(), "not pollable") {
				t.Errorf("read /dev/fuse: %v", err)
			}
			return
		}
		if n < fuseInHeaderSize {
			t.Errorf("short FUSE request (%d bytes)", n)
			return
		}
		fs.handle(t, buf[:n])
	}
}

func (fs *stuckFS) handle(t *testing.T, req []byte) {
	le := binary.LittleEndian
	op := le.Uint32(req[4:])
	unique := le.Uint64(req[8:])
	node := le.Uint64(req[16:])
	pid := le.Uint32(req[32:]) // the requesting thread (task_pid)
	body := req[fuseInHeaderSize:]
	switch op {
	case fuseInit:
		out := make([]byte, 64) // struct fuse_init_out
		le.PutUint32(out[0:], 7)
		le.PutUint32(out[4:], 31)
		le.PutUint32(out[8:], le.Uint32(body[8:])) // max_readahead as asked
		le.PutUint16(out[16:], 16)                 // max_background
		le.PutUint16(out[18:], 12)                 // congestion_threshold
		le.PutUint32(out[20:], 4096)               // max_write
		le.PutUint32(out[24:], 1)                  // time_gran
		fs.reply(t, unique, 0, out)
	case fuseLookup:
		name, _, _ := bytes.Cut(body, []byte{0})
		if node != fuseRootID || string(name) != stuckName {
			fs.reply(t, unique, -int32(unix.ENOENT), nil)
			return
		}
		out := make([]byte, 40, 128) // struct fuse_entry_out
		le.PutUint64(out[0:], stuckNodeID)
		fs.reply(t, unique, 0, append(out, fuseAttr(stuckNodeID)...))
	case fuseGetattr:
		out := make([]byte, 16, 104) // struct fuse_attr_out
		fs.reply(t, unique, 0, append(out, fuseAttr(node)...))
	case fuseOpen:
		out := make([]byte, 16) // struct fuse_open_out; no FOPEN_NOFLUSH
		le.PutUint64(out[0:], 1)
		fs.reply(t, unique, 0, out)
	case fuseFlush:
		if _, ok := fs.friendly.Load(pid); ok {
			fs.reply(t, unique, 0, nil)
			return
		}
		fs.stalled.Add(1) // never answered
	case fuseRelease:
		fs.released.Add(1) // never answered: nobody waits for it
	case fuseForget, fuseBatchForget, fuseInterrupt:
		// no reply
	case fuseDestroy:
		fs.reply(t, unique, 0, nil)
	default:
		fs.reply(t, unique, -int32(unix.ENOSYS), nil)
	}
}

// fuseAttr is struct fuse_attr (88 bytes) of the root directory or the file.
func fuseAttr(node uint64) []byte {
	le := binary.LittleEndian
	a := make([]byte, 88)
	le.PutUint64(a[0:], node)
	mode := uint32(unix.S_IFREG | 0o644)
	if node == fuseRootID {
		mode = unix.S_IFDIR | 0o755
	}
	le.PutUint32(a[60:], mode)
	le.PutUint32(a[64:], 1)    // nlink
	le.PutUint32(a[80:], 4096) // blksize
	return a
}

func (fs *stuckFS) reply(t *testing.T, unique uint64, errno int32, out []byte) {
	b := make([]byte, 16, 16+len(out))
	binary.LittleEndian.PutUint32(b[0:], uint32(16+len(out)))
	binary.LittleEndian.PutUint32(b[4:], uint32(errno))
	binary.LittleEndian.PutUint64(b[8:], unique)
	if _, err := fs.dev.Write(append(b, out...)); err != nil && !errors.Is(err, unix.ENOENT) {
		t.Errorf("write /dev/fuse: %v", err)
	}
}

// friendlyClose closes fd with its FLUSH answered, as a hostile client closes its own
// copy after sending it: the sent reference may then be the last one.
func (fs *stuckFS) friendlyClose(t *testing.T, fd int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := uint32(unix.Gettid())
	fs.friendly.Store(tid, struct{}{})
	defer fs.friendly.Delete(tid)
	done := make(chan error, 1)
	go func() {
		// Only a timer: the close itself must run on this locked thread.
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("closing our own FUSE fd has not returned after 20 s (FLUSH from a friendly thread not recognised?)")
		}
	}()
	err := unix.Close(fd)
	done <- err
	if err != nil {
		t.Errorf("close our FUSE fd: %v", err)
	}
}

// TestVMClaimFdFromStuckFUSE is the claim-slot jamming attack: a client attaches to its
// claim request an fd of a FUSE file whose FLUSH never answers, over and over (more than
// the per-uid and the shared reject slots). A server that installs and closes such fds
// gets stuck in close(2) in a slot goroutine. The server must hold none of them, honest
// claims of the same uid must go through and Serve must stop promptly.
func TestVMClaimFdFromStuckFUSE(t *testing.T) {
	kernelHas := kernelHasPassRights(t)
	for _, tc := range []struct {
		name     string
		fallback bool // as on a kernel without SO_PASSRIGHTS
	}{
		{"passrights", false},
		{"no-passrights", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.fallback && !kernelHas {
				t.Skip("the kernel has no SO_PASSRIGHTS (Linux 6.16+)")
			}
			testStuckFUSE(t, tc.fallback)
		})
	}
}

func testStuckFUSE(t *testing.T, fallback bool) {
	fs := mountStuckFS(t)
	buf := memfd(t, "x")
	fc := &fakeClaimer{claim: func(context.Context, Request, Peer) (Grant, *os.File, error) {
		f, err := dup(buf)
		return Grant{Generation: 1, Size: 1}, f, err
	}}
	opt := Options{}
	l := listenTest(t)
	path := l.Addr().String()
	if fallback {
		// As on a kernel without SO_PASSRIGHTS (or a socket systemd created without it):
		// the listener accepts fds.
		opt = withoutPassRights(opt)
		if err := setPassRights(l, 1); err != nil && kernelHasPassRights(t) {
			t.Fatal(err)
		}
	}
	good, _ := EncodeRequest(Request{LeaseID: "L", Token: "T"})
	var sendErrs, wrongReplies []string
	replyTimeouts := 0
	// attack sends a claim request with a fresh FUSE fd attached, then closes its own
	// copy (with its FLUSH answered): the copy in flight may be the last reference.
	attack := func(i int) *net.UnixConn {
		fd, err := unix.Open(filepath.Join(fs.dir, stuckName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("attack %d: open the FUSE file: %v", i, err)
		}
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
		if err != nil {
			fs.friendlyClose(t, fd)
			t.Fatalf("attack %d: dial: %v", i, err)
		}
		_, _, serr := c.WriteMsgUnix(good, unix.UnixRights(fd), nil)
		fs.friendlyClose(t, fd)
		switch {
		case !fallback:
			// The documented answer with SO_PASSRIGHTS: sendmsg fails with EPERM.
			if !errors.Is(serr, unix.EPERM) {
				sendErrs = append(sendErrs, fmt.Sprintf("attack %d: sendmsg = %v, want EPERM", i, serr))
			}
		case serr != nil:
			sendErrs = append(sendErrs, fmt.Sprintf("attack %d: sendmsg = %v, want it accepted", i, serr))
		}
		return c
	}
	// checkReply reads the answer to an attack: INVALID_REQUEST without SO_PASSRIGHTS
	// (RESOURCE_EXHAUSTED too if busy), nothing to read with it.
	checkReply := func(i int, c *net.UnixConn, busyOK bool) {
		defer c.Close()
		if !fallback || replyTimeouts > 0 {
			return
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		rep, err := readReply(t, c)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			replyTimeouts++
			wrongReplies = append(wrongReplies, fmt.Sprintf("attack %d: no reply within 5 s", i))
		case err == nil && (rep.Code == CodeInvalidRequest || busyOK && rep.Code == CodeResourceExhausted):
		default:
			wrongReplies = append(wrongReplies, fmt.Sprintf("attack %d: reply %v (%q), %v; want INVALID_REQUEST", i, rep.Code, rep.Message, err))
		}
	}

	// Phase 1: requests queued before the server runs (as under socket activation), more
	// than a uid's slots. Without SO_PASSRIGHTS the server's recvmsg drops the last
	// reference of each file.
	const early, attacks = 32, 96 // 96 > 16 per-uid slots + 64 shared reject slots
	start := time.Now()
	var queued []*net.UnixConn
	for i := range early {
		queued = append(queued, attack(i))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := NewServer(fc, opt)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, l) }()
	for i, c := range queued {
		checkReply(i, c, true)
	}
	// Phase 2: one after the other against the running server.
	for i := early; i < attacks; i++ {
		checkReply(i, attack(i), false)
	}
	t.Logf("%d attacks in %v; FLUSH left unanswered: %d, RELEASE seen: %d", attacks, time.Since(start).Round(time.Millisecond), fs.stalled.Load(), fs.released.Load())
	for _, list := range [][]string{sendErrs, wrongReplies} {
		if len(list) > 0 {
			t.Errorf("%d attacks got the wrong answer, first: %s", len(list), list[0])
		}
	}

	// Honest claims of the same uid, more than its 16 slots, one after the other.
	for i := range 24 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var f *os.File
		var err error
		for {
			f, _, err = Claim(ctx, path, "L", "T")
			// A slot the server frees just after replying may still be counted.
			if re, ok := errors.AsType[*ReplyError](err); ok && re.Code == CodeResourceExhausted && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			break
		}
		cancel()
		if err != nil {
			t.Errorf("honest claim %d after the attacks: %v", i, err)
			break
		}
		f.Close()
	}
	if n := fs.stalled.Load(); n > 0 {
		t.Errorf("the server flushed %d clients' FUSE files (close(2) of an fd a client attached)", n)
	}

	stopStart := time.Now()
	cancel()
	select {
	case err := <-errc:
		t.Logf("Serve stopped in %v", time.Since(stopStart).Round(time.Millisecond))
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("Serve has not stopped 10 s after its context ended (claim goroutines stuck)")
		fs.abort() // unblock the stuck requests so the test can finish
		<-errc
	}
	if held := fdsUnder(t, fs.dir); len(held) > 0 {
		t.Errorf("this process (the server) still holds FUSE fds: %v", held)
	}
}

// fdsUnder lists this process's fds that refer to files under dir.
func fdsUnder(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var held []string
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, dir+"/") {
			held = append(held, e.Name()+" -> "+target)
		}
	}
	return held
}
