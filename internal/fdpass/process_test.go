package fdpass

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestClaimFromChildProcess is the real thing: a second process claims over the socket
// and receives the fd by SCM_RIGHTS. The child reports the received fd's inode (by
// fstat) and writes into it; the parent checks the inode and sees the write in its own
// copy. The Claimer must see the child's pid, and the pinned Process must follow the
// child's exit.
func TestClaimFromChildProcess(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, strings.Repeat("\x00", 64))
	type seen struct {
		peer Peer
		proc *peercred.Process
	}
	seenc := make(chan seen, 1)
	fc := &fakeClaimer{claim: func(_ context.Context, req Request, peer Peer) (Grant, *os.File, error) {
		if req.LeaseID != exampleRequest.LeaseID || req.Token != exampleRequest.Token {
			return Grant{}, nil, fmt.Errorf("unexpected request %+v", req)
		}
		// Keep the peer pinned beyond the call, as the broker does for a holder.
		proc, err := peer.Process.Dup()
		if err != nil {
			return Grant{}, nil, err
		}
		seenc <- seen{peer: peer, proc: proc}
		f, err := dup(buf)
		return Grant{Generation: 7, Size: 64}, f, err
	}}
	ts := startServer(t, fc, Options{})

	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envChild+"=claim", envSock+"="+ts.path,
		envLease+"="+exampleRequest.LeaseID, envToken+"="+exampleRequest.Token,
		"GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("child: %v\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	var pid int32
	var ino, replyIno, gen uint64
	if _, err := fmt.Sscanf(stdout.String(), "pid=%d inode=%d reply_inode=%d generation=%d", &pid, &ino, &replyIno, &gen); err != nil {
		t.Fatalf("child output %q: %v", stdout.String(), err)
	}
	s := <-seenc
	defer s.proc.Close()

	if want := inodeOf(t, buf); ino != want || replyIno != want {
		t.Errorf("child's fd is inode %d (reply says %d), parent's file is inode %d", ino, replyIno, want)
	}
	if gen != 7 {
		t.Errorf("child saw generation %d, want 7", gen)
	}
	if pid != int32(cmd.Process.Pid) || s.peer.PID != pid {
		t.Errorf("claimer saw pid %d, child is %d (reports %d)", s.peer.PID, cmd.Process.Pid, pid)
	}
	if s.peer.UID != uint32(os.Geteuid()) {
		t.Errorf("claimer saw uid %d, want %d", s.peer.UID, os.Geteuid())
	}
	got := make([]byte, len(childMark))
	if _, err := buf.ReadAt(got, 0); err != nil || string(got) != childMark {
		t.Errorf("parent's file holds %q, %v; want the child's %q", got, err, childMark)
	}
	// The child has exited and been reaped: the pinned process says so.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.proc.Wait(ctx); err != nil {
		t.Errorf("Wait on the child's pidfd: %v", err)
	}
	if s.proc.Alive() {
		t.Error("the child's pinned process is alive after exit")
	}
}
