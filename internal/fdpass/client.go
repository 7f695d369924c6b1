package fdpass

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// maxReplyFDs sizes the client's control buffer: room for more fds than the one a reply
// may carry, so that a misbehaving server is detected (and its fds closed) rather than
// truncated silently.
const maxReplyFDs = 4

// Claim connects to the claim socket at socketPath, claims leaseID with token and
// returns the lease's dma-buf fd (O_CLOEXEC; the caller owns it) with the reply that
// describes it.
//
// An error reply comes back as a *[ReplyError] together with the decoded Reply;
// errors.Is matches it against errdefs classes. Any other failure (including a reply
// that carries more than one fd, an fd on an error reply, or an fd whose inode differs
// from the reply's) closes every fd received and returns an error.
func Claim(ctx context.Context, socketPath, leaseID, token string) (*os.File, Reply, error) {
	req := Request{LeaseID: leaseID, Token: token}
	if _, err := EncodeRequest(req); err != nil {
		return nil, Reply{}, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socketPath)
	if err != nil {
		return nil, Reply{}, fmt.Errorf("claim lease %s: %w", leaseID, err)
	}
	defer c.Close()
	return ClaimConn(ctx, c.(*net.UnixConn), req)
}

// ClaimConn is [Claim] on a connected SOCK_SEQPACKET socket. It does not close c; a
// connection serves one claim.
func ClaimConn(ctx context.Context, c *net.UnixConn, req Request) (*os.File, Reply, error) {
	b, err := EncodeRequest(req)
	if err != nil {
		return nil, Reply{}, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	fail := func(err error) (*os.File, Reply, error) {
		if cerr := ctx.Err(); cerr != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			err = cerr
		}
		return nil, Reply{}, fmt.Errorf("claim lease %s: %w", req.LeaseID, err)
	}

	if _, err := c.Write(b); err != nil {
		return fail(err)
	}
	buf := make([]byte, MaxReplySize+1)
	oob := make([]byte, unix.CmsgSpace(4*maxReplyFDs))
	n, oobn, flags, err := recvReply(c, buf, oob)
	fds := ParseRights(oob[:oobn])
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if errors.Is(err, io.EOF) {
		n, err = 0, nil
	}
	if err != nil {
		closeAll()
		return fail(err)
	}
	if n == 0 {
		closeAll()
		return fail(fmt.Errorf("server closed the connection without a reply: %w", errdefs.ErrUnavailable))
	}
	if flags&unix.MSG_CTRUNC != 0 {
		closeAll()
		return fail(fmt.Errorf("reply carries more than %d fds: %w", maxReplyFDs, errProtocol))
	}
	if n > MaxReplySize || flags&unix.MSG_TRUNC != 0 {
		closeAll()
		return fail(fmt.Errorf("reply larger than %d bytes: %w", MaxReplySize, errProtocol))
	}
	rep, err := DecodeReply(buf[:n])
	if err != nil {
		closeAll()
		return fail(fmt.Errorf("%w: %w", errProtocol, err))
	}
	if rep.Code != CodeOK {
		closeAll()
		if len(fds) > 0 {
			return fail(fmt.Errorf("error reply %s carries %d fds: %w", rep.Code, len(fds), errProtocol))
		}
		return nil, rep, &ReplyError{Code: rep.Code, LeaseID: req.LeaseID, Message: rep.Message}
	}
	if len(fds) != 1 {
		closeAll()
		return fail(fmt.Errorf("success reply carries %d fds, want exactly 1: %w", len(fds), errProtocol))
	}
	if rep.LeaseID != req.LeaseID {
		closeAll()
		return fail(fmt.Errorf("reply is for lease %q: %w", rep.LeaseID, errProtocol))
	}
	var st unix.Stat_t
	if err := unix.Fstat(fds[0], &st); err != nil {
		closeAll()
		return fail(os.NewSyscallError("fstat received fd", err))
	}
	if st.Ino != rep.Inode {
		closeAll()
		return fail(fmt.Errorf("received fd is inode %d, reply says %d: %w", st.Ino, rep.Inode, errProtocol))
	}
	f := os.NewFile(uintptr(fds[0]), fmt.Sprintf("dmabuf:%s:%d", rep.LeaseID, rep.Generation))
	return f, rep, nil
}

// recvReply receives one message. net.UnixConn.ReadMsgUnix uses MSG_CMSG_CLOEXEC on
// Linux. It reads once more after two answers that can come before a reply the server
// did send: ECONNRESET (a server that closed with our request unread makes the kernel
// report it ahead of the reply queued before it), and end of file — on a non-blocking
// SOCK_SEQPACKET socket a recvmsg that runs while the server queues its reply and closes
// can see the shutdown first, and the reply is there for the next read (seen on Linux
// 6.18 by test/bench, once in 100,000 round trips). After a real end of file the second
// read returns at once.
func recvReply(c *net.UnixConn, buf, oob []byte) (n, oobn, flags int, err error) {
	n, oobn, flags, _, err = c.ReadMsgUnix(buf, oob)
	if errors.Is(err, unix.ECONNRESET) || errors.Is(err, io.EOF) || (err == nil && n == 0 && oobn == 0) {
		n, oobn, flags, _, err = c.ReadMsgUnix(buf, oob)
	}
	return n, oobn, flags, err
}

// IsProtocolError reports whether err says the server broke the claim protocol (as
// opposed to refusing the claim or an I/O failure).
func IsProtocolError(err error) bool { return errors.Is(err, errProtocol) }

// ParseRights returns the fds of all SCM_RIGHTS messages in the control data oob of a
// recvmsg. On malformed control data it returns what it parsed before, so the caller can
// still close those: every fd it returns is the caller's to close.
func ParseRights(oob []byte) []int {
	var fds []int
	for len(oob) > 0 {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			break
		}
		if hdr.Level == unix.SOL_SOCKET && hdr.Type == unix.SCM_RIGHTS {
			m := unix.SocketControlMessage{Header: hdr, Data: data}
			if r, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, r...)
			}
		}
		oob = rest
	}
	return fds
}
