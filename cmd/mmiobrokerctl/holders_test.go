package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
)

func TestWriteHolders(t *testing.T) {
	at := timestamppb.New(time.Date(2026, 12, 6, 5, 0, 0, 0, time.UTC))
	live := &brokerv1.Lease{Id: "0123456789abcdef01234567", State: brokerv1.LeaseState_LEASE_STATE_ACTIVE}
	ended := &brokerv1.Lease{Id: "89abcdef0123456789abcdef", State: brokerv1.LeaseState_LEASE_STATE_RELEASED,
		EndReason: brokerv1.EndReason_END_REASON_RELEASED, RevokeDue: at}
	idle := &brokerv1.Lease{Id: "fedcba9876543210fedcba98", State: brokerv1.LeaseState_LEASE_STATE_ALLOCATED}
	r := &brokerv1.ScanHoldersResponse{
		Leases: []*brokerv1.LeaseHolders{
			{Lease: live, Holders: []*brokerv1.FdHolder{
				{Pid: 1, Comm: "systemd", Fd: 60, Role: brokerv1.HolderRole_HOLDER_ROLE_FD_STORE, CurrentGeneration: true},
				{Pid: 812, Comm: "qemu-system-x86", Uid: 107, Fd: 41, Role: brokerv1.HolderRole_HOLDER_ROLE_HOLDER, CurrentGeneration: true},
				{Pid: 815, Comm: "vhost-helper", Uid: 107, Fd: 5, Role: brokerv1.HolderRole_HOLDER_ROLE_PASSED_ON},
			}},
			{Lease: ended, Outlasting: true, Holders: []*brokerv1.FdHolder{
				{Pid: 900, Comm: "qemu-system-x86", Uid: 107, Fd: 40, Role: brokerv1.HolderRole_HOLDER_ROLE_HOLDER, CurrentGeneration: true},
			}},
			{Lease: idle},
		},
		Unaccounted:           []*brokerv1.DmabufRef{{Pid: 77, Comm: "mmiobrokerd", Fd: 12, Inode: 4242, Name: "mmb-ffffffffffffffffffffffff", Size: 65536}},
		ScanTime:              at,
		ScanDuration:          durationpb.New(3200 * time.Microsecond),
		ProcessesScanned:      120,
		ProcessesInaccessible: 2,
	}
	var b bytes.Buffer
	if err := writeHolders(&b, r); err != nil {
		t.Fatal(err)
	}
	want := `LEASE                     STATE      FD-STATE                         PID  COMM             UID  FD  ROLE       GEN         FLAG
0123456789abcdef01234567  active     -                                1    systemd          0    60  fd_store   current     -
0123456789abcdef01234567  active     -                                812  qemu-system-x86  107  41  holder     current     -
0123456789abcdef01234567  active     -                                815  vhost-helper     107  5   passed_on  old (dead)  -
89abcdef0123456789abcdef  released   live until 2026-12-06T05:00:00Z  900  qemu-system-x86  107  40  holder     current     OUTLASTING
fedcba9876543210fedcba98  allocated  -                                -    -                -    -   -          -           -

Dma-bufs of vfio-pci that no lease accounts for:
PID  COMM         UID  FD  INODE  NAME                          SIZE
77   mmiobrokerd  0    12  4242   mmb-ffffffffffffffffffffffff  64KiB

Scanned 120 processes at 2026-12-06T05:00:00Z in 3.2ms; 2 could not be read (the daemon needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH for other users' processes).
`
	if d := cmp.Diff(want, b.String()); d != "" {
		t.Errorf("holders (-want +got):\n%s", d)
	}
}

// TestEndToEndHolders: mmiobrokerctl holders against the real daemon wiring. The fake
// devices' buffers are not vfio-pci dma-bufs, so the scan of the real /proc finds no
// descriptor: every live lease gets its row of dashes.
func TestEndToEndHolders(t *testing.T) {
	d := daemontest.Start(t, fmt.Sprintf("[[device]]\naddress = %q\n", e2eBDF), brokertest.NewDevice(e2eBDF))
	ctl := &testDaemon{Daemon: d}
	cl, err := client.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	resp, err := cl.API().AllocateLease(t.Context(), &brokerv1.AllocateLeaseRequest{Bdf: e2eBDF,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetLease().GetId()
	out := ctl.mustCtl(t, "holders")
	if !regexp.MustCompile(`(?m)^`+id+` +allocated +- +- +- +- +- +- +- +-$`).MatchString(out) ||
		!regexp.MustCompile(`\nScanned [1-9][0-9]* processes at `).MatchString(out) {
		t.Errorf("mmiobrokerctl holders:\n%s", out)
	}
	var doc struct {
		Leases []struct {
			Lease struct {
				ID string `json:"id"`
			} `json:"lease"`
		} `json:"leases"`
		Scanned int `json:"processes_scanned"`
	}
	if err := json.Unmarshal([]byte(ctl.mustCtl(t, "-json", "holders", id)), &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Leases) != 1 || doc.Leases[0].Lease.ID != id || doc.Scanned == 0 {
		t.Errorf("holders -json %s: %+v", id, doc)
	}
	_, errs, code := ctl.ctl(t, "holders", "ffffffffffffffffffffffff")
	if code != exitNotFound || !strings.Contains(errs, "not found") {
		t.Errorf("holders of no lease: exit %d, %s", code, errs)
	}
	_, errs, code = ctl.ctl(t, "holders", "a", "b")
	if code != exitUsage || !strings.Contains(errs, "at most 1 argument") {
		t.Errorf("holders with two arguments: exit %d, %s", code, errs)
	}
}
