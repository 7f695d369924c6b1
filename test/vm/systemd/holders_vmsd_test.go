//go:build vmsystemd

package systemd

import (
	"encoding/json"
	"fmt"
	"testing"
)

// scanHolders is `mmiobrokerctl -json holders ID` as root, decoded.
type scanHolders struct {
	Leases []struct {
		Lease struct {
			ID     string `json:"id"`
			State  string `json:"state"`
			FdDead bool   `json:"fd_dead"`
		} `json:"lease"`
		Holders []struct {
			PID     int    `json:"pid"`
			UID     int    `json:"uid"`
			FD      int    `json:"fd"`
			Comm    string `json:"comm"`
			Role    string `json:"role"`
			Current bool   `json:"current_generation"`
		} `json:"holders"`
		Outlasting bool `json:"outlasting"`
	} `json:"leases"`
	Scanned      int `json:"processes_scanned"`
	Inaccessible int `json:"processes_inaccessible"`
}

func holdersOf(t *testing.T, id string) scanHolders {
	t.Helper()
	out, err := ctl("-json", "holders", id)
	if err != nil {
		t.Fatalf("mmiobrokerctl holders %s: %v\n%s", id, err, out)
	}
	t.Logf("$ mmiobrokerctl -json holders %s\n%s", id, out)
	var s scanHolders
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("holders -json: %v", err)
	}
	if len(s.Leases) != 1 || s.Leases[0].Lease.ID != id {
		t.Fatalf("holders %s reports %d leases, want that one", id, len(s.Leases))
	}
	return s
}

// TestHoldersScan: a tenant (uid 1000, in a VM scope) claims a lease and passes its fd to
// a child process. The daemon, sandboxed by the shipped unit (whose bounding set has just
// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH for this), finds both in /proc: the holder and
// the passed-on copy, by pid and fd, and no process it could not read.
// After the tenant releases the lease (R is an hour in the rig) both still hold a working
// fd: the lease is flagged outlasting. After the device cycles the fds are dead but open.
func TestHoldersScan(t *testing.T) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	testdev := env(t, "TESTDEV")
	c := dial(t)
	t.Cleanup(func() { c.Close() })
	t.Cleanup(func() { cycleAll(t, c, testdev) })

	p := startTenant(t, "holders", tenantUID, true)
	var li leaseInfo
	p.ok(fmt.Sprintf("alloc %s 2 %d %d", testdev, 7*chunk64K, chunk64K), &li)
	var own, child struct {
		PID int `json:"pid"`
		FD  int `json:"fd"`
	}
	p.ok("fd "+li.ID, &own)
	p.ok("pass "+li.ID, &child)

	type seen struct {
		role    string
		current bool
	}
	find := func(s scanHolders) map[[2]int]seen {
		m := map[[2]int]seen{}
		for _, h := range s.Leases[0].Holders {
			m[[2]int{h.PID, h.FD}] = seen{h.Role, h.Current}
			if h.Role != "HOLDER_ROLE_DAEMON" && h.Role != "HOLDER_ROLE_FD_STORE" && h.UID != tenantUID {
				t.Errorf("holder pid %d (%s) has uid %d, want the tenant's %d", h.PID, h.Comm, h.UID, tenantUID)
			}
		}
		return m
	}
	check := func(what string, s scanHolders, outlasting bool) {
		t.Helper()
		m := find(s)
		if got := m[[2]int{own.PID, own.FD}]; got != (seen{"HOLDER_ROLE_HOLDER", true}) {
			t.Errorf("%s: the tenant's fd %d in pid %d: %+v, want holder, current generation", what, own.FD, own.PID, got)
		}
		if got := m[[2]int{child.PID, child.FD}]; got != (seen{"HOLDER_ROLE_PASSED_ON", true}) {
			t.Errorf("%s: the child's fd %d in pid %d: %+v, want passed_on, current generation", what, child.FD, child.PID, got)
		}
		if len(m) != 2 {
			// The daemon closes its copy (and the fd store's) once the claim is delivered.
			t.Errorf("%s: %d descriptors reported, want the tenant's and its child's", what, len(m))
		}
		if s.Leases[0].Outlasting != outlasting {
			t.Errorf("%s: outlasting = %v, want %v", what, s.Leases[0].Outlasting, outlasting)
		}
		if s.Inaccessible != 0 || s.Scanned < 10 {
			t.Errorf("%s: %d processes scanned, %d inaccessible; want every process readable under the shipped unit", what, s.Scanned, s.Inaccessible)
		}
	}

	check("live lease", holdersOf(t, li.ID), false)

	p.ok("release "+li.ID, nil)
	s := holdersOf(t, li.ID)
	check("released, fd still live", s, true)
	if s.Leases[0].Lease.FdDead {
		t.Errorf("released lease: fd_dead already (R is an hour in the rig)")
	}

	cycleAll(t, c, testdev)
	s = holdersOf(t, li.ID)
	if !s.Leases[0].Lease.FdDead || s.Leases[0].Outlasting {
		t.Errorf("after the cycle: fd_dead %v outlasting %v, want true false", s.Leases[0].Lease.FdDead, s.Leases[0].Outlasting)
	}
	m := find(s)
	if _, ok := m[[2]int{child.PID, child.FD}]; !ok {
		t.Errorf("after the cycle the child's dead fd is no longer reported")
	}
}
