package broker

// This file holds the lease timers: time to live, claim expiry, the deadline of a
// cooperative revoke, and the holder process watch.

import (
	"errors"
	"fmt"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Renew extends the time to live of lease id to ttl from now (0: the lease's own TTL),
// on behalf of its holder's tenant or an admin.
func (b *Broker) Renew(id string, by Actor, ttl time.Duration) (Lease, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || l.pending {
		return Lease{}, fmt.Errorf("lease %s: %w", id, errdefs.ErrNotFound)
	}
	// Checked before anything else about the lease: a caller learns nothing about other
	// tenants' leases, not even that they ended.
	if err := mayChange(by, l, "renew"); err != nil {
		return Lease{}, err
	}
	if _, err := b.liveLocked(id); err != nil {
		return Lease{}, err
	}
	if ttl == 0 {
		ttl = l.TTL
	}
	if ttl == 0 {
		return Lease{}, fmt.Errorf("lease %s has no time to live; give one to renew it: %w", id, errdefs.ErrInvalidArgument)
	}
	if err := b.checkTTL(ttl, by.Admin); err != nil {
		return Lease{}, fmt.Errorf("lease %s: %w", id, err)
	}
	if l.ttl != nil {
		l.ttl.Stop()
	}
	l.TTL, l.Expires = ttl, b.now().Add(ttl)
	l.ttl = time.AfterFunc(ttl, func() { b.expireTTL(id) })
	b.emitLocked(EventRenewed, l, "")
	return l.Lease, nil
}

// checkTTL validates a time to live asked for by a client: not negative, and for tenants
// not below Config.MinTTL (a lease that ends every few milliseconds would make its device
// cycle as often, were it not for the tenant bounds; a minimum keeps ends meaningful).
func (b *Broker) checkTTL(ttl time.Duration, admin bool) error {
	if ttl < 0 {
		return fmt.Errorf("ttl %v is negative: %w", ttl, errdefs.ErrInvalidArgument)
	}
	if ttl > 0 && !admin && ttl < b.cfg.MinTTL {
		return fmt.Errorf("ttl %v is below the minimum of %v: %w", ttl, b.cfg.MinTTL, errdefs.ErrInvalidArgument)
	}
	return nil
}

// mayChange allows by to release or renew l (verb): its holder's tenant or an admin.
func mayChange(by Actor, l *lease, verb string) error {
	if by.Admin || by.tenant() == l.Holder.Tenant {
		return nil
	}
	return fmt.Errorf("%s lease %s: it is held by tenant %s, not %s (%s): %w", verb, l.ID, l.Holder.Tenant, by.tenant(), by, errdefs.ErrPermissionDenied)
}

// MayView reports whether by may see lease l (get, list, watch its events): its holder's
// tenant or an admin.
func MayView(by Actor, l Lease) bool { return by.Admin || by.tenant() == l.Holder.Tenant }

// revokeAtDeadline enforces a cooperative revoke at its deadline, on behalf of the admin
// who asked (who).
func (b *Broker) revokeAtDeadline(id, who string) {
	b.enforceID(id, StateRevoked, ReasonRevoked, who, EventRevoked, cycleCause{by: who, why: "cooperative revoke deadline of lease " + id})
}

// expireTTL ends lease id whose time to live ran out: its tenant chose the ttl, so the end
// follows the tenant bounds (see [Broker.endByTenant]).
func (b *Broker) expireTTL(id string) {
	if _, err := b.endByTenant(id, StateRevoked, ReasonExpired, "broker (ttl)", EventExpired); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) && !errors.Is(err, errdefs.ErrNotFound) {
		b.log.Error("ending an expired lease failed", "lease_id", id, "err", err)
	}
}

// expire releases lease id if generation gen was never claimed.
func (b *Broker) expire(id string, gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.leases[id]
	if !ok || l.State != StateAllocated || l.Generation != gen || l.digest == nil {
		return
	}
	b.endLocked(l, StateReleased, ReasonClaimExpired, "broker")
	b.emitLocked(EventExpired, l, "")
	b.log.Info("lease expired unclaimed", "lease_id", id, "bdf", l.BDF)
}
