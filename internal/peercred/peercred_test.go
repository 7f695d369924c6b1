package peercred

import (
	"context"
	"errors"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

var pinModes = []struct {
	name string
	mode pinMode
}{
	{"SO_PEERPIDFD", pinPeerPidfd},
	{"pidfd_open fallback", pinFallback},
}

// expectedCreds returns the credentials to give the child and the Creds the parent
// should then see. As root the child drops to nobody with extra groups, so that UID, GID
// and groups all differ from the parent's.
func expectedCreds(t *testing.T, groups []uint32) (childCreds, Creds) {
	t.Helper()
	if os.Geteuid() != 0 {
		self, err := os.Getgroups()
		if err != nil {
			t.Fatal(err)
		}
		var g []uint32
		for _, x := range self {
			g = append(g, uint32(x))
		}
		return keepCreds, Creds{UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()), Groups: g}
	}
	return childCreds{uid: 65534, gid: 65533, groups: groups},
		Creds{UID: 65534, GID: 65533, Groups: groups}
}

func normalize(c Creds) Creds {
	c.Groups = slices.Clone(c.Groups)
	slices.Sort(c.Groups)
	if len(c.Groups) == 0 {
		c.Groups = nil
	}
	return c
}

func TestFromConnChildProcess(t *testing.T) {
	for _, pm := range pinModes {
		t.Run(pm.name, func(t *testing.T) {
			testutil.FDLeakCheck(t)
			cc, want := expectedCreds(t, []uint32{100, 4242, 65534})
			ch := startChild(t, "hold", cc)
			ch.ready(t)
			rc, err := ch.conn.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			creds, proc, err := fromRawConn(rc, pm.mode, false)
			if err != nil {
				t.Fatalf("fromRawConn: %v", err)
			}
			defer proc.Close()
			want.PID = ch.pid
			if diff := cmp.Diff(normalize(want), normalize(creds)); diff != "" {
				t.Errorf("creds (-want +got):\n%s", diff)
			}
			if proc.PID() != ch.pid {
				t.Errorf("PID() = %d, want %d", proc.PID(), ch.pid)
			}
			if !proc.Alive() {
				t.Fatal("Alive() = false for a running child")
			}

			ch.conn.Close() // the child exits when it sees EOF
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := proc.Wait(ctx); err != nil {
				t.Fatalf("Wait: %v", err)
			}
			if proc.Alive() {
				t.Error("Alive() = true after Wait returned")
			}
			if err := ch.wait(); err != nil {
				t.Fatalf("child: %v", err)
			}
			if proc.Alive() {
				t.Error("Alive() = true after the child was reaped")
			}
			// The pidfd still names the dead child: Wait returns at once.
			if err := proc.Wait(ctx); err != nil {
				t.Errorf("Wait after exit: %v", err)
			}
		})
	}
}

func TestFromConnPublic(t *testing.T) {
	testutil.FDLeakCheck(t)
	ch := startChild(t, "hold", keepCreds)
	ch.ready(t)
	creds, proc, err := FromConn(ch.conn)
	if err != nil {
		t.Fatal(err)
	}
	defer proc.Close()
	if creds.PID != ch.pid || creds.UID != uint32(os.Geteuid()) {
		t.Errorf("creds = %+v, want pid %d uid %d", creds, ch.pid, os.Geteuid())
	}
	if _, _, err := FromConn(nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("FromConn(nil) = %v, want ErrInvalidArgument", err)
	}
}

// TestFromConnManyGroups makes SO_PEERGROUPS answer ERANGE on the first try.
func TestFromConnManyGroups(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	testutil.FDLeakCheck(t)
	var groups []uint32
	for g := uint32(20000); g < 20100; g++ {
		groups = append(groups, g)
	}
	cc, want := expectedCreds(t, groups)
	ch := startChild(t, "hold", cc)
	ch.ready(t)
	creds, proc, err := FromConn(ch.conn)
	if err != nil {
		t.Fatal(err)
	}
	proc.Close()
	want.PID = ch.pid
	if diff := cmp.Diff(normalize(want), normalize(creds)); diff != "" {
		t.Errorf("creds (-want +got):\n%s", diff)
	}
}

// TestFromConnReapedPeer: a peer that exited and was reaped before it was pinned must
// never be reported alive.
func TestFromConnReapedPeer(t *testing.T) {
	for _, pm := range pinModes {
		t.Run(pm.name, func(t *testing.T) {
			testutil.FDLeakCheck(t)
			ch := startChild(t, "exit", keepCreds)
			if err := ch.wait(); err != nil {
				t.Fatalf("child: %v", err)
			}
			rc, err := ch.conn.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			_, proc, err := fromRawConn(rc, pm.mode, false)
			switch {
			case pm.mode == pinFallback:
				// pidfd_open of a reaped pid fails; so does the recheck if the pid was reused.
				if !errors.Is(err, errdefs.ErrFailedPrecondition) {
					t.Fatalf("fallback on a reaped peer: err = %v, want ErrFailedPrecondition", err)
				}
			case err != nil:
				// Kernels before 6.16 refuse SO_PEERPIDFD for reaped peers.
				t.Logf("SO_PEERPIDFD on a reaped peer: %v", err)
			default:
				defer proc.Close()
				if proc.Alive() {
					t.Fatal("reaped peer reported alive")
				}
			}
		})
	}
}

func TestFromConnRejectsNonUnix(t *testing.T) {
	testutil.FDLeakCheck(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, _, err := fromSyscallConn(s, pinPeerPidfd); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("tcp: err = %v, want ErrInvalidArgument", err)
	}
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if _, _, err := fromSyscallConn(p1, pinPeerPidfd); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("net.Pipe: err = %v, want ErrInvalidArgument", err)
	}
}

// TestPeerGroupsRetry drives the ERANGE retry directly with a one-entry first buffer.
func TestPeerGroupsRetry(t *testing.T) {
	testutil.FDLeakCheck(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	self, err := os.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	var want []uint32
	for _, g := range self {
		want = append(want, uint32(g))
	}
	for _, n := range []int{1, 16, len(want) + 1} {
		got, err := peerGroupsSized(fds[0], n)
		if err != nil {
			t.Fatalf("initial size %d: %v", n, err)
		}
		if diff := cmp.Diff(normalize(Creds{Groups: want}), normalize(Creds{Groups: got})); diff != "" {
			t.Errorf("initial size %d: groups (-want +got):\n%s", n, diff)
		}
	}
}

func TestCredsInGroup(t *testing.T) {
	c := Creds{GID: 10, Groups: []uint32{20, 30}}
	for gid, want := range map[uint32]bool{10: true, 20: true, 30: true, 0: false, 40: false} {
		if got := c.InGroup(gid); got != want {
			t.Errorf("InGroup(%d) = %v, want %v", gid, got, want)
		}
	}
}
