package server

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/holders"
)

// procTree writes a procfs-shaped tree in which process pid has the dma-buf (inode ino,
// name) open as descriptor fd.
type procTree string

func (p procTree) add(t *testing.T, pid, fd int, comm string, ino uint64, name string) {
	t.Helper()
	dir := filepath.Join(string(p), strconv.Itoa(pid))
	for _, d := range []string{"fd", "fdinfo"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"comm":   comm + "\n",
		"status": "Name:\t" + comm + "\nUid:\t107\t107\t107\t107\n",
		filepath.Join("fdinfo", strconv.Itoa(fd)): fmt.Sprintf("pos:\t0\nflags:\t02\nmnt_id:\t9\nino:\t%d\nsize:\t4096\ncount:\t4\nexp_name:\tvfio_pci_core\nname:\t%s\n", ino, name),
	}
	for f, text := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/dmabuf:"+name, filepath.Join(dir, "fd", strconv.Itoa(fd))); err != nil {
		t.Fatal(err)
	}
}

// ScanHolders and GetLease with include_holders report what /proc says: the holder, a
// child it passed the fd to, an ended lease whose fd a tenant still holds (outlasting),
// and, to admins only, a dma-buf of no lease.
func TestScanHolders(t *testing.T) {
	tree := procTree(t.TempDir())
	e := newEnv(t, func(o *envOptions) {
		o.holders = &holders.Checker{Root: string(tree), Self: 99999}
		o.cfg = func(c *broker.Config) { c.RevokeWithin = time.Hour } // releases leave the fd live
	})
	kept := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	e.claim(kept.GetLease(), kept.GetClaimToken())
	ended := e.allocate(holder, oneRange(bdfA, 0, page(1), page(1)))
	e.claim(ended.GetLease(), ended.GetClaimToken())
	if _, err := e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: ended.GetLease().GetId()}); err != nil {
		t.Fatal(err)
	}
	lease := func(id string) *brokerv1.Lease {
		resp, err := e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: id})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetLease()
	}
	k, x := lease(kept.GetLease().GetId()), lease(ended.GetLease().GetId())
	hpid := int(k.GetHolder().GetPid())
	tree.add(t, hpid, 40, "qemu", k.GetInode(), "mmb-"+k.GetId())
	tree.add(t, 70001, 3, "helper", k.GetInode(), "renamed-by-holder")
	tree.add(t, 70002, 5, "qemu-old", x.GetInode(), "mmb-"+x.GetId())
	tree.add(t, 99999, 7, "mmiobrokerd", 123456, "mmb-ffffffffffffffffffffffff")

	resp, err := e.client.ScanHolders(root.ctx(t), &brokerv1.ScanHoldersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		Lease      string
		PID        uint32
		FD         int32
		Role       brokerv1.HolderRole
		Current    bool
		Outlasting bool
	}
	var got []row
	for _, l := range resp.GetLeases() {
		for _, h := range l.GetHolders() {
			got = append(got, row{l.GetLease().GetId(), h.GetPid(), h.GetFd(), h.GetRole(), h.GetCurrentGeneration(), l.GetOutlasting()})
		}
	}
	want := []row{
		{k.GetId(), uint32(hpid), 40, brokerv1.HolderRole_HOLDER_ROLE_HOLDER, true, false},
		{k.GetId(), 70001, 3, brokerv1.HolderRole_HOLDER_ROLE_PASSED_ON, true, false},
		{x.GetId(), 70002, 5, brokerv1.HolderRole_HOLDER_ROLE_PASSED_ON, true, true},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("ScanHolders as admin (-want +got):\n%s", d)
	}
	if u := resp.GetUnaccounted(); len(u) != 1 || u[0].GetPid() != 99999 || u[0].GetInode() != 123456 {
		t.Errorf("unaccounted = %v, want the daemon's buffer 123456", u)
	}
	if resp.GetProcessesScanned() != 4 || resp.GetScanTime() == nil {
		t.Errorf("processes_scanned %d, scan_time %v", resp.GetProcessesScanned(), resp.GetScanTime())
	}

	// The holder sees its own leases and no unaccounted list; a stranger sees nothing.
	resp, err = e.client.ScanHolders(holder.ctx(t), &brokerv1.ScanHoldersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetLeases()) != 2 || len(resp.GetUnaccounted()) != 0 {
		t.Errorf("ScanHolders as the holder: %d leases, %d unaccounted; want 2, 0", len(resp.GetLeases()), len(resp.GetUnaccounted()))
	}
	resp, err = e.client.ScanHolders(stranger.ctx(t), &brokerv1.ScanHoldersRequest{})
	if err != nil || len(resp.GetLeases()) != 0 {
		t.Errorf("ScanHolders as a stranger: %v, %d leases; want none", err, len(resp.GetLeases()))
	}
	_, err = e.client.ScanHolders(stranger.ctx(t), &brokerv1.ScanHoldersRequest{LeaseId: k.GetId()})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("ScanHolders of another tenant's lease: %v, want PermissionDenied", err)
	}
	_, err = e.client.ScanHolders(root.ctx(t), &brokerv1.ScanHoldersRequest{LeaseId: "0123456789abcdef01234567"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("ScanHolders of no lease: %v, want NotFound", err)
	}
	_, err = e.client.ScanHolders(root.ctx(t), &brokerv1.ScanHoldersRequest{LeaseId: strings.Repeat("a", 1000)})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("ScanHolders of a malformed id: %v, want InvalidArgument", err)
	}

	// GetLease with include_holders: the one lease.
	g, err := e.client.GetLease(holder.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: x.GetId(), IncludeHolders: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(g.GetHolders()) != 1 || g.GetHolders()[0].GetPid() != 70002 || !g.GetOutlasting() {
		t.Errorf("GetLease include_holders: holders %v outlasting %v; want pid 70002, outlasting", g.GetHolders(), g.GetOutlasting())
	}
	g, err = e.client.GetLease(holder.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: x.GetId()})
	if err != nil || len(g.GetHolders()) != 0 {
		t.Errorf("GetLease without include_holders: %v, %d holders; want none", err, len(g.GetHolders()))
	}
}
