package client_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/internal/fakedaemon"
)

// exampleDaemon is the daemon the examples talk to (on fake devices, in this process),
// and controlSocket its control socket: what client.DefaultSocket is on a real host.
var (
	exampleDaemon *fakedaemon.Daemon
	controlSocket string
)

// withExampleDaemon runs the package's tests and examples with exampleDaemon up.
type withExampleDaemon struct{ m *testing.M }

func (w withExampleDaemon) Run() int {
	d, err := fakedaemon.Start("0000:3b:00.0", "0000:3c:00.0", "0000:3d:00.0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	exampleDaemon, controlSocket = d, d.Control
	code := w.m.Run()
	if err := d.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "example daemon:", err)
		return max(code, 1)
	}
	return code
}

// anAdministratorRevokesAnotherLease plays an administrator who revokes another lease of
// the device bdf, which reissues the device's other leases.
func anAdministratorRevokesAnotherLease(bdf string) {
	if err := exampleDaemon.RevokeAnotherLease(bdf); err != nil {
		log.Fatal(err)
	}
}

// anAdministratorRevokesAnotherLeaseOnceWatched does the same as soon as the caller's
// event stream is open (Watch subscribes only when its loop starts).
func anAdministratorRevokesAnotherLeaseOnceWatched(bdf string) {
	exampleDaemon.WhenWatched(func() error { return exampleDaemon.RevokeAnotherLease(bdf) })
}

// anAdministratorAsksForTheLeaseBack plays an administrator who asks the holder of lease
// id to release it within an hour (REVOKE_REQUESTED).
func anAdministratorAsksForTheLeaseBack(id string) {
	c, err := client.Dial(controlSocket)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.RevokeWithGrace(ctx, id, time.Hour); err != nil {
		log.Fatal(err)
	}
}
