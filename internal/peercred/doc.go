// Package peercred identifies the process at the other end of an AF_UNIX socket and pins
// it with a pidfd, so that a PID that is recycled later can never be mistaken for it.
//
// [FromConn] reads SO_PEERCRED (uid, gid, pid at connect time), SO_PEERGROUPS
// (supplementary groups) and SO_PEERPIDFD (Linux 6.5+; a pidfd to exactly the process that
// connected). On older kernels it falls back to pidfd_open(pid) followed by checks that make
// a mix-up unlikely but not impossible; see [FromConn] for the residual race.
//
// # Fd lifetime
//
// A [Process] owns one pidfd (O_CLOEXEC, O_NONBLOCK, registered with the Go runtime poller).
// [Process.Close] is idempotent; [Process.Dup] returns an independent Process with its own
// pidfd that the caller must close. A Process never keeps the process itself alive: after the
// process exits, [Process.Alive] reports false and [Process.Wait] returns, and the pidfd
// still refers to that same (dead) process, never to a new one with the same PID.
// [Process.Wait] blocks in the runtime poller, not in a system call, so waiting costs no
// OS thread.
//
// # gRPC
//
// [NewTransportCredentials] returns gRPC transport credentials for unix sockets. On the
// server, each accepted connection's handshake produces an [AuthInfo] carrying the peer's
// [Creds] and a [Process]. That Process belongs to the connection: it is closed when gRPC
// closes the connection, so handlers that need the process beyond the connection (a lease
// holder) must [Process.Dup] it while the RPC runs. Handlers read it with [FromContext].
package peercred
