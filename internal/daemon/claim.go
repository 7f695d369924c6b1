package daemon

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/metrics"
	"github.com/mmiobroker/mmiobroker/internal/tenant"
)

// claimer adapts [broker.Broker.Claim] to the claim socket's [fdpass.Claimer].
//
// The broker checks that the claim comes from the allocating process: same uid and pid,
// and the allocating process, pinned by a pidfd since allocation, still alive (so its pid
// cannot have been reused). A delegated lease is claimed instead by a process of its
// claimant's cgroup unit: for those (tenants by cgroup only) the broker asks the claimer's
// tenant and unit, read while fdpass's pidfd pins the peer, and takes a pin of its own
// (delegateClaimer). fdpass pins the claiming peer and checks it is still alive before
// sending.
//
// It counts every claim the broker decides by the code its client gets (m.Claimed): a
// refusal when the broker refuses it, the delivery's outcome when it grants it.
type claimer struct {
	b       *broker.Broker
	m       *metrics.Metrics
	tenants tenant.Resolver // resolves a delegated lease's claimer (its tenant and unit)
}

// Claim implements fdpass.Claimer.
func (c claimer) Claim(_ context.Context, req fdpass.Request, peer fdpass.Peer) (fdpass.Grant, *os.File, error) {
	bp := broker.Peer{UID: peer.UID, PID: peer.PID}
	if c.tenants.Mode == tenant.ByCgroup && peer.Process != nil {
		bp.Delegate = func() (broker.Claimer, error) { return delegateClaimer(c.tenants, peer) }
	}
	l, f, err := c.b.Claim(req.LeaseID, req.Token, bp)
	if errors.Is(err, broker.ErrBadToken) {
		err = fdpass.WithCode(fdpass.CodeBadToken, err)
	}
	if err != nil {
		c.m.Claimed(fdpass.CodeOf(err))
		return fdpass.Grant{}, nil, err
	}
	return fdpass.Grant{
		LeaseID:    l.ID,
		Generation: l.Generation,
		Size:       l.Size,
		Inode:      l.Inode,
		BDF:        l.BDF,
		BAR:        uint32(l.BAR),
	}, f, nil
}

// Delivered implements fdpass.DeliveryReporter, the second phase of a claim: a claim
// whose fd reached the peer is committed (the broker closes its own copy of the dma-buf);
// one whose fd did not is undone, so that its token works again.
func (c claimer) Delivered(req fdpass.Request, grant fdpass.Grant, _ fdpass.Peer, err error) {
	if err != nil {
		c.m.Claimed(fdpass.CodeOf(err))
		c.b.Unclaim(grant.LeaseID, grant.Generation)
		return
	}
	c.b.CommitClaim(grant.LeaseID, grant.Generation)
	c.m.Claimed(fdpass.CodeOK)
	// The lease's round trip: from its allocation to its first fd delivered (a reissued
	// generation's claim is not one; its allocation is older than the reissue).
	if grant.Generation == 1 {
		if l, err := c.b.Get(grant.LeaseID); err == nil && l.Generation == 1 && !l.Created.IsZero() {
			c.m.RoundTrip(time.Since(l.Created))
		}
	}
}

// delegateClaimer identifies the claim socket peer for a delegated lease: its tenant and
// cgroup unit, read while fdpass's pidfd pins it, and a pin of its own for the broker.
func delegateClaimer(r tenant.Resolver, peer fdpass.Peer) (broker.Claimer, error) {
	id, err := r.ResolveProcess(peer.UID, peer.Process, "")
	if err != nil {
		return broker.Claimer{}, err
	}
	unit, _ := id.Unit()
	proc, err := peer.Process.Dup()
	if err != nil {
		return broker.Claimer{}, err
	}
	start, err := proc.Stamp()
	if err != nil {
		proc.Close()
		return broker.Claimer{}, err
	}
	return broker.Claimer{Tenant: string(id), Unit: unit, Proc: proc, Start: start}, nil
}
