package broker

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Listing. The broker keeps its leases in creation order (byAge: Created, then ID; a
// lease joins once its dma-buf is exported and leaves when it is forgotten), so that a
// page of a list costs a binary search and a walk of the page, not a sort of every lease:
// with 100,000 leases, ListLeases stays flat in the number of leases.

// Cursor is a position in the creation order of leases: a page of [Broker.ListPage]
// continues after it. The zero Cursor is the beginning.
type Cursor struct {
	Created time.Time
	ID      string
}

// compareKey orders leases oldest first by wall clock (restored leases and cursors have
// no monotonic reading, so comparing by it would not be one order), ties broken by ID.
func compareKey(created time.Time, id string, c Cursor) int {
	if x := cmp.Compare(created.UnixNano(), c.Created.UnixNano()); x != 0 {
		return x
	}
	return cmp.Compare(id, c.ID)
}

// indexLocked adds l to the creation order; l.Created must not change afterwards. Called
// with b.mu held.
func (b *Broker) indexLocked(l *lease) {
	key := Cursor{l.Created, l.ID}
	i, found := slices.BinarySearchFunc(b.byAge, key, func(x *lease, k Cursor) int { return compareKey(x.Created, x.ID, k) })
	if found {
		return
	}
	b.byAge = slices.Insert(b.byAge, i, l)
}

// forgetLocked removes l from the lease table and the creation order. Called with b.mu
// held.
func (b *Broker) forgetLocked(l *lease) {
	delete(b.leases, l.ID)
	key := Cursor{l.Created, l.ID}
	if i, found := slices.BinarySearchFunc(b.byAge, key, func(x *lease, k Cursor) int { return compareKey(x.Created, x.ID, k) }); found {
		b.byAge = slices.Delete(b.byAge, i, i+1)
	}
}

// ListAs returns the leases matching f that by may see, oldest first: admins see every
// lease; others only their tenant's, and may not ask for another uid's or tenant's.
func (b *Broker) ListAs(f Filter, by Actor) ([]Lease, error) {
	if err := restrict(&f, by); err != nil {
		return nil, err
	}
	return b.List(f), nil
}

// ListPageAs is [Broker.ListPage] for by, restricted as [Broker.ListAs] is.
func (b *Broker) ListPageAs(f Filter, by Actor, after Cursor, limit int) ([]Lease, bool, error) {
	if err := restrict(&f, by); err != nil {
		return nil, false, err
	}
	page, more := b.ListPage(f, after, limit)
	return page, more, nil
}

// restrict limits f to what by may list.
func restrict(f *Filter, by Actor) error {
	if by.Admin {
		return nil
	}
	switch {
	case f.UID != nil && *f.UID != by.UID:
		return fmt.Errorf("list leases of uid %d: %s may list only its own tenant's leases: %w", *f.UID, by, errdefs.ErrPermissionDenied)
	case f.Tenant != "" && f.Tenant != by.tenant():
		return fmt.Errorf("list leases of tenant %s: %s may list only its own tenant's (%s): %w", f.Tenant, by, by.tenant(), errdefs.ErrPermissionDenied)
	}
	f.Tenant = by.tenant()
	return nil
}

// List returns the leases matching f, oldest first.
func (b *Broker) List(f Filter) []Lease {
	page, _ := b.ListPage(f, Cursor{}, 0)
	return page
}

// ListPage returns up to limit leases matching f that come after the cursor, oldest
// first (limit 0: all of them), and whether more follow. The cost is a binary search and
// a walk over the leases from the cursor until the page is full.
func (b *Broker) ListPage(f Filter, after Cursor, limit int) ([]Lease, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	start := 0
	if !after.Created.IsZero() || after.ID != "" {
		start, _ = slices.BinarySearchFunc(b.byAge, after, func(x *lease, k Cursor) int { return compareKey(x.Created, x.ID, k) })
		if start < len(b.byAge) && compareKey(b.byAge[start].Created, b.byAge[start].ID, after) == 0 {
			start++
		}
	}
	var out []Lease
	for _, l := range b.byAge[start:] {
		switch {
		case l.pending,
			f.UID != nil && l.Holder.UID != *f.UID,
			f.Tenant != "" && l.Holder.Tenant != f.Tenant,
			f.BDF != "" && l.BDF != f.BDF,
			f.Live && !l.Live(),
			!hasLabels(l.Labels, f.Labels):
			continue
		}
		if limit > 0 && len(out) == limit {
			return out, true
		}
		out = append(out, l.Lease)
	}
	return out, false
}

// hasLabels reports whether labels has every label of want.
func hasLabels(labels, want map[string]string) bool {
	for k, v := range want {
		if w, ok := labels[k]; !ok || w != v {
			return false
		}
	}
	return true
}
