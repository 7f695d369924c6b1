package daemon

import (
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/config"
)

// TestMemoryLimit: the soft limit grows with max_leases, and GOMEMLIMIT wins.
func TestMemoryLimit(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "")
	var res config.Resolved
	if got, want := memoryLimit(&res), int64(memoryBase+broker.DefaultMaxLeases*memoryPerLease); got != want {
		t.Errorf("default limit %d, want %d", got, want)
	}
	res.Broker.Limits.MaxLeases = 100_000
	if got := memoryLimit(&res); got != memoryBase+100_000*memoryPerLease || got < 300<<20 {
		t.Errorf("limit for 100,000 leases %d", got)
	}
	t.Setenv("GOMEMLIMIT", "1GiB")
	if got := memoryLimit(&res); got != 0 {
		t.Errorf("limit with GOMEMLIMIT set = %d, want 0 (keep the environment's)", got)
	}
}
