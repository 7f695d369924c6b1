package server

import (
	"context"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// IdentifyPeer is the default [IdentifyFunc]: the caller's credentials and pidfd from the
// connection's peercred.AuthInfo. It fails with codes.Unauthenticated for an RPC that did
// not arrive through peercred transport credentials.
func IdentifyPeer(ctx context.Context) (Identity, error) {
	ai, ok := peercred.FromContext(ctx)
	if !ok {
		return Identity{}, status.Error(codes.Unauthenticated, "no peer credentials: connect over the daemon's unix socket")
	}
	id := Identity{UID: ai.Creds.UID, GID: ai.Creds.GID, Groups: slices.Clone(ai.Creds.Groups), PID: ai.Creds.PID, Tenant: ai.Tenant}
	if p := ai.Process; p != nil {
		id.Pin = func() (broker.Process, error) {
			dup, err := p.Dup()
			if err != nil {
				return nil, err
			}
			return dup, nil
		}
	}
	return id, nil
}
