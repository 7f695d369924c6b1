package broker_test

import (
	"testing"
	"testing/synctest"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
)

// Leases of one holder process (same pid and start stamp; each allocation pins it anew, as
// the server does per RPC) share one pin and one exit watcher: the later pins are closed
// at once, the shared one when the last lease ends, and the process's exit ends every
// lease it still holds.
func TestHolderProcessShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRig(t, nil)
		procs := []*brokertest.Process{{Pid: 42}, {Pid: 42}, {Pid: 42}}
		var ids []string
		for i, p := range procs {
			rq := req(dev0, 0, 1000, 42, broker.Range{Offset: uint64(i) * page, Length: page})
			rq.Holder.Proc, rq.Holder.Start = p, 777
			l, _ := r.allocate(t, rq)
			ids = append(ids, l.ID)
		}
		if procs[0].Closed() || !procs[1].Closed() || !procs[2].Closed() {
			t.Fatalf("pins closed: %v %v %v; want the first kept, the later two closed", procs[0].Closed(), procs[1].Closed(), procs[2].Closed())
		}
		if _, err := r.b.Release(ids[0], broker.Actor{Admin: true}); err != nil {
			t.Fatal(err)
		}
		if procs[0].Closed() {
			t.Fatal("the shared pin was closed while the process still holds two leases")
		}
		procs[0].Exit()
		synctest.Wait()
		for _, id := range ids[1:] {
			l, err := r.b.Get(id)
			if err != nil || l.Live() || l.EndReason != broker.ReasonHolderExited {
				t.Fatalf("lease %s after its holder exited: %+v, %v; want ended, holder_exited", id, l, err)
			}
		}
		if !procs[0].Closed() {
			t.Fatal("the shared pin is still open after the process's last lease ended")
		}

		// Another process with the same pid (a new start stamp) is not that holder.
		p4 := &brokertest.Process{Pid: 42}
		rq := req(dev0, 0, 1000, 42, broker.Range{Offset: 8 * page, Length: page})
		rq.Holder.Proc, rq.Holder.Start = p4, 778
		l4, _ := r.allocate(t, rq)
		if p4.Closed() {
			t.Fatal("a new process's pin was closed as if it joined the old one")
		}
		if got, _ := r.b.Get(l4.ID); !got.Live() {
			t.Fatalf("the new process's lease: %+v", got)
		}
	})
}
