package server

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// AllocateLease with a claimant (admins only) and labels; ListLeases by label.
func TestAllocateDelegated(t *testing.T) {
	e := newEnv(t, func(o *envOptions) { o.cfg = func(c *broker.Config) { c.PeerUnits = true } })
	req := oneRange(bdfA, 0, 0, page(1))
	req.Claimant = &brokerv1.Claimant{PodUid: "8d1c4e2a-11f0-9c3b-0242ac120002"}
	req.Labels = map[string]string{"resource.kubernetes.io/claim-uid": "c-1"}
	if _, err := e.client.AllocateLease(holder.ctx(t), req); status.Code(err) != codes.PermissionDenied {
		t.Errorf("delegation by a holder: %v, want PermissionDenied", err)
	}
	resp, err := e.client.AllocateLease(root.ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	l := resp.GetLease()
	if l.GetHolder().GetPid() != 0 || l.GetHolder().GetTenant() != "claimant:pod=8d1c4e2a-11f0-9c3b-0242ac120002" ||
		l.GetClaimant().GetPodUid() != "8d1c4e2a-11f0-9c3b-0242ac120002" || l.GetLabels()["resource.kubernetes.io/claim-uid"] != "c-1" ||
		resp.GetClaimDeadline() != nil {
		t.Errorf("delegated lease: %v (claim deadline %v)", l, resp.GetClaimDeadline())
	}
	if _, err := e.client.AllocateLease(root.ctx(t), oneRange(bdfA, 0, page(1), page(1))); err != nil {
		t.Fatal(err)
	}
	list, err := e.client.ListLeases(root.ctx(t), &brokerv1.ListLeasesRequest{Labels: map[string]string{"resource.kubernetes.io/claim-uid": "c-1"}})
	if err != nil || len(list.GetLeases()) != 1 || list.GetLeases()[0].GetId() != l.GetId() {
		t.Fatalf("ListLeases by label: %v, %v", err, list.GetLeases())
	}
	// The holder (another tenant) does not see the unclaimed delegated lease.
	if _, err := e.client.GetLease(holder.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.GetId()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("GetLease of a delegated lease by a holder: %v, want PermissionDenied", err)
	}

	many := map[string]string{}
	for i := range 17 {
		many[strings.Repeat("k", i+1)] = "v"
	}
	for name, labels := range map[string]map[string]string{
		"too many":      many,
		"empty key":     {"": "v"},
		"bad key":       {"a b": "v"},
		"long key":      {strings.Repeat("k", 64): "v"},
		"control value": {"k": "a\nb"},
		"long value":    {"k": strings.Repeat("v", 257)},
	} {
		r := oneRange(bdfA, 0, page(2), page(1))
		r.Labels = labels
		if _, err := e.client.AllocateLease(root.ctx(t), r); status.Code(err) != codes.InvalidArgument {
			t.Errorf("labels %s: %v, want InvalidArgument", name, err)
		}
		if _, err := e.client.ListLeases(root.ctx(t), &brokerv1.ListLeasesRequest{Labels: labels}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("list by labels %s: %v, want InvalidArgument", name, err)
		}
	}
	r := oneRange(bdfA, 0, page(2), page(1))
	r.Claimant = &brokerv1.Claimant{}
	if _, err := e.client.AllocateLease(root.ctx(t), r); status.Code(err) != codes.InvalidArgument {
		t.Errorf("an empty claimant: %v, want InvalidArgument", err)
	}
}
