package server

import (
	"errors"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// fuzzSeeds are AllocateLeaseRequests near the edges of what the server accepts. The same
// requests, marshalled, are committed under testdata/fuzz/FuzzAllocateRequest.
func fuzzSeeds() []*brokerv1.AllocateLeaseRequest {
	many := make([]*brokerv1.Range, 16)
	for i := range many {
		many[i] = &brokerv1.Range{Offset: uint64(i) << 12, Length: 1 << 12}
	}
	return []*brokerv1.AllocateLeaseRequest{
		{Bdf: "0000:00:03.0", Bar: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}},
		{Bdf: "00:03.0", Bar: 5, Ranges: many, Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE, VmName: "vm-1"},
		{Bdf: "0000:00:03.0", Bar: 6, Ranges: []*brokerv1.Range{{}}},
		{Bdf: "0000:00:03.0", Ranges: append(many, &brokerv1.Range{})},
		{Bdf: "0000:00:03.0", Ranges: []*brokerv1.Range{{Offset: 1 << 63, Length: 1 << 63}}, Kind: 3},
		{Bdf: "ffff:ff:1f.7", Ranges: []*brokerv1.Range{{Length: 1}}, VmName: "ünï\u200bcode"},
		{Bdf: "0000:00:03.0", Ranges: []*brokerv1.Range{{Length: 1}}, VmName: "a\x00b"},
		{},
		{Bdf: "0000:00:03.0", Ranges: []*brokerv1.Range{{Length: 4096}}, Ttl: durationpb.New(maxTTL)},
		{Bdf: "0000:00:03.0", Ranges: []*brokerv1.Range{{Length: 4096}}, Ttl: &durationpb.Duration{Seconds: -1, Nanos: 1}},
		{Bdf: "0000:00:03.0", Ranges: []*brokerv1.Range{{Length: 4096}}, Ttl: &durationpb.Duration{Seconds: 1 << 62}},
	}
}

// FuzzAllocateRequest feeds arbitrary bytes through protobuf decoding and the server's
// request conversion: it must not panic, and must either reject the request as
// InvalidArgument or produce a broker request within the shape limits that carries the
// input faithfully.
func FuzzAllocateRequest(f *testing.F) {
	for _, s := range fuzzSeeds() {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var req brokerv1.AllocateLeaseRequest
		if err := proto.Unmarshal(data, &req); err != nil {
			return
		}
		r, err := allocateRequest(&req)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("allocateRequest(%v) = %v, want an InvalidArgument error", &req, err)
			}
			return
		}
		if a, err := pci.ParseAddress(r.BDF); err != nil || a.String() != r.BDF {
			t.Errorf("BDF %q is not a canonical PCI address (%v)", r.BDF, err)
		}
		if r.BAR < 0 || r.BAR > 5 || uint32(r.BAR) != req.GetBar() {
			t.Errorf("BAR %d from %d", r.BAR, req.GetBar())
		}
		if len(r.Ranges) < 1 || len(r.Ranges) > 16 || len(r.Ranges) != len(req.GetRanges()) {
			t.Fatalf("%d ranges from %d", len(r.Ranges), len(req.GetRanges()))
		}
		for i, pr := range req.GetRanges() {
			if (r.Ranges[i] != broker.Range{Offset: pr.GetOffset(), Length: pr.GetLength()}) {
				t.Errorf("range %d = %v from %v", i, r.Ranges[i], pr)
			}
		}
		if r.Kind != broker.KindShared && r.Kind != broker.KindPrivate {
			t.Errorf("kind %v from %v", r.Kind, req.GetKind())
		}
		if r.VMName != req.GetVmName() || len(r.VMName) > maxVMName || !utf8.ValidString(r.VMName) {
			t.Errorf("vm name %q from %q", r.VMName, req.GetVmName())
		}
		if r.TTL < 0 || r.TTL > maxTTL || (r.TTL != 0 || req.GetTtl() != nil) && r.TTL != req.GetTtl().AsDuration() {
			t.Errorf("ttl %v from %v", r.TTL, req.GetTtl())
		}
		if r.Holder.Proc != nil || r.Holder.UID != 0 || r.Admin {
			t.Errorf("conversion filled in the caller: %+v", r)
		}
	})
}
