// Package daemon wires mmiobrokerd together: the broker, the gRPC control socket
// (internal/server) and the fd claim socket (internal/fdpass), with systemd readiness
// notification, watchdog and fd store, the lease journal, and a graceful stop.
// cmd/mmiobrokerd parses flags and the configuration file and calls [Run]; tests call Run
// with a fake device opener and a fake service manager (internal/systemd/systemdtest).
//
// # Sockets
//
// Sockets systemd passes (socket activation, LISTEN_FDNAMES "control" and "claim") are
// used as they are. Otherwise both are created with the configured permission bits and,
// if configured, given to the socket group. A stale socket file left by a dead daemon is
// replaced; a control socket with a live listener behind it is an error (another daemon
// runs), and so is a path that exists and is not a socket. Sockets the daemon created are
// removed at stop.
//
// # Restarts
//
// Run by systemd with the fd store ($NOTIFY_SOCKET and $FDSTORE) and the journal on, the
// daemon keeps every device, group, container and iommufd fd and every dma-buf copy it
// still needs in the fd store (vfio.Keeper, hostdev), records every lease transition in
// the journal (internal/journal) before anyone hears of it, and at start takes both back
// and restores the leases (broker.Options.Restore) before it says READY=1. What the store
// holds that start-up did not take back is dropped. Without either, it says at start that
// a restart will revoke. docs/operations.md has the whole story.
//
// # Stop
//
// When the context ends (SIGTERM) or a socket fails, Run tells systemd STOPPING=1 and
// stops the broker first — so that event streams end after their last events — then stops
// accepting, lets in-flight RPCs and claims finish for up to [Options.StopTimeout] and
// cuts off the rest. A stop that keeps leases ([daemon] on_stop = "keep", with the fd
// store and journal) detaches the broker: no lease ends, nothing is revoked, the store
// keeps the fds for the next start. A draining stop closes the broker, which ends every
// live lease and closes every device (so every dma-buf handed out is revoked by the
// kernel at the last close of its device).
package daemon
