// Package daemon wires mmiobrokerd together: the broker, the gRPC control socket
// (internal/server) and the fd claim socket (internal/fdpass), with systemd readiness
// notification and a graceful stop. cmd/mmiobrokerd parses flags and the configuration
// file and calls [Run]; tests call Run with a fake device opener.
//
// # Sockets
//
// Both sockets are created with the configured permission bits and, if configured, given
// to the socket group. A stale socket file left by a dead daemon is replaced; a control
// socket with a live listener behind it is an error (another daemon runs), and so is a
// path that exists and is not a socket. The socket files are removed at stop.
//
// # Stop
//
// When the context ends (SIGTERM) or a socket fails, Run tells systemd STOPPING=1, stops
// accepting, lets in-flight RPCs and claims finish for up to [Options.StopTimeout], cuts
// off the rest, and closes the broker, which ends every live lease and closes every device
// (so every dma-buf handed out is revoked by the kernel at the last close of its device).
package daemon
