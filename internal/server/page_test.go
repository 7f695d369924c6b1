package server

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// ListLeases pages: every lease once, in order, across pages of page_size; the token is
// refused with other filters or when it is not one the daemon made.
func TestListLeasesPages(t *testing.T) {
	e := newEnv(t)
	var want []string
	for i := range 7 {
		resp := e.allocate(holder, oneRange(bdfA, 0, page(uint64(i)), page(1)))
		want = append(want, resp.GetLease().GetId())
	}
	var got []string
	req := &brokerv1.ListLeasesRequest{PageSize: 3}
	pages := 0
	for {
		resp, err := e.client.ListLeases(root.ctx(t), req)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if n := len(resp.GetLeases()); n > 3 || (resp.GetNextPageToken() != "" && n != 3) {
			t.Errorf("page %d has %d leases (next_page_token %q)", pages, n, resp.GetNextPageToken())
		}
		for _, l := range resp.GetLeases() {
			got = append(got, l.GetId())
		}
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	if pages != 3 || len(got) != len(want) {
		t.Fatalf("%d pages with %v, want 3 pages with %v", pages, got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("paged list %v, want %v (creation order)", got, want)
		}
	}

	first, err := e.client.ListLeases(root.ctx(t), &brokerv1.ListLeasesRequest{PageSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	tok := first.GetNextPageToken()
	for name, req := range map[string]*brokerv1.ListLeasesRequest{
		"other filter":  {PageSize: 2, PageToken: tok, LiveOnly: true},
		"garbage token": {PageToken: "not-a-token"},
		"other version": {PageToken: "djI6MTox"},
		"negative size": {PageSize: -1},
	} {
		if _, err := e.client.ListLeases(root.ctx(t), req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	// A holder's token works for its own (restricted) list.
	hp, err := e.client.ListLeases(holder.ctx(t), &brokerv1.ListLeasesRequest{PageSize: 4})
	if err != nil || len(hp.GetLeases()) != 4 || hp.GetNextPageToken() == "" {
		t.Fatalf("holder's first page: %v, %d leases", err, len(hp.GetLeases()))
	}
	hp, err = e.client.ListLeases(holder.ctx(t), &brokerv1.ListLeasesRequest{PageSize: 4, PageToken: hp.GetNextPageToken()})
	if err != nil || len(hp.GetLeases()) != 3 || hp.GetNextPageToken() != "" {
		t.Fatalf("holder's second page: %v, %d leases, token %q", err, len(hp.GetLeases()), hp.GetNextPageToken())
	}
}

func TestPageSize(t *testing.T) {
	for _, c := range []struct {
		in   int32
		want int
	}{{0, DefaultPageSize}, {1, 1}, {MaxPageSize, MaxPageSize}, {MaxPageSize + 1, MaxPageSize}, {1 << 30, MaxPageSize}} {
		if got, err := pageSize(c.in); err != nil || got != c.want {
			t.Errorf("pageSize(%d) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
}

// FuzzPageToken: any token either decodes to the cursor it was made from or is refused
// with INVALID_ARGUMENT; nothing panics.
func FuzzPageToken(f *testing.F) {
	uid := uint32(107)
	f.Add(pageToken(broker.Cursor{Created: time.Unix(1_800_000_000, 5), ID: "0123456789abcdef01234567"}, broker.Filter{}))
	f.Add(pageToken(broker.Cursor{Created: time.Unix(1, 0), ID: "x"}, broker.Filter{BDF: "0000:00:03.0", Live: true, UID: &uid, Tenant: "uid=107"}))
	f.Add("")
	f.Add("djE6MTp4OjAwMDAwMDAw")
	f.Add("djE6LTE6eDowMDAwMDAwMA")
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := parsePageToken(tok, broker.Filter{})
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("parsePageToken(%q): %v does not wrap ErrInvalidArgument", tok, err)
			}
			return
		}
		if tok == "" {
			return
		}
		if again := pageToken(c, broker.Filter{}); again != tok {
			// Only canonical tokens are accepted: decoding and encoding again is the identity.
			if c2, err := parsePageToken(again, broker.Filter{}); err != nil || c2 != c {
				t.Fatalf("token %q decodes to %+v, which re-encodes to %q (%+v, %v)", tok, c, again, c2, err)
			}
		}
	})
}
