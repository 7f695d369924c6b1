package broker_test

import (
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

const (
	podUID  = "8d1c4e2a-11f0-9c3b-0242ac120002"
	podUnit = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d1c4e2a_11f0_9c3b_0242ac120002.slice"
)

// delegatedReq is an admin's (pid 7, the DRA plugin) allocation for the pod.
func delegatedReq(off uint64) broker.AllocateRequest {
	rq := req(dev0, 0, 0, 7, broker.Range{Offset: off, Length: page})
	rq.Admin = true
	rq.Claimant = broker.Claimant{PodUID: podUID}
	rq.Labels = map[string]string{"resource.kubernetes.io/claim-uid": "c-1"}
	return rq
}

// podPeer is a process of the pod (or of unit, if not the pod's) claiming as uid 107.
func podPeer(pid int32, unit string, proc *brokertest.Process) broker.Peer {
	return broker.Peer{UID: 107, PID: pid, Delegate: func() (broker.Claimer, error) {
		return broker.Claimer{Tenant: "uid=107,cgroup=" + unit, Unit: unit, Proc: proc, Start: 99}, nil
	}}
}

func TestDelegatedLease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, func(c *broker.Config) { c.PeerUnits = true; c.ClaimTimeout = 10 * time.Second })
		plugin := &brokertest.Process{Pid: 7}
		rq := delegatedReq(0)
		rq.Holder.Proc = plugin
		l, tok := r.allocate(t, rq)
		if !plugin.Closed() {
			t.Error("the allocating admin was pinned as if it held the lease")
		}
		if !l.Delegated() || l.Holder.PID != 0 || l.Holder.Tenant != "claimant:pod="+podUID || !l.ClaimDeadline.IsZero() {
			t.Fatalf("delegated lease: %+v", l)
		}
		if got := r.b.List(broker.Filter{Labels: map[string]string{"resource.kubernetes.io/claim-uid": "c-1"}}); len(got) != 1 || got[0].ID != l.ID {
			t.Fatalf("list by label: %+v", got)
		}
		if got := r.b.List(broker.Filter{Labels: map[string]string{"resource.kubernetes.io/claim-uid": "c-2"}}); len(got) != 0 {
			t.Fatalf("list by another label: %+v", got)
		}

		// No claim deadline: a VMM that starts late still gets it.
		time.Sleep(time.Hour)
		synctest.Wait()

		// The allocating admin, a process outside any unit and one in another pod are
		// refused, and the token survives.
		if _, _, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 0, PID: 7}); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("claim by the allocating admin: %v, want PermissionDenied", err)
		}
		stranger := &brokertest.Process{Pid: 60}
		if _, _, err := r.b.Claim(l.ID, tok, podPeer(60, "/kubepods/burstable/pod11111111-2222-3333-4444-555555555555", stranger)); !errors.Is(err, errdefs.ErrPermissionDenied) || !stranger.Closed() {
			t.Errorf("claim from another pod: %v (pin closed %v), want PermissionDenied", err, stranger.Closed())
		}
		if _, _, err := r.b.Claim(l.ID, tok, podPeer(61, "", &brokertest.Process{Pid: 61})); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("claim from no unit: %v, want PermissionDenied", err)
		}

		// A reissue before the claim keeps the claimant's token.
		if _, _, err := r.b.CycleDevice(dev0, broker.Actor{Admin: true}); err != nil {
			t.Fatal(err)
		}
		vmm := &brokertest.Process{Pid: 50}
		got, f, err := r.b.Claim(l.ID, tok, podPeer(50, podUnit, vmm))
		if err != nil {
			t.Fatalf("claim by the pod's VMM after a reissue: %v", err)
		}
		f.Close()
		r.b.CommitClaim(got.ID, got.Generation)
		if got.Delegated() || got.Holder.PID != 50 || got.Holder.UID != 107 || got.Holder.Tenant != "uid=107,cgroup="+podUnit || got.Generation != 2 {
			t.Fatalf("claimed delegated lease: %+v", got)
		}
		// The VMM is the holder now: it sees the lease, and its exit ends it.
		if !broker.MayView(broker.Actor{UID: 107, Tenant: "uid=107,cgroup=" + podUnit}, got) {
			t.Error("the claiming VMM's tenant may not see its lease")
		}
		vmm.Exit()
		synctest.Wait()
		if end, _ := r.b.Get(l.ID); end.Live() || end.EndReason != broker.ReasonHolderExited {
			t.Fatalf("after the VMM exited: %+v", end)
		}
	})
}

// A delegated allocation needs an admin, the cgroup units of claimers, and a well-formed
// claimant; an undelivered claim gives the lease back to its claimant.
func TestDelegatedLeaseRefusals(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		noUnits := newRig(t, nil) // first: the rigs' fd checks run in reverse order
		if _, _, err := noUnits.b.Allocate(delegatedReq(0)); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("delegation without peer units: %v, want FailedPrecondition", err)
		}
		r := newRig(t, func(c *broker.Config) { c.PeerUnits = true })
		rq := delegatedReq(0)
		rq.Admin = false
		if _, _, err := r.b.Allocate(rq); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("delegation by a non-admin: %v", err)
		}
		for _, c := range []broker.Claimant{{PodUID: "a/b"}, {PodUID: "x", Unit: "/u"}, {Unit: "relative"}, {Unit: "/a/../b"}, {Unit: "/"}} {
			rq := delegatedReq(0)
			rq.Claimant = c
			if _, _, err := r.b.Allocate(rq); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("claimant %+v: %v, want InvalidArgument", c, err)
			}
		}
		l, tok := r.allocate(t, delegatedReq(0))
		vmm := &brokertest.Process{Pid: 50}
		got, f, err := r.b.Claim(l.ID, tok, podPeer(50, podUnit, vmm))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		r.b.Unclaim(got.ID, got.Generation) // the fd never reached the VMM
		back, _ := r.b.Get(l.ID)
		if !back.Delegated() || back.Holder.Tenant != "claimant:pod="+podUID || !vmm.Closed() {
			t.Fatalf("after an undelivered claim: %+v (pin closed %v); want delegated again", back, vmm.Closed())
		}
		again := &brokertest.Process{Pid: 51}
		if _, f, err := r.b.Claim(l.ID, tok, podPeer(51, podUnit, again)); err != nil {
			t.Fatalf("claim with the same token after the undo: %v", err)
		} else {
			f.Close()
		}
	})
}
