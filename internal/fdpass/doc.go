// Package fdpass is the claim socket: the unix socket on which a VMM that was granted a
// lease over gRPC collects the lease's dma-buf fd by SCM_RIGHTS.
//
// The protocol (docs/claim-protocol.md) runs on a SOCK_SEQPACKET socket: the client
// connects, sends one [Request] (lease id and one-time claim token) and receives one
// [Reply]; a success reply carries exactly one fd, an error reply none and a stable
// [Code]. The wire format is a small versioned little-endian binary layout ([EncodeRequest],
// [DecodeRequest], [EncodeReply], [DecodeReply]) that a C or Rust VMM can implement from
// the document alone.
//
// [Server] identifies each client with [peercred.FromConn] (uid, gid, groups, pid and a
// pidfd that pins the process) before it reads the request, and hands request and [Peer]
// to a [Claimer], which decides. fdpass knows nothing about leases: the broker's adapter
// implements Claimer and must check that the peer is the process that allocated the lease
// (for example with [peercred.Process.Same] against the holder's pinned process).
//
// # Fd lifetime
//
// The fd a Claimer returns belongs to the server from then on, also on error; the server
// closes it after sendmsg, so the only copy left is the one in flight to the client (the
// kernel closes that if the client dies before receiving it). The broker keeps its own
// dma-buf and hands the Claimer a dup. Peer.Process is borrowed for the Claim call.
//
// [Claim] receives with MSG_CMSG_CLOEXEC and closes every fd it received whenever it
// returns an error: a reply with more than one fd, an fd on an error reply, or an fd whose
// inode differs from the reply's. On success the caller owns the returned *os.File.
//
// # Fds from clients
//
// The claim socket accepts no fds from clients, and [Server] never calls close(2) on a
// file a client sent: a close runs the file's ->flush in the closing thread, and a FUSE
// file whose FLUSH is never answered (or a hung NFS file) would block it uninterruptibly,
// pinning a claim slot (16 per uid, 64 shared for rejections) and Serve's return.
//
//   - Linux 6.16 and later: [Listen] and Serve set SO_PASSRIGHTS to 0 on the listener
//     (net/core/sock.c sk_setsockopt sets sk_scm_rights). Connections inherit it when the
//     client connects, before accept (net/unix/af_unix.c unix_stream_connect copies
//     sk_scm_recv_flags), and the server sets it again on each accepted socket. A
//     client's sendmsg that attaches SCM_RIGHTS then fails with EPERM in the client
//     (unix_dgram_sendmsg, which SOCK_SEQPACKET uses): nothing is queued, the client keeps
//     its fds, and no file of a client reaches the broker. Exception: a listener created
//     by someone else (systemd socket activation) has the flag at 1 until Serve starts,
//     and connections made before that are handled as on an older kernel.
//   - Older kernels (setsockopt answers ENOPROTOOPT): requests are read without a control
//     buffer. The kernel then installs no fd, sets MSG_CTRUNC (scm_recv) and drops the
//     files (scm_destroy → fput), and the server answers INVALID_REQUEST. No close(2) and
//     no ->flush happens, so the stuck-FLUSH attack blocks nothing. What remains: the
//     last reference of a dropped file is put in the thread that called recvmsg (or that
//     closes a connection with messages still queued): fput defers __fput to task_work,
//     which runs in that thread before the syscall returns, and __fput calls ->release.
//     FUSE sends RELEASE without waiting for it, but a file whose ->release itself waits
//     (a FUSE mount with writeback cache and dirty pages, which writes them back first; a
//     fuseblk mount, whose RELEASE is synchronous; a hung NFSv4 mount) can still hold
//     that goroutine, its slot, and Serve's return, until the file system answers. Only
//     SO_PASSRIGHTS removes that; Serve logs a warning when the kernel lacks it.
//
// Revocation does not go through this package: when the broker revokes, the kernel makes
// the delivered fd useless; surviving leases of the same device come back as a new
// generation that their holders claim again with the new token from the event stream.
package fdpass
