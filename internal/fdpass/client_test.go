package fdpass

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// fakeServerPair returns a connected SOCK_SEQPACKET pair: the client end as a
// *net.UnixConn for ClaimConn and the raw server end (closed at cleanup; closing it
// earlier is fine).
func fakeServerPair(t *testing.T) (*net.UnixConn, int) {
	c, srv := fakeServerPairFile(t)
	return c, int(srv.Fd())
}

func fakeServerPairFile(t *testing.T) (*net.UnixConn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "client")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		t.Fatal(err)
	}
	srv := os.NewFile(uintptr(fds[1]), "server")
	t.Cleanup(func() {
		c.Close()
		srv.Close()
	})
	return c.(*net.UnixConn), srv
}

// TestClaimRejectsBadReplies plays a misbehaving server; the client must refuse each
// reply and close every fd that came with it (FDLeakCheck).
func TestClaimRejectsBadReplies(t *testing.T) {
	testutil.FDLeakCheck(t)
	buf := memfd(t, "x")
	ino := inodeOf(t, buf)
	enc := func(r Reply) []byte {
		b, err := EncodeReply(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ok := Reply{Code: CodeOK, LeaseID: "L", Inode: ino}
	for _, tc := range []struct {
		name string
		msg  []byte
		fds  int
	}{
		{"two fds", enc(ok), 2},
		{"four fds", enc(ok), 4},
		{"too many fds", enc(ok), 8},
		{"no fd", enc(ok), 0},
		{"fd on error reply", enc(Reply{Code: CodeNotFound, Message: "gone"}), 1},
		{"inode mismatch", enc(Reply{Code: CodeOK, LeaseID: "L", Inode: ino + 1}), 1},
		{"other lease", enc(Reply{Code: CodeOK, LeaseID: "M", Inode: ino}), 1},
		{"garbage", []byte("garbage, not a reply"), 1},
		{"request instead of reply", func() []byte { b, _ := EncodeRequest(Request{LeaseID: "L", Token: "T"}); return b }(), 1},
		{"oversized", make([]byte, MaxReplySize+100), 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, srv := fakeServerPair(t)
			var rights []int
			rc, _ := buf.SyscallConn()
			rc.Control(func(fd uintptr) {
				for range tc.fds {
					rights = append(rights, int(fd))
				}
				// Queue the reply before the client asks: SOCK_SEQPACKET keeps it.
				var oob []byte
				if len(rights) > 0 {
					oob = unix.UnixRights(rights...)
				}
				if err := unix.Sendmsg(srv, tc.msg, oob, nil, 0); err != nil {
					t.Fatal(err)
				}
			})
			f, _, err := ClaimConn(testCtx(t), c, Request{LeaseID: "L", Token: "T"})
			if f != nil {
				f.Close()
				t.Fatal("ClaimConn accepted the reply")
			}
			if !IsProtocolError(err) {
				t.Errorf("err = %v, want a protocol error", err)
			}
		})
	}
}

func TestClaimServerHangsUp(t *testing.T) {
	testutil.FDLeakCheck(t)
	c, srv := fakeServerPair(t)
	if err := unix.Shutdown(srv, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	_, _, err := ClaimConn(testCtx(t), c, Request{LeaseID: "L", Token: "T"})
	if !errors.Is(err, errdefs.ErrUnavailable) && !errors.Is(err, unix.EPIPE) {
		t.Errorf("err = %v, want ErrUnavailable or EPIPE", err)
	}
}

func TestClaimContext(t *testing.T) {
	testutil.FDLeakCheck(t)
	c, _ := fakeServerPair(t) // a server that never answers
	ctx, cancel := context.WithCancel(context.Background())
	go cancel()
	_, _, err := ClaimConn(ctx, c, Request{LeaseID: "L", Token: "T"})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
}

func TestClaimInvalidRequest(t *testing.T) {
	testutil.FDLeakCheck(t)
	_, _, err := Claim(testCtx(t), "/nonexistent/fd.sock", "has space", "T")
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("err = %v, want ErrInvalidArgument before dialing", err)
	}
	_, _, err = Claim(testCtx(t), testutil.ShortTempDir(t)+"/none.sock", "L", "T")
	if err == nil || !errors.Is(err, unix.ENOENT) {
		t.Errorf("err = %v, want ENOENT", err)
	}
}

// TestRecvReplyAfterReset: the server replied and closed without reading the request.
// The kernel reports ECONNRESET first; the reply must still be read.
func TestRecvReplyAfterReset(t *testing.T) {
	testutil.FDLeakCheck(t)
	c, srvf := fakeServerPairFile(t)
	srv := int(srvf.Fd())
	b, err := EncodeReply(Reply{Code: CodeUnavailable, Message: "busy"})
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Sendmsg(srv, b, nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("request the server never reads")); err != nil {
		t.Fatal(err)
	}
	srvf.Close()
	buf := make([]byte, MaxReplySize+1)
	n, _, _, err := recvReply(c, buf, nil)
	if err != nil {
		t.Fatalf("recvReply: %v", err)
	}
	if rep, err := DecodeReply(buf[:n]); err != nil || rep.Code != CodeUnavailable {
		t.Errorf("reply %+v, %v; want UNAVAILABLE", rep, err)
	}
}
