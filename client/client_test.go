package client_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(withExampleDaemon{m})
}

const bdf = "0000:00:03.0"

func start(t *testing.T) (*daemontest.Daemon, *client.Client) {
	t.Helper()
	testutil.FDLeakCheck(t)
	d := daemontest.Start(t, fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid()),
		brokertest.NewDevice(bdf))
	c, err := client.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return d, c
}

func ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestAllocateReleaseWatch(t *testing.T) {
	_, c := start(t)
	// The whole BAR by default (BAR 0 of the fake device is 1 MiB).
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, VMName: "vm1"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	fi, err := l.File.Stat()
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Ino != l.Claim.Inode || uint64(st.Size) != 1<<20 || l.Claim.Size != 1<<20 || l.Claim.Generation != 1 ||
		l.Claim.BDF != bdf || l.Claim.BAR != 0 || l.Claim.LeaseID != l.ID {
		t.Errorf("claim %+v, fd inode %d size %d", l.Claim, st.Ino, st.Size)
	}
	if rs := l.Lease.GetRanges(); len(rs) != 1 || rs[0].GetOffset() != 0 || rs[0].GetLength() != 1<<20 || l.Lease.GetVmName() != "vm1" {
		t.Errorf("lease = %v", l.Lease)
	}
	rel, err := c.Release(ctx(t), l.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rel.GetState() != brokerv1.LeaseState_LEASE_STATE_RELEASED {
		t.Errorf("released lease state %v", rel.GetState())
	}
	if _, err := c.Release(ctx(t), l.ID); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("second release: %v, want FailedPrecondition", err)
	}

	// Replay after the first event (allocated): claimed, released, in order.
	wctx, cancel := context.WithCancel(ctx(t))
	defer cancel()
	var got []brokerv1.EventType
	want := []brokerv1.EventType{brokerv1.EventType_EVENT_TYPE_CLAIMED, brokerv1.EventType_EVENT_TYPE_RELEASED}
	for e, err := range c.Watch(wctx, 1) {
		if err != nil {
			t.Fatal(err)
		}
		if e.GetLease().GetId() != l.ID {
			t.Fatalf("event of another lease: %v", e)
		}
		got = append(got, e.GetType())
		if len(got) == len(want) {
			cancel() // the sequence then ends without an error
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events after seq 1: %v, want %v", got, want)
	}
}

func TestAllocateErrors(t *testing.T) {
	_, c := start(t)
	tests := []struct {
		opt  client.AllocateOptions
		code codes.Code
	}{
		{client.AllocateOptions{BDF: bdf, BAR: 6}, codes.InvalidArgument},
		{client.AllocateOptions{BDF: bdf, BAR: 3}, codes.InvalidArgument}, // no BAR 3: the size lookup fails
		{client.AllocateOptions{BDF: "0000:00:1f.0", BAR: 0}, codes.NotFound},
		{client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 1, Length: 4096}}}, codes.InvalidArgument},
		{client.AllocateOptions{BDF: bdf, BAR: 0, Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE}, codes.PermissionDenied},
	}
	for _, tt := range tests {
		l, err := c.Allocate(ctx(t), tt.opt)
		if status.Code(err) != tt.code {
			t.Errorf("Allocate(%+v) = %v, %v; want code %v", tt.opt, l, err, tt.code)
		}
		if l != nil {
			l.File.Close()
		}
	}
}

func TestClaimErrors(t *testing.T) {
	d, c := start(t)
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	// The token was used by Allocate.
	_, _, err = c.Claim(ctx(t), l.ID, "00000000000000000000000000000000")
	var ce *client.ClaimError
	if !errors.As(err, &ce) || ce.LeaseID != l.ID || status.Code(err) != codes.PermissionDenied || ce.Code != "BAD_TOKEN" {
		t.Errorf("claim with a wrong token: %v (code %v), want a BAD_TOKEN ClaimError mapped to PermissionDenied", err, status.Code(err))
	}
	_, _, err = c.Claim(ctx(t), "0123456789abcdef01234567", "00000000000000000000000000000000")
	if status.Code(err) != codes.NotFound || !errors.As(err, &ce) || ce.Code != "NOT_FOUND" {
		t.Errorf("claim of an unknown lease: %v, want NOT_FOUND / NotFound", err)
	}
	// No claim socket there.
	c2, err := client.Dial(d.Control, client.WithClaimSocket(filepath.Join(t.TempDir(), "none.sock")))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_, err = c2.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if status.Code(err) != codes.Unavailable || !errors.Is(err, syscall.ENOENT) {
		t.Errorf("allocate with a missing claim socket: %v, want Unavailable wrapping ENOENT", err)
	}
	// The unclaimed lease was released rather than left to expire.
	resp, err := c.API().ListLeases(ctx(t), &brokerv1.ListLeasesRequest{LiveOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.GetLeases()); n != 1 {
		t.Errorf("%d live leases, want only the first one", n)
	}
}

func TestRevoke(t *testing.T) {
	_, c := start(t)
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	r, err := c.Revoke(ctx(t), l.ID)
	if err != nil {
		t.Fatal(err) // the test process is an administrator (daemontest)
	}
	if r.GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED || r.GetEndReason() != brokerv1.EndReason_END_REASON_REVOKED {
		t.Errorf("revoked lease = %v", r)
	}
}

func TestDaemonGone(t *testing.T) {
	c, err := client.Dial(filepath.Join(t.TempDir(), "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("Allocate with no daemon: %v, want Unavailable", err)
	}
	for _, err := range c.Watch(ctx(t), 0) {
		if status.Code(err) != codes.Unavailable {
			t.Errorf("Watch with no daemon: %v, want Unavailable", err)
		}
	}
}

func TestWatchEndsWhenDaemonStops(t *testing.T) {
	d, _ := start(t)
	// A daemon that does not come back: the stream's end is reported once the client
	// stopped waiting for it.
	c, err := client.Dial(d.Control, client.WithClaimSocket(d.Claim), client.WithReconnectTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	l, err := c.Allocate(ctx(t), client.AllocateOptions{BDF: bdf, BAR: 0})
	if err != nil {
		t.Fatal(err)
	}
	defer l.File.Close()
	claimed, ended := false, false
	for e, err := range c.Watch(ctx(t), 1) {
		if err != nil {
			if status.Code(err) != codes.Unavailable {
				t.Errorf("stream ended with %v, want Unavailable", err)
			}
			ended = true
			continue // the sequence ends after an error
		}
		if e.GetType() == brokerv1.EventType_EVENT_TYPE_CLAIMED {
			claimed = true
			go d.Stop()
		}
	}
	if !claimed || !ended {
		t.Errorf("claimed %v, ended with an error %v; want both", claimed, ended)
	}
}
