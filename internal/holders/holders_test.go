package holders

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

const self = 50

func lease(id string, ino uint64, holder int32, state broker.State, dead bool) broker.Lease {
	l := broker.Lease{ID: id, BDF: "0000:00:04.0", Inode: ino, State: state, Dead: dead}
	l.Holder.PID = holder
	if state.Ended() {
		l.Ended = time.Unix(100, 0)
		if !dead {
			l.RevokeDue = time.Unix(130, 0)
		}
	}
	return l
}

func ref(pid, fd int, ino uint64, name string) dmabuf.Ref {
	return dmabuf.Ref{PID: pid, FD: fd, Info: dmabuf.FDInfo{Inode: ino, Name: name, ExpName: ExporterName, Size: 4096}}
}

func TestJoin(t *testing.T) {
	leases := []broker.Lease{
		lease("aa", 501, 100, broker.StateActive, false),    // held, passed on to a child
		lease("bb", 502, 200, broker.StateReleased, false),  // ended, fd still works: outlasting
		lease("cc", 503, 300, broker.StateReleased, true),   // ended, device cycled: dead
		lease("dd", 504, 400, broker.StateAllocated, false), // not claimed yet
		lease("ee", 505, 500, broker.StateRevoked, true),    // ended and closed everywhere
	}
	s := dmabuf.Scan{
		Refs: []dmabuf.Ref{
			ref(1, 20, 501, "mmb-aa"),     // the fd store
			ref(self, 7, 501, "mmb-aa"),   // the daemon's copy
			ref(self, 8, 599, "mmb-gone"), // the daemon kept a buffer of no lease: a leak
			ref(self, 9, 598, "mmb-aa"),   // the daemon kept an old generation: a leak
			ref(100, 40, 501, "mmb-aa"),   // the holder
			ref(100, 41, 490, "mmb-aa"),   // the holder kept an old generation (dead)
			ref(101, 3, 501, "renamed"),   // its child: found by inode whatever the name
			ref(200, 40, 502, "mmb-bb"),   // a tenant outlasting its lease
			ref(300, 40, 503, "mmb-cc"),   // dead but open
			ref(600, 5, 777, "mmb-zz"),    // a name of no known lease
			ref(700, 5, 778, "gpu-buf"),   // another program's vfio dma-buf: not ours
			{PID: 100, FD: 50, Info: dmabuf.FDInfo{Inode: 501, ExpName: "udmabuf"}}, // another exporter
		},
		Processes: map[int]dmabuf.Process{100: {PID: 100, Comm: "qemu", UID: 107}, 101: {PID: 101, Comm: "child", UID: 107}},
		Scanned:   9, Inaccessible: 2,
	}
	r := Join(s, leases, self, true)

	got := map[string][]Holder{}
	outlasting := map[string]bool{}
	for _, l := range r.Leases {
		got[l.Lease.ID] = l.Holders
		outlasting[l.Lease.ID] = l.Outlasting
	}
	p := func(pid int) dmabuf.Process {
		if pr, ok := s.Processes[pid]; ok {
			return pr
		}
		return dmabuf.Process{PID: pid}
	}
	want := map[string][]Holder{
		"aa": {
			{Process: p(1), FD: 20, Inode: 501, Role: RoleFDStore, Current: true},
			{Process: p(self), FD: 7, Inode: 501, Role: RoleDaemon, Current: true},
			{Process: p(100), FD: 40, Inode: 501, Role: RoleHolder, Current: true},
			{Process: p(100), FD: 41, Inode: 490, Role: RoleHolder, Current: false},
			{Process: p(101), FD: 3, Inode: 501, Role: RolePassedOn, Current: true},
		},
		"bb": {{Process: p(200), FD: 40, Inode: 502, Role: RoleHolder, Current: true}},
		"cc": {{Process: p(300), FD: 40, Inode: 503, Role: RoleHolder, Current: true}},
		"dd": nil,
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("holders by lease (-want +got):\n%s", d)
	}
	if d := cmp.Diff(map[string]bool{"aa": false, "bb": true, "cc": false, "dd": false}, outlasting); d != "" {
		t.Errorf("outlasting (-want +got):\n%s", d)
	}
	var un []uint64
	for _, u := range r.Unaccounted {
		un = append(un, u.Info.Inode)
	}
	if d := cmp.Diff([]uint64{599, 598, 777}, un); d != "" {
		t.Errorf("unaccounted inodes (-want +got):\n%s", d)
	}
	wantCounts := Counts{Holder: 1, PassedOn: 1, EndedLive: 1, Dead: 2, Unaccounted: 3, Outlasting: 1}
	if d := cmp.Diff(wantCounts, r.Counts); d != "" {
		t.Errorf("counts (-want +got):\n%s", d)
	}
	if r.Scanned != 9 || r.Inaccessible != 2 {
		t.Errorf("Scanned %d Inaccessible %d, want 9 2", r.Scanned, r.Inaccessible)
	}

	// A caller who may not see every lease gets no unaccounted list (the count stays).
	r = Join(s, leases[:1], self, false)
	if len(r.Unaccounted) != 0 || len(r.Leases) != 1 {
		t.Errorf("restricted join: %d unaccounted, %d leases; want 0, 1", len(r.Unaccounted), len(r.Leases))
	}
}

// A Checker never answers from a scan older than the request: a descriptor opened between
// two requests is in the second answer.
func TestCheckerScansAfterRequest(t *testing.T) {
	root := t.TempDir()
	c := &Checker{Root: root, Self: self}
	leases := []broker.Lease{lease("aa", 501, 100, broker.StateActive, false)}
	list := func() ([]broker.Lease, error) { return leases, nil }
	r, err := c.Report(list, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Leases) != 1 || len(r.Leases[0].Holders) != 0 || r.Time.IsZero() {
		t.Fatalf("empty /proc: %+v", r)
	}
	dir := filepath.Join(root, "100")
	for _, d := range []string{"fd", "fdinfo"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/dmabuf:mmb-aa", filepath.Join(dir, "fd", "40")); err != nil {
		t.Fatal(err)
	}
	info := "pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t501\nsize:\t4096\ncount:\t3\nexp_name:\tvfio_pci_core\nname:\tmmb-aa\n"
	if err := os.WriteFile(filepath.Join(dir, "fdinfo", "40"), []byte(info), 0o644); err != nil {
		t.Fatal(err)
	}
	r2, err := c.Report(list, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(r2.Leases[0].Holders) != 1 || r2.Leases[0].Holders[0].Role != RoleHolder || !r2.Time.After(r.Time) {
		t.Errorf("second report: %+v, want the holder's fd 40 from a later scan", r2.Leases[0])
	}
	if _, ok := c.Last(); ok {
		t.Error("Last reports a periodic check that never ran")
	}
}
