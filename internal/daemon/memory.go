package daemon

import (
	"os"
	"runtime/debug"

	"github.com/mmiobroker/mmiobroker/internal/config"
)

// The soft memory limit the daemon gives the Go runtime, sized by its configuration:
// without one the runtime keeps the heap it freed (a daemon that once held 100,000 leases
// kept ~250 MB it no longer used, docs/benchmarks.md); with one it collects more often
// and returns free memory as the process nears the limit. It is soft: the daemon never
// fails for it, it only spends more CPU collecting. GOMEMLIMIT in the environment (e.g.
// in a drop-in of the unit) takes precedence.
const (
	// memoryBase is the daemon without leases: the runtime, gRPC, the journal's map and
	// buffers (RSS ~20 MB at start).
	memoryBase = 64 << 20
	// memoryPerLease is a lease's share: ~1.5-2 KB of heap at 100,000 leases (the lease,
	// its indexes, its journal record's share of bbolt's pages), and about as much again
	// for the collector to work in (3 KiB made it collect so often that an allocation's
	// cost grew with the leases).
	memoryPerLease = 4 << 10
)

// memoryLimit returns the soft memory limit for res (0: GOMEMLIMIT is set, keep it).
func memoryLimit(res *config.Resolved) int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	return memoryBase + int64(res.Broker.WithDefaults().Limits.MaxLeases)*memoryPerLease
}

// setMemoryLimit applies memoryLimit and returns the limit in force.
func setMemoryLimit(res *config.Resolved) int64 {
	if l := memoryLimit(res); l > 0 {
		debug.SetMemoryLimit(l)
		return l
	}
	return debug.SetMemoryLimit(-1)
}
