package fdpass

import (
	"context"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkSCMRightsBare is the floor: one fd over a SOCK_SEQPACKET socketpair with
// sendmsg/recvmsg (MSG_CMSG_CLOEXEC), plus closing the received fd.
func BenchmarkSCMRightsBare(b *testing.B) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	f := memfd(b, "x")
	rights := unix.UnixRights(int(f.Fd()))
	msg := make([]byte, ReplyFixedSize+26+12)
	buf := make([]byte, MaxReplySize)
	oob := make([]byte, unix.CmsgSpace(4*maxReplyFDs))
	b.ReportAllocs()
	for b.Loop() {
		if err := unix.Sendmsg(fds[0], msg, rights, nil, 0); err != nil {
			b.Fatal(err)
		}
		_, oobn, _, _, err := unix.Recvmsg(fds[1], buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		if closeRights(oob[:oobn]) != 1 {
			b.Fatal("no fd received")
		}
	}
}

// BenchmarkClaimRoundTrip is a full claim: connect, request, peer credentials and pidfd,
// fake Claimer (dup of a memfd), reply with the fd, client checks, close.
func BenchmarkClaimRoundTrip(b *testing.B) {
	buf := memfd(b, "x")
	fc := claimFunc(func(context.Context, Request, Peer) (Grant, *os.File, error) {
		f, err := dup(buf)
		return Grant{Generation: 1, Size: 4096, BDF: "0000:00:03.0"}, f, err
	})
	ts := startServer(b, fc, Options{})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		f, _, err := Claim(ctx, ts.path, exampleRequest.LeaseID, exampleRequest.Token)
		if err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// claimFunc is a Claimer without delivery reports.
type claimFunc func(context.Context, Request, Peer) (Grant, *os.File, error)

func (f claimFunc) Claim(ctx context.Context, req Request, peer Peer) (Grant, *os.File, error) {
	return f(ctx, req, peer)
}

// BenchmarkDialSCMRightsBare is the floor of a claim through the net package: dial a
// SOCK_SEQPACKET listener, send a 32-byte request, receive a reply carrying one fd (the
// server's dup of a memfd) and close both ends, with no credentials, pidfd or checks.
func BenchmarkDialSCMRightsBare(b *testing.B) {
	l := listenTest(b)
	defer l.Close()
	f := memfd(b, "x")
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			req := make([]byte, 64)
			if _, err := c.Read(req); err == nil {
				if d, err := dup(f); err == nil {
					c.WriteMsgUnix(make([]byte, ReplyFixedSize+24+12), unix.UnixRights(int(d.Fd())), nil)
					d.Close()
				}
			}
			c.Close()
		}
	}()
	path := l.Addr().String()
	req := make([]byte, 32)
	buf := make([]byte, MaxReplySize)
	oob := make([]byte, unix.CmsgSpace(4*maxReplyFDs))
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			b.Fatal(err)
		}
		if closeRights(oob[:oobn]) != 1 {
			b.Fatal("no fd received")
		}
		c.Close()
	}
}
