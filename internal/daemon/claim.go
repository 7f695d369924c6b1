package daemon

import (
	"context"
	"errors"
	"os"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// claimer adapts [broker.Broker.Claim] to the claim socket's [fdpass.Claimer].
//
// The broker checks that the claim comes from the allocating process: same uid and pid,
// and the allocating process, pinned by a pidfd since allocation, still alive (so its pid
// cannot have been reused). fdpass pins the claiming peer and checks it is still alive
// before sending.
type claimer struct{ b *broker.Broker }

// Claim implements fdpass.Claimer.
func (c claimer) Claim(_ context.Context, req fdpass.Request, peer fdpass.Peer) (fdpass.Grant, *os.File, error) {
	l, f, err := c.b.Claim(req.LeaseID, req.Token, broker.Peer{UID: peer.UID, PID: peer.PID})
	if errors.Is(err, broker.ErrBadToken) {
		return fdpass.Grant{}, nil, fdpass.WithCode(fdpass.CodeBadToken, err)
	}
	if err != nil {
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
		c.b.Unclaim(grant.LeaseID, grant.Generation)
		return
	}
	c.b.CommitClaim(grant.LeaseID, grant.Generation)
}
