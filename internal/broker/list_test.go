package broker_test

import (
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// ListPage walks the creation order from a cursor: leases created at the same instant
// (a synctest bubble's clock stands still) are ordered by id, pages neither repeat nor
// skip, and filters apply.
func TestListPage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		var want []string
		for i := range 5 {
			uid := uint32(1000)
			if i%2 == 1 {
				uid = 1001
			}
			l, _ := r.allocate(t, req(dev0, 0, uid, int32(10+i), broker.Range{Offset: uint64(i) * page, Length: page}))
			want = append(want, l.ID)
		}
		time.Sleep(time.Second)
		late, _ := r.allocate(t, req(dev0, 0, 1000, 20, broker.Range{Offset: 5 * page, Length: page}))
		slices.Sort(want) // same Created: by id
		want = append(want, late.ID)

		var got []string
		var after broker.Cursor
		for pages := 0; ; pages++ {
			page, more := r.b.ListPage(broker.Filter{}, after, 2)
			if len(page) > 2 || pages > 3 {
				t.Fatalf("page %d: %d leases", pages, len(page))
			}
			for _, l := range page {
				got = append(got, l.ID)
			}
			if !more {
				break
			}
			last := page[len(page)-1]
			after = broker.Cursor{Created: last.Created, ID: last.ID}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("paged %v, want %v", got, want)
		}
		if all := r.b.List(broker.Filter{}); len(all) != len(want) {
			t.Fatalf("List: %d leases, want %d", len(all), len(want))
		}

		uid := uint32(1001)
		odd, more := r.b.ListPage(broker.Filter{UID: &uid}, broker.Cursor{}, 10)
		if len(odd) != 2 || more {
			t.Fatalf("uid 1001: %d leases (more %v), want 2", len(odd), more)
		}
		// A cursor need not be a lease's (one forgotten since): it places the walk between
		// the leases around it.
		first, _ := r.b.Get(want[0])
		rest, _ := r.b.ListPage(broker.Filter{}, broker.Cursor{Created: first.Created, ID: want[2] + "0"}, 0)
		var restIDs []string
		for _, l := range rest {
			restIDs = append(restIDs, l.ID)
		}
		if !slices.Equal(restIDs, want[3:]) {
			t.Fatalf("after a cursor between %s and %s: %v, want %v", want[2], want[3], restIDs, want[3:])
		}
	})
}

// Ended leases beyond the retained 1024 are forgotten: they leave the list (the order
// index) with the table.
func TestListForgetsEnded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(c *broker.Config) { c.Limits.MaxLeasesPerHolder, c.Limits.MaxLeases = 1<<20, 1<<20 })
		const n = 1100
		var ids []string
		for i := range n {
			l, _ := r.allocate(t, req(dev0, 0, 1000, 10, broker.Range{Length: page}))
			if _, err := r.b.Release(l.ID, broker.Actor{Admin: true}); err != nil {
				t.Fatalf("release %d: %v", i, err)
			}
			ids = append(ids, l.ID)
		}
		all := r.b.List(broker.Filter{})
		if len(all) != 1024 {
			t.Fatalf("List has %d ended leases, want the 1024 retained", len(all))
		}
		for _, l := range all {
			if !slices.Contains(ids[n-1024:], l.ID) {
				t.Fatalf("listed lease %s is not among the last 1024 ended", l.ID)
			}
		}
		if _, err := r.b.Get(ids[0]); err == nil {
			t.Fatal("the first ended lease is still in the table")
		}
	})
}
