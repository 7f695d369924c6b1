package fdpass

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// With envChild set the test binary is a claiming VMM instead of a test run.
const (
	envChild = "MMB_FDPASS_CHILD" // "claim"
	envSock  = "MMB_FDPASS_SOCK"
	envLease = "MMB_FDPASS_LEASE"
	envToken = "MMB_FDPASS_TOKEN"
)

// childMark is what the child writes at offset 0 of the fd it received.
const childMark = "written-by-child"

func TestMain(m *testing.M) {
	if os.Getenv(envChild) == "claim" {
		if err := runClaimChild(); err != nil {
			fmt.Printf("error=%v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// runClaimChild claims, then reports its pid and the received fd's inode (by fstat) on
// stdout and marks the file so the parent can see it is the same one.
func runClaimChild() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, rep, err := Claim(ctx, os.Getenv(envSock), os.Getenv(envLease), os.Getenv(envToken))
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if _, err := f.WriteAt([]byte(childMark), 0); err != nil {
		return err
	}
	fmt.Printf("pid=%d inode=%d reply_inode=%d generation=%d\n",
		os.Getpid(), fi.Sys().(*syscall.Stat_t).Ino, rep.Inode, rep.Generation)
	return nil
}

// memfd returns a new memfd holding content.
func memfd(t testing.TB, content string) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("mmb-fdpass-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// dup returns an O_CLOEXEC duplicate of f, as the broker's Buffer.Dup does.
func dup(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}

func inodeOf(t testing.TB, f *os.File) uint64 {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Fatal(errors.New("no Stat_t"))
	}
	return st.Ino
}

// closeRights closes every fd in SCM_RIGHTS messages of oob and returns how many.
func closeRights(oob []byte) int {
	fds := ParseRights(oob)
	for _, fd := range fds {
		unix.Close(fd)
	}
	return len(fds)
}
