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
// Revocation does not go through this package: when the broker revokes, the kernel makes
// the delivered fd useless; surviving leases of the same device come back as a new
// generation that their holders claim again with the new token from the event stream.
package fdpass
