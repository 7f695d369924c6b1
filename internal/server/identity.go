package server

import (
	"context"
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// Identity is the caller of an RPC, from the peer credentials of its connection.
type Identity struct {
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups
	PID    int32
	// Pin returns a new handle that pins the caller's process (a duplicate of the
	// connection's pidfd), owned by whoever calls Pin. Nil if the process cannot be pinned;
	// AllocateLease then fails, since a lease's fd must only go to a pinned process.
	Pin func() (broker.Process, error)
	// Tenant is the caller's tenant identity (internal/tenant), resolved when it
	// connected; empty means "uid=<UID>".
	Tenant string
}

// tenant returns id's tenant identity.
func (id Identity) tenant() string { return broker.TenantOf(id.UID, id.Tenant) }

// IdentifyFunc resolves the caller of the RPC whose context is ctx. It is called once per
// RPC, before the handler runs; an error fails the RPC (with codes.Unauthenticated unless
// the error is a status already).
type IdentifyFunc func(ctx context.Context) (Identity, error)

// identityKey keys the caller's Identity in an RPC's context.
type identityKey struct{}

// identityFrom returns the Identity the interceptor stored in ctx.
func identityFrom(ctx context.Context) (Identity, error) {
	id, ok := ctx.Value(identityKey{}).(Identity)
	if !ok {
		// Only reachable if a handler runs without the server's interceptors.
		return Identity{}, status.Error(codes.Unauthenticated, "caller identity unknown")
	}
	return id, nil
}

// isAdmin reports whether id is an admin: uid 0 or a member of one of adminGroups.
func isAdmin(id Identity, adminGroups []uint32) bool {
	if id.UID == 0 || slices.Contains(adminGroups, id.GID) {
		return true
	}
	for _, g := range id.Groups {
		if slices.Contains(adminGroups, g) {
			return true
		}
	}
	return false
}

// actor is id as the broker's Actor.
func actor(id Identity, admin bool) broker.Actor {
	return broker.Actor{UID: id.UID, PID: id.PID, Admin: admin, Tenant: id.tenant()}
}

func (id Identity) String() string { return fmt.Sprintf("uid %d pid %d", id.UID, id.PID) }
