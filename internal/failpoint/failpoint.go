// Package failpoint kills the process at named points, so that crash-safety tests can
// stop mmiobrokerd exactly between two steps whose order matters (after a dma-buf export
// and before its journal record, after FDSTOREREMOVE and before the close, …) and check
// what a restart makes of it.
//
// Points are armed only through the environment of the process, for tests:
//
//	MMIOBROKER_FAILPOINTS=name[:n][@file][,...]
//
// kills the process with SIGKILL the n-th time (default 1st) it passes the point name.
// With @file the point is armed only while file exists, and the kill removes it first:
// a service manager that restarts the process with the same environment gets a process
// that survives the point (one crash per arming).
// Unset (every production run), [Hit] is one atomic load. The names in use are the
// constants below; docs/operations.md lists them with the invariant each one tests.
package failpoint

import (
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

// Env is the environment variable that arms failpoints.
const Env = "MMIOBROKER_FAILPOINTS"

// The failpoints of mmiobrokerd, in the order a lease's life passes them.
const (
	// AfterExport: a lease's dma-buf is exported (and kept in the fd store) but the
	// lease is not journaled yet; no client heard of it.
	AfterExport = "after-export"
	// AfterJournal: the lease (or claim) is journaled; the caller has not heard of it.
	AfterJournal = "after-journal"
	// MidCycle: a device cycle turned memory decode off and has not reopened the device.
	MidCycle = "mid-cycle"
	// AfterFDStoreRemove: the old device fd left the fd store; the daemon has not closed
	// its own copy yet.
	AfterFDStoreRemove = "after-fdstore-remove"
	// MidReissue: a device cycle reissued some of its surviving leases, not all.
	MidReissue = "mid-reissue"
)

type point struct {
	after int64        // kill on this hit
	file  string       // "": always armed; else armed while it exists, removed on the kill
	hits  atomic.Int64 // hits so far
}

var (
	armed = sync.OnceValue(func() map[string]*point { return parse(os.Getenv(Env)) })
	kill  = func() { syscall.Kill(os.Getpid(), syscall.SIGKILL) }
)

// parse reads the Env syntax; malformed entries are ignored (a typo arms nothing).
func parse(s string) map[string]*point {
	if s == "" {
		return nil
	}
	m := map[string]*point{}
	for _, e := range strings.Split(s, ",") {
		e, file, _ := strings.Cut(strings.TrimSpace(e), "@")
		name, n, hasN := strings.Cut(e, ":")
		after := int64(1)
		if hasN {
			v, err := strconv.ParseInt(n, 10, 64)
			if err != nil || v < 1 {
				continue
			}
			after = v
		}
		if name != "" {
			m[name] = &point{after: after, file: file}
		}
	}
	return m
}

// Hit marks that the process passed point name; if that point is armed for this hit, the
// process dies at once (SIGKILL: no deferred code, no cleanup, as in a crash).
func Hit(name string) {
	m := armed()
	if m == nil {
		return
	}
	p := m[name]
	if p == nil || p.hits.Add(1) != p.after {
		return
	}
	if p.file != "" && os.Remove(p.file) != nil {
		return // not armed (or no longer)
	}
	kill()
}
