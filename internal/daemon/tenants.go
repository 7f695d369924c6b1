package daemon

import (
	"fmt"
	"os"
	"syscall"

	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
)

// checkTenants makes sure r can resolve tenants on this host before the daemon serves
// anyone: with tenants by cgroup or label, the daemon's own cgroup must be readable as
// cgroup v2 (a v1-only host, or a daemon in a cgroup namespace that hides its peers,
// would refuse every caller at connect time instead).
func checkTenants(r tenant.Resolver) error {
	if r.Mode == tenant.ByUID {
		return nil
	}
	if _, err := r.Resolve(uint32(os.Getuid()), int32(os.Getpid()), ""); err != nil {
		return fmt.Errorf("tenants by %s: cannot read this host's cgroups (set [tenants] by = \"uid\" on a cgroup v1 host): %w", r.Mode, err)
	}
	return nil
}

// grpcTenant resolves the tenant of a control socket peer at connect time: its cgroup
// read while its pidfd pins it, and its socket's LSM label when tenants are by label.
func grpcTenant(r tenant.Resolver) peercred.TenantFunc {
	return func(c peercred.Creds, p *peercred.Process, rc syscall.RawConn) (string, error) {
		label := ""
		if r.Mode == tenant.ByLabel {
			var err error
			if label, err = tenant.PeerLabel(rc); err != nil {
				return "", err
			}
		}
		if p == nil {
			return "", fmt.Errorf("peer pid %d is not pinned", c.PID)
		}
		id, err := r.ResolveProcess(c.UID, p, label)
		return string(id), err
	}
}

// claimTenant names the tenant of a claim socket peer for its claim slots. It counts
// slots only (the claim itself is checked against the pinned holder process), so a peer
// whose cgroup cannot be read counts as its uid.
func claimTenant(r tenant.Resolver) func(uid uint32, pid int32) string {
	return func(uid uint32, pid int32) string {
		if r.Mode == tenant.ByUID {
			return string(tenant.ForUID(uid))
		}
		id, err := r.Resolve(uid, pid, "")
		if err != nil {
			return string(tenant.ForUID(uid))
		}
		return string(id)
	}
}
