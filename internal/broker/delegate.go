package broker

import (
	"fmt"
	"path"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
)

// Delegated leases. An admin (a Kubernetes DRA driver preparing a ResourceClaim) may
// allocate a lease on behalf of a claimant, the processes of one pod or cgroup unit. The
// allocating process is not the lease's holder: it is not pinned, its exit ends nothing,
// and it cannot claim the fd. Until the claim the lease has no holder (Holder.PID 0,
// Holder.Tenant the [ClaimantTenant]), no claim deadline, and keeps its token across
// reissues (the claimant's VMM got it from the pod's CDI spec and has no event stream to
// learn a new one). The first process of the claimant that presents the token becomes the
// holder, pinned as an ordinary holder is, and its tenant the lease's; from then on the
// lease is an ordinary one. A claim whose fd is not delivered undoes that too.

// delegate turns req into a delegated allocation: it checks that the caller may delegate
// and the claimant is well formed, and drops the caller as the holder.
func (b *Broker) delegate(req *AllocateRequest) error {
	c := req.Claimant
	switch {
	case !req.Admin:
		return fmt.Errorf("only admins may allocate a lease on behalf of a claimant (%s): %w", c, errdefs.ErrPermissionDenied)
	case !b.cfg.PeerUnits:
		return fmt.Errorf("a lease delegated to %s needs the cgroup units of claiming processes, which the daemon reads only with [tenants] by = \"cgroup\": %w", c, errdefs.ErrFailedPrecondition)
	case c.PodUID != "" && c.Unit != "":
		return fmt.Errorf("claimant: give a pod uid or a unit, not both: %w", errdefs.ErrInvalidArgument)
	case c.PodUID != "" && !tenant.ValidPodUID(c.PodUID):
		return fmt.Errorf("claimant pod uid %q: want letters, digits and '-' (a pod's metadata.uid): %w", clip(c.PodUID), errdefs.ErrInvalidArgument)
	case c.PodUID == "" && (len(c.Unit) > 4096 || !path.IsAbs(c.Unit) || path.Clean(c.Unit) != c.Unit || c.Unit == "/"):
		return fmt.Errorf("claimant unit %q: want a clean absolute cgroup path below the root, as a tenant id shows it: %w", clip(c.Unit), errdefs.ErrInvalidArgument)
	}
	if req.Holder.Proc != nil {
		req.Holder.Proc.Close()
	}
	req.Holder = Holder{Tenant: ClaimantTenant(c)}
	return nil
}

// claimDelegatedLocked makes peer the holder of delegated lease l, if peer is a process
// of its claimant: pinned, watched, and its tenant's lease count charged. Called with
// b.mu held; [Broker.undelegateLocked] undoes it.
func (b *Broker) claimDelegatedLocked(l *lease, peer Peer) error {
	if peer.Delegate == nil {
		return fmt.Errorf("lease %s is delegated to %s, and the claiming process (uid %d pid %d) cannot be identified for it: %w",
			l.ID, l.Claimant, peer.UID, peer.PID, errdefs.ErrPermissionDenied)
	}
	c, err := peer.Delegate()
	if err != nil {
		return fmt.Errorf("lease %s is delegated to %s: identify the claiming process (uid %d pid %d): %w: %w",
			l.ID, l.Claimant, peer.UID, peer.PID, err, errdefs.ErrUnavailable)
	}
	refuse := func(err error) error {
		if c.Proc != nil {
			c.Proc.Close()
		}
		return err
	}
	if !l.Claimant.Matches(c.Unit) {
		in := "in no VM or pod unit"
		if c.Unit != "" {
			in = "in " + c.Unit
		}
		return refuse(fmt.Errorf("lease %s is delegated to %s, and the claiming process (uid %d pid %d) is %s: %w",
			l.ID, l.Claimant, peer.UID, peer.PID, in, errdefs.ErrPermissionDenied))
	}
	if c.Proc == nil || c.Tenant == "" {
		return refuse(fmt.Errorf("lease %s: the claiming process (uid %d pid %d) is not pinned: %w", l.ID, peer.UID, peer.PID, errdefs.ErrFailedPrecondition))
	}
	if n := b.perTenant[c.Tenant]; n >= b.cfg.Limits.MaxLeasesPerHolder {
		return refuse(fmt.Errorf("lease %s: tenant %s holds %d leases, the limit: %w", l.ID, c.Tenant, n, errdefs.ErrResourceExhausted))
	}
	b.countLive(l, -1)
	l.Holder.UID, l.Holder.PID, l.Holder.Tenant = peer.UID, peer.PID, c.Tenant
	l.holder = Holder{UID: peer.UID, PID: peer.PID, Start: c.Start, Proc: c.Proc, Tenant: c.Tenant}
	b.countLive(l, +1)
	b.watchHolder(l)
	b.log.Info("delegated lease taken by its claimant", "lease_id", l.ID, "claimant", l.Claimant.String(),
		"uid", peer.UID, "client_pid", peer.PID, "tenant", c.Tenant)
	return nil
}

// undelegateLocked returns lease l, which a claim made peer's, to its claimant: no holder
// again. Called with b.mu held.
func (b *Broker) undelegateLocked(l *lease) {
	b.countLive(l, -1)
	b.unwatchHolder(l)
	if l.holder.Proc != nil {
		l.holder.Proc.Close()
	}
	t := ClaimantTenant(l.Claimant)
	l.Holder.UID, l.Holder.PID, l.Holder.Tenant = 0, 0, t
	l.holder = Holder{Tenant: t}
	b.countLive(l, +1)
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
