package server

import (
	"encoding/base64"
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// Paging of ListLeases (AIP-158): page_size 0 means DefaultPageSize, larger values are
// reduced to MaxPageSize; the page token is opaque to clients.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 1000
)

// pageSize checks and defaults a request's page_size.
func pageSize(n int32) (int, error) {
	switch {
	case n < 0:
		return 0, invalid("page_size %d is negative", n)
	case n == 0:
		return DefaultPageSize, nil
	}
	return min(int(n), MaxPageSize), nil
}

// A page token is the base64url text "v1:<created unix ns>:<lease id>:<filter hash>": the
// position after the page's last lease, and a hash of the filter it was made for, so that
// a token used with another filter is refused rather than answered with a wrong page.
const pageTokenVersion = "v1"

// pageToken encodes the position after the lease at c for the filter f.
func pageToken(c broker.Cursor, f broker.Filter) string {
	text := fmt.Sprintf("%s:%d:%s:%08x", pageTokenVersion, c.Created.UnixNano(), c.ID, filterHash(f))
	return base64.RawURLEncoding.EncodeToString([]byte(text))
}

// parsePageToken decodes a page token made for filter f; "" is the first page.
func parsePageToken(tok string, f broker.Filter) (broker.Cursor, error) {
	if tok == "" {
		return broker.Cursor{}, nil
	}
	bad := func(why string) (broker.Cursor, error) {
		return broker.Cursor{}, invalid("page_token: %s (pass next_page_token of the previous page, with the same filters)", why)
	}
	if len(tok) > 256 {
		return bad("too long")
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return bad("not a token this daemon made")
	}
	parts := strings.Split(string(raw), ":")
	if len(parts) != 4 || parts[0] != pageTokenVersion {
		return bad("not a token this daemon made")
	}
	ns, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil || ns <= 0 || parts[2] == "" || len(parts[2]) > maxLeaseID {
		return bad("not a token this daemon made")
	}
	if parts[3] != fmt.Sprintf("%08x", filterHash(f)) {
		return bad("made for other filters (bdf, live_only, holder_uid, tenant, labels)")
	}
	return broker.Cursor{Created: time.Unix(0, ns), ID: parts[2]}, nil
}

// filterHash identifies a filter as the request gave it (before the broker restricts a
// holder's list to its tenant).
func filterHash(f broker.Filter) uint32 {
	h := fnv.New32a()
	uid := "-"
	if f.UID != nil {
		uid = strconv.FormatUint(uint64(*f.UID), 10)
	}
	fmt.Fprintf(h, "%s\x00%t\x00%s\x00%s", f.BDF, f.Live, uid, f.Tenant)
	for _, k := range slices.Sorted(maps.Keys(f.Labels)) {
		fmt.Fprintf(h, "\x00%s=%s", k, f.Labels[k])
	}
	return h.Sum32()
}
