// Command mmiobrokerctl is the operator CLI of mmiobrokerd: it lists devices and leases,
// allocates leases (holding their dma-buf fd, or handing it to a command as fd 3), revokes
// (at once or with a grace period), renews and releases them, suspends, resumes and cycles
// devices, and watches lease events. docs/cli.md describes every command, its output and
// its exit codes.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}
