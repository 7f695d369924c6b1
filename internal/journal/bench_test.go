package journal

import (
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// BenchmarkCommit is the cost the broker pays under its lock per transition: one event and
// one upserted lease (a full record) in one transaction. The event backlog is filled first,
// so every commit also trims one event, as in a long-running daemon.
func BenchmarkCommit(b *testing.B) {
	j := open(b, newPath(b), Options{})
	l := fullLease("lease-0123456789abcdefghijklmn", 0)
	var seq uint64
	for range DefaultEventBacklog {
		seq++
		l.Seq = seq
		if err := j.Commit([]Event{{Seq: seq, Type: "renewed", Lease: l}}, []Lease{l}, nil); err != nil {
			b.Fatal(err)
		}
	}
	ds := make([]time.Duration, 0, 1<<16)
	b.ReportAllocs()
	for b.Loop() {
		seq++
		l.Seq = seq
		start := time.Now()
		if err := j.Commit([]Event{{Seq: seq, Time: l.Created, Type: "renewed", Lease: l}}, []Lease{l}, nil); err != nil {
			b.Fatal(err)
		}
		if len(ds) < cap(ds) {
			ds = append(ds, time.Since(start))
		}
	}
	testutil.ReportPercentiles(b, ds)
}
