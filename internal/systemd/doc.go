// Package systemd is mmiobrokerd's side of the systemd service-manager protocol: readiness
// and status notifications, the watchdog, and the file descriptor store that keeps VFIO
// fds alive across daemon restarts and crashes.
//
// [FromEnv] reads what systemd put in the environment: $NOTIFY_SOCKET (a path, or an
// abstract socket written with a leading '@'), $WATCHDOG_USEC/$WATCHDOG_PID, $FDSTORE
// (FileDescriptorStoreMax=, set by systemd 254 and later) and the fds passed at start
// ($LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES, read through go-systemd's activation.Files,
// which unsets them so that no child inherits them). Without $NOTIFY_SOCKET the [Manager]
// is not [Manager.Managed] and every send is a no-op that returns nil. [New] builds a
// Manager from a [Config] instead, for tests (package systemdtest has a fake manager).
//
// Plain states go through [Manager.Notify], one datagram each, as sd_notify(3) sends them.
// go-systemd's daemon.SdNotify has the same semantics but cannot attach fds, and go-systemd
// has neither FDSTORE=1 with SCM_RIGHTS nor BARRIER=1 (sd_notify_barrier(3)); this package
// hand-writes those: [Manager.StoreFD], [Manager.RemoveFD] and [Manager.Barrier].
//
// # Fd ownership
//
//   - [Manager.StoreFD] sends a reference to the file with the notification. The caller
//     keeps its *os.File and still owns it; systemd holds its own reference from the moment
//     the datagram is queued until the entry is removed ([Manager.RemoveFD]), the fd store
//     is flushed (with the default FileDescriptorStorePreserve=restart the store survives
//     restarts, crashes and watchdog kills, but not "systemctl stop") or systemd drops it
//     (see below). StoreFD sends FDPOLL=0, so systemd never drops an entry because the fd
//     reported EPOLLHUP or EPOLLERR.
//   - The fds passed at start are held by [Restored] until taken. [Restored.Take] and
//     [Restored.TakePrefix] hand ownership to the caller; [Restored.TakeListener] turns a
//     socket-unit fd into a net.Listener and closes the file; [Restored.Close] closes every
//     fd not taken. They are duplicates: systemd keeps its own copies in the store until
//     they are removed, so closing a restored fd does not remove it from the store.
//   - [Manager.Barrier] creates a pipe, sends the write end and closes its own copy; it
//     closes the read end before it returns. No other fd is opened beyond a notification
//     socket per send, closed before the send returns.
//
// # Ordering
//
// Notifications are datagrams on one AF_UNIX SOCK_DGRAM socket that systemd reads in order,
// one at a time. [Manager.Barrier] returns once systemd has processed every notification
// this process sent before it (those whose send returned before Barrier was called):
// systemd closes the fds of a message when it is done with it, and the barrier's pipe sees
// EOF when its write end is closed. [Manager.RemoveFD] sends FDSTOREREMOVE=1 and then waits
// for a barrier, so when it returns without error systemd has unlinked every store entry of
// that name and released its reference.
//
// One caveat from systemd's source (src/core/service.c, service_fd_store_unlink): systemd
// releases a removed entry with asynchronous_close(), which closes the fd in a short-lived
// child that shares its fd table (CLONE_FILES), so that a slow close never blocks PID 1. The
// barrier orders the removal, not that child: the close it started may still be running
// when RemoveFD returns. The window is normally microseconds, but code that revokes
// dma-bufs by closing the last reference to a VFIO device fd must not treat RemoveFD as
// proof that the reference is gone; it must use an explicit revocation (or wait for an
// observable effect of the release) when that matters. The fake in package systemdtest
// closes synchronously before it answers the barrier.
//
// # What systemd does with stored fds
//
//   - An fd whose open file description is already in the store (kcmp(2) KCMP_FILE) is
//     dropped and the first entry keeps its name: store one description under one name.
//     On kernels without kcmp systemd compares inode and flags, which makes fds of the same
//     anonymous inode (such as VFIO group-path device fds) look alike.
//   - Once the store holds FileDescriptorStoreMax= entries, further fds are closed.
//   - Without FDNAME=, or with an invalid one, the entry is named "stored". FDSTOREREMOVE=1
//     removes every entry with that name. [Manager.StoreFD] and [Manager.RemoveFD] validate
//     names with [ValidateFDName].
//   - Nothing is acknowledged: a StoreFD that systemd drops looks exactly like one it kept.
//     With $FDSTORE absent ([Manager.FDStoreMax] == 0) the store is disabled (systemd then
//     drops every stored fd) or systemd predates 254 and its size is unknown; either way
//     the daemon must not rely on it.
//   - At the next start, socket-unit fds come first, then the store; systemd currently hands
//     the store out newest first, but the order is not a promise: look fds up by name.
package systemd
