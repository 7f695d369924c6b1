package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/testing/protocmp"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
)

// fakeBARs are the BARs of a brokertest device.
var fakeBARs = []*brokerv1.Bar{
	{Index: 0, Size: 1 << 20, Mem: true},
	{Index: 1, Size: 256, Mem: true},
	{Index: 2, Size: 32},
	{Index: 4, Size: 16 << 20, Mem: true, Prefetch: true, Addr64: true},
}

func fakeDevice(bdf string, policy *brokerv1.DevicePolicy) *brokerv1.Device {
	return &brokerv1.Device{
		Bdf: bdf, VendorId: 0x1234, DeviceId: 0x11e8, ClassCode: 0x00ff00, Driver: "vfio-pci", IommuGroup: 3,
		AccessMode: brokerv1.AccessMode_ACCESS_MODE_GROUP, Bars: fakeBARs, Tsm: &brokerv1.TsmState{},
		DmaBufSupported: true, Policy: policy, Usable: true,
	}
}

var (
	sharedOnly = []brokerv1.LeaseKind{brokerv1.LeaseKind_LEASE_KIND_SHARED}
	bothKinds  = []brokerv1.LeaseKind{brokerv1.LeaseKind_LEASE_KIND_SHARED, brokerv1.LeaseKind_LEASE_KIND_PRIVATE}
)

func TestListDevices(t *testing.T) {
	e := newEnv(t)
	e.devC.SetInfo(func(i *broker.DeviceInfo) {
		i.Mode = "cdev"
		i.TSM = broker.TSMState{Present: true, Connect: "tsm0"}
		i.DMABuf = errors.New("kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA)")
	})
	e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))

	for _, u := range []user{root, holder, stranger} {
		resp, err := e.client.ListDevices(u.ctx(t), &brokerv1.ListDevicesRequest{})
		if err != nil {
			t.Fatalf("ListDevices as uid %d: %v", u.uid, err)
		}
		devA := fakeDevice(bdfA, &brokerv1.DevicePolicy{AllowedKinds: bothKinds, AllowUnattestedPrivate: true,
			AllowedUids: []uint32{uidHolder, uint32(os.Getuid())}, AllowedGids: []uint32{gidLessees}})
		devA.LiveLeases = 1
		devC := fakeDevice(bdfC, &brokerv1.DevicePolicy{AllowedKinds: sharedOnly, AllowedUids: []uint32{uidHolder}})
		devC.AccessMode = brokerv1.AccessMode_ACCESS_MODE_CDEV
		devC.Tsm = &brokerv1.TsmState{Present: true, Connect: "tsm0"}
		devC.DmaBufSupported = false
		devC.DmaBufUnsupportedReason = "kernel lacks VFIO dma-buf export (needs Linux 6.19+ with PCI_P2PDMA)"
		want := &brokerv1.ListDevicesResponse{Devices: []*brokerv1.Device{
			devA,
			fakeDevice(bdfB, &brokerv1.DevicePolicy{AllowedBars: []uint32{0}, AllowedKinds: bothKinds}),
			devC,
			{Bdf: bdfD, IommuGroup: -1, Policy: &brokerv1.DevicePolicy{AllowedKinds: sharedOnly, AllowedUids: []uint32{uidHolder}},
				Tsm: &brokerv1.TsmState{}, DmaBufUnsupportedReason: "unknown: the device is not open"},
		}}
		if diff := cmp.Diff(want, resp, protocmp.Transform(), protocmp.IgnoreFields(&brokerv1.Device{}, "error")); diff != "" {
			t.Errorf("ListDevices as uid %d (-want +got):\n%s", u.uid, diff)
		}
		if got := resp.GetDevices()[3].GetError(); !regexp.MustCompile(`device 0000:00:06\.0: open: .*no such fake device`).MatchString(got) {
			t.Errorf("unusable device error = %q", got)
		}
	}
}

func TestGetDevice(t *testing.T) {
	e := newEnv(t)
	resp, err := e.client.GetDevice(stranger.ctx(t), &brokerv1.GetDeviceRequest{Bdf: bdfB})
	if err != nil {
		t.Fatal(err)
	}
	want := fakeDevice(bdfB, &brokerv1.DevicePolicy{AllowedBars: []uint32{0}, AllowedKinds: bothKinds})
	if diff := cmp.Diff(want, resp.GetDevice(), protocmp.Transform()); diff != "" {
		t.Errorf("GetDevice (-want +got):\n%s", diff)
	}
	// The short lspci form names the same device.
	resp, err = e.client.GetDevice(stranger.ctx(t), &brokerv1.GetDeviceRequest{Bdf: "00:04.0"})
	if err != nil || resp.GetDevice().GetBdf() != bdfB {
		t.Errorf("GetDevice(00:04.0) = %v, %v; want %s", resp, err, bdfB)
	}

	for _, tc := range []struct {
		bdf  string
		code codes.Code
		msg  []string
	}{
		{"", codes.InvalidArgument, []string{"bdf is required"}},
		{"0000:00:03", codes.InvalidArgument, []string{`"0000:00:03"`}},
		{"0000:00:03.0 ", codes.InvalidArgument, nil},
		{"0000:00:3f.0", codes.InvalidArgument, []string{"above 0x1f"}},
		{bdfNone, codes.NotFound, []string{"device 0000:00:1f.0 is not configured"}},
	} {
		_, err := e.client.GetDevice(holder.ctx(t), &brokerv1.GetDeviceRequest{Bdf: tc.bdf})
		wantCode(t, err, tc.code, tc.msg...)
	}
}

func TestAllocateLease(t *testing.T) {
	e := newEnv(t)
	before := time.Now()
	req := &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 4, VmName: "vm-1 ünïcode",
		Ranges: []*brokerv1.Range{{Offset: page(16), Length: page(2)}, {Offset: 0, Length: page(1)}}}
	resp := e.allocate(holder, req)

	l := resp.GetLease()
	if !regexp.MustCompile(`^[0-9a-f]{24}$`).MatchString(l.GetId()) {
		t.Errorf("lease id %q is not 24 hex digits", l.GetId())
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(resp.GetClaimToken()) {
		t.Errorf("claim token %q is not 32 hex digits", resp.GetClaimToken())
	}
	bufs := e.devA.OpenBuffers()
	if len(bufs) != 1 {
		t.Fatalf("device has %d open buffers, want 1", len(bufs))
	}
	want := &brokerv1.AllocateLeaseResponse{
		Lease: &brokerv1.Lease{
			Id: l.GetId(), Bdf: bdfA, Bar: 4, Ranges: req.Ranges, Kind: brokerv1.LeaseKind_LEASE_KIND_SHARED,
			State: brokerv1.LeaseState_LEASE_STATE_ALLOCATED, Generation: 1, Size: page(3), Inode: bufs[0].Inode(),
			Holder: &brokerv1.Holder{Uid: uidHolder, Pid: int32(os.Getpid()), Tenant: "uid=1000"}, VmName: "vm-1 ünïcode",
			CreateTime: l.GetCreateTime(), ClaimDeadline: timestamp(l.GetCreateTime().AsTime().Add(broker.DefaultClaimTimeout)),
		},
		ClaimToken:    resp.GetClaimToken(),
		ClaimSocket:   "/run/mmiobroker/fd.sock",
		ClaimDeadline: timestamp(l.GetCreateTime().AsTime().Add(broker.DefaultClaimTimeout)),
	}
	if diff := cmp.Diff(want, resp, protocmp.Transform()); diff != "" {
		t.Errorf("AllocateLease (-want +got):\n%s", diff)
	}
	if created := l.GetCreateTime().AsTime(); created.Before(before.Add(-time.Second)) || created.After(time.Now().Add(time.Second)) {
		t.Errorf("create_time %v is not about now", created)
	}
	if bufs[0].Name != "mmb-"+l.GetId() || bufs[0].BAR != 4 {
		t.Errorf("exported buffer %q of bar %d, want mmb-%s of bar 4", bufs[0].Name, bufs[0].BAR, l.GetId())
	}

	// The token claims the fd (as fdpass would), and GetLease shows the claim.
	e.claim(l, resp.GetClaimToken())
	got, err := e.client.GetLease(holder.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || got.GetLease().GetClaimTime() == nil {
		t.Errorf("after claim: %v, want ACTIVE with claim_time", got.GetLease())
	}

	// A private lease on a device without TSM binding, allowed by policy: unattested.
	resp = e.allocate(holder2, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 0, Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE,
		Ranges: []*brokerv1.Range{{Offset: page(8), Length: page(8)}}})
	if l := resp.GetLease(); l.GetKind() != brokerv1.LeaseKind_LEASE_KIND_PRIVATE || !l.GetUnattested() || l.GetHolder().GetUid() != uidHolder2 {
		t.Errorf("private lease = %v, want PRIVATE, unattested, uid %d", l, uidHolder2)
	}
	// Admins by group may lease admin-only devices.
	e.allocate(groupAdm, oneRange(bdfB, 0, 0, page(1)))
}

// TestAllocateLeaseRejected checks every rejection of AllocateLease: its code, that the
// message names what is at fault, and that nothing changed.
func TestAllocateLeaseRejected(t *testing.T) {
	e := newEnv(t)
	// Existing leases to collide with.
	e.allocate(holder, oneRange(bdfA, 0, 0, page(4)))
	e.allocate(holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 4, Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: page(4)}}})

	many := make([]*brokerv1.Range, 17)
	for i := range many {
		many[i] = &brokerv1.Range{Offset: page(uint64(i)), Length: page(1)}
	}
	r := func(off, length uint64) []*brokerv1.Range { return []*brokerv1.Range{{Offset: off, Length: length}} }
	for _, tc := range []struct {
		name string
		as   user
		req  *brokerv1.AllocateLeaseRequest
		code codes.Code
		msg  []string
	}{
		{"no bdf", holder, &brokerv1.AllocateLeaseRequest{Ranges: r(0, page(1))}, codes.InvalidArgument, []string{"bdf is required"}},
		{"bad bdf", holder, &brokerv1.AllocateLeaseRequest{Bdf: "0000:00:03.O", Ranges: r(0, page(1))}, codes.InvalidArgument, []string{`pci address "0000:00:03.O"`}},
		{"bar 6", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 6, Ranges: r(0, page(1))}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 6", "0-5"}},
		{"huge bar", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 1 << 31, Ranges: r(0, page(1))}, codes.InvalidArgument, []string{"bar 2147483648"}},
		{"no ranges", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 0: no ranges"}},
		{"17 ranges", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: many}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 0: 17 ranges, at most 16"}},
		{"bad kind", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: r(0, page(1)), Kind: 7}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 0: unknown lease kind 7"}},
		{"long vm name", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: r(0, page(1)), VmName: string(make([]byte, 65))}, codes.InvalidArgument, []string{"vm_name is 65 bytes"}},
		{"vm name control char", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Ranges: r(0, page(1)), VmName: "vm\n1"}, codes.InvalidArgument, []string{"vm_name has the unprintable character U+000A at byte 2"}},
		{"empty range", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 4, Ranges: []*brokerv1.Range{{Offset: page(64), Length: page(1)}, {Offset: page(8)}}}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 4: range 1 [0x8000,+0x0) is empty"}},
		{"unaligned offset", holder, oneRange(bdfA, 4, 0x800, page(1)), codes.InvalidArgument, []string{"device 0000:00:03.0: bar 4: range 0 [0x800,+0x1000) is not aligned"}},
		{"unaligned length", holder, oneRange(bdfA, 4, page(64), 0x1800), codes.InvalidArgument, []string{"range 0 [0x40000,+0x1800) is not aligned"}},
		{"beyond bar", holder, oneRange(bdfA, 0, page(255), page(2)), codes.InvalidArgument, []string{"device 0000:00:03.0: bar 0: range 0 [0xff000,+0x2000) ends beyond the bar (size 0x100000)"}},
		{"wrapping range", holder, oneRange(bdfA, 0, 1<<63, 1<<63), codes.InvalidArgument, []string{"ends beyond the bar"}},
		{"overlap within lease", holder, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 4, Ranges: []*brokerv1.Range{{Offset: page(64), Length: page(4)}, {Offset: page(66), Length: page(1)}}}, codes.InvalidArgument, []string{"device 0000:00:03.0: bar 4: ranges [0x40000,+0x4000) and [0x42000,+0x1000) overlap"}},
		{"io bar", holder, oneRange(bdfA, 2, 0, page(1)), codes.InvalidArgument, []string{"device 0000:00:03.0: bar 2 is an I/O port BAR"}},
		{"unimplemented bar", holder, oneRange(bdfA, 3, 0, page(1)), codes.InvalidArgument, []string{"device 0000:00:03.0: bar 3 is not implemented"}},
		{"not configured", holder, oneRange(bdfNone, 0, 0, page(1)), codes.NotFound, []string{"device 0000:00:1f.0 is not configured"}},
		{"stranger", stranger, oneRange(bdfA, 0, page(64), page(1)), codes.PermissionDenied, []string{"device 0000:00:03.0: uid 4000 may not lease it"}},
		{"admin-only device", holder, oneRange(bdfB, 0, 0, page(1)), codes.PermissionDenied, []string{"device 0000:00:04.0: uid 1000"}},
		{"bar not in policy", root, oneRange(bdfB, 4, 0, page(1)), codes.PermissionDenied, []string{"device 0000:00:04.0: bar 4: not allowed by policy"}},
		{"kind not in policy", root, &brokerv1.AllocateLeaseRequest{Bdf: bdfC, Ranges: r(0, page(1)), Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE}, codes.PermissionDenied, []string{"device 0000:00:05.0: private leases are not allowed by policy"}},
		{"private without tsm", root, &brokerv1.AllocateLeaseRequest{Bdf: bdfB, Ranges: r(0, page(1)), Kind: brokerv1.LeaseKind_LEASE_KIND_PRIVATE}, codes.FailedPrecondition, []string{"device 0000:00:04.0: private lease needs the device bound to a TSM"}},
		{"device not open", holder, oneRange(bdfD, 0, 0, page(1)), codes.FailedPrecondition, []string{"device 0000:00:06.0: open"}},
		{"other holder overlap", holder2, oneRange(bdfA, 0, page(2), page(4)), codes.FailedPrecondition, []string{"device 0000:00:03.0: bar 0: ranges [[0x2000,+0x4000)] overlap lease", "another tenant (uid=1000)"}},
		{"private overlap", holder, oneRange(bdfA, 4, page(3), page(1)), codes.FailedPrecondition, []string{"device 0000:00:03.0: bar 4: ranges [[0x3000,+0x1000)] overlap private lease", "private ranges are exclusive"}},
		// Last, as it breaks bdfC for good.
		{"no dma-buf support", holder, oneRange(bdfC, 0, 0, page(1)), codes.FailedPrecondition, []string{"device 0000:00:05.0: kernel lacks VFIO dma-buf export"}},
	} {
		if tc.name == "no dma-buf support" {
			e.devC.SetInfo(func(i *broker.DeviceInfo) { i.DMABuf = errors.New("kernel lacks VFIO dma-buf export") })
		}
		t.Run(tc.name, func(t *testing.T) {
			before := e.allLeases()
			buffers := len(e.devA.OpenBuffers()) + len(e.devB.OpenBuffers()) + len(e.devC.OpenBuffers())
			_, err := e.client.AllocateLease(tc.as.ctx(t), tc.req)
			wantCode(t, err, tc.code, tc.msg...)
			if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
				t.Errorf("leases changed by a rejected request (-before +after):\n%s", diff)
			}
			if n := len(e.devA.OpenBuffers()) + len(e.devB.OpenBuffers()) + len(e.devC.OpenBuffers()); n != buffers {
				t.Errorf("open buffers: %d before, %d after", buffers, n)
			}
		})
	}
}

func TestAllocateLeaseLimit(t *testing.T) {
	e := newEnv(t)
	for i := range 8 {
		e.allocate(holder, oneRange(bdfA, 4, page(uint64(i)), page(1)))
	}
	before := e.allLeases()
	_, err := e.client.AllocateLease(holder.ctx(t), oneRange(bdfA, 4, page(100), page(1)))
	wantCode(t, err, codes.ResourceExhausted, "tenant uid=1000 holds 8 leases")
	if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
		t.Errorf("leases changed (-before +after):\n%s", diff)
	}
	// Another uid is not limited by holder's leases.
	e.allocate(holder2, oneRange(bdfA, 4, page(100), page(1)))
}

func TestAllocateLeaseNeedsPinnedProcess(t *testing.T) {
	e := newEnv(t, func(o *envOptions) {
		o.identify = func(ctx context.Context) (Identity, error) {
			id, err := IdentifyPeer(ctx)
			id.Pin = nil
			return id, err
		}
	})
	_, err := e.client.AllocateLease(t.Context(), oneRange(bdfA, 0, 0, page(1)))
	wantCode(t, err, codes.FailedPrecondition, "device 0000:00:03.0: cannot pin the calling process")
	if n := len(e.allLeases()); n != 0 {
		t.Errorf("%d leases after a rejected allocation", n)
	}
}

func TestGetLease(t *testing.T) {
	e := newEnv(t)
	mine := e.allocate(holder, oneRange(bdfA, 0, 0, page(1))).GetLease()

	for _, tc := range []struct {
		as   user
		id   string
		code codes.Code
		msg  []string
	}{
		{holder, mine.GetId(), codes.OK, nil},
		{root, mine.GetId(), codes.OK, nil},
		{groupAdm, mine.GetId(), codes.OK, nil},
		{holder2, mine.GetId(), codes.PermissionDenied, []string{"lease " + mine.GetId() + " is held by another tenant than uid=1001"}},
		{stranger, mine.GetId(), codes.PermissionDenied, nil},
		{holder, "", codes.InvalidArgument, []string{"lease_id is required"}},
		{holder, string(make([]byte, 65)), codes.InvalidArgument, []string{"lease_id is 65 bytes long"}},
		{holder, "0123456789abcdef01234567", codes.NotFound, []string{"lease 0123456789abcdef01234567"}},
	} {
		resp, err := e.client.GetLease(tc.as.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: tc.id})
		if tc.code != codes.OK {
			wantCode(t, err, tc.code, tc.msg...)
			continue
		}
		if err != nil {
			t.Errorf("GetLease as uid %d: %v", tc.as.uid, err)
			continue
		}
		if diff := cmp.Diff(mine, resp.GetLease(), protocmp.Transform()); diff != "" {
			t.Errorf("GetLease as uid %d (-want +got):\n%s", tc.as.uid, diff)
		}
	}
}

func leaseIDs(ls []*brokerv1.Lease) []string {
	var ids []string
	for _, l := range ls {
		ids = append(ids, l.GetId())
	}
	return ids
}

func TestListLeases(t *testing.T) {
	e := newEnv(t)
	a1 := e.allocate(holder, oneRange(bdfA, 0, 0, page(1))).GetLease().GetId()
	a2 := e.allocate(holder2, oneRange(bdfA, 4, 0, page(1))).GetLease().GetId()
	c1 := e.allocate(holder, oneRange(bdfC, 0, 0, page(1))).GetLease().GetId()
	b1 := e.allocate(root, oneRange(bdfB, 0, 0, page(1))).GetLease().GetId()
	if _, err := e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: c1}); err != nil {
		t.Fatal(err)
	}
	u := func(v uint32) *uint32 { return &v }

	for _, tc := range []struct {
		name string
		as   user
		req  *brokerv1.ListLeasesRequest
		want []string
		code codes.Code
	}{
		{"admin all", root, &brokerv1.ListLeasesRequest{}, []string{a1, a2, c1, b1}, codes.OK},
		{"group admin all", groupAdm, &brokerv1.ListLeasesRequest{}, []string{a1, a2, c1, b1}, codes.OK},
		{"admin live", root, &brokerv1.ListLeasesRequest{LiveOnly: true}, []string{a1, a2, b1}, codes.OK},
		{"admin by device", root, &brokerv1.ListLeasesRequest{Bdf: "00:03.0"}, []string{a1, a2}, codes.OK},
		{"admin by uid", root, &brokerv1.ListLeasesRequest{HolderUid: u(uidHolder2)}, []string{a2}, codes.OK},
		{"admin by uid 0", root, &brokerv1.ListLeasesRequest{HolderUid: u(0)}, []string{b1}, codes.OK},
		{"holder", holder, &brokerv1.ListLeasesRequest{}, []string{a1, c1}, codes.OK},
		{"holder own uid", holder, &brokerv1.ListLeasesRequest{HolderUid: u(uidHolder)}, []string{a1, c1}, codes.OK},
		{"holder live on device", holder, &brokerv1.ListLeasesRequest{Bdf: bdfA, LiveOnly: true}, []string{a1}, codes.OK},
		{"holder2", holder2, &brokerv1.ListLeasesRequest{}, []string{a2}, codes.OK},
		{"stranger", stranger, &brokerv1.ListLeasesRequest{}, nil, codes.OK},
		{"holder other uid", holder, &brokerv1.ListLeasesRequest{HolderUid: u(uidHolder2)}, nil, codes.PermissionDenied},
		{"bad bdf", root, &brokerv1.ListLeasesRequest{Bdf: "x"}, nil, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.client.ListLeases(tc.as.ctx(t), tc.req)
			if tc.code != codes.OK {
				wantCode(t, err, tc.code)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, leaseIDs(resp.GetLeases())); diff != "" {
				t.Errorf("lease ids (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReleaseLease(t *testing.T) {
	// R of an hour: a release leaves an ended-but-live lease that no timer buries here.
	e := newEnv(t, func(o *envOptions) { o.cfg = func(c *broker.Config) { c.RevokeWithin = time.Hour } })
	l := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	e.claim(l.GetLease(), l.GetClaimToken())
	other := e.allocate(holder2, oneRange(bdfA, 4, 0, page(1))).GetLease()

	for _, tc := range []struct {
		as   user
		id   string
		code codes.Code
		msg  []string
	}{
		{holder2, l.GetLease().GetId(), codes.PermissionDenied, []string{"is held by tenant uid=1000, not uid=1001"}},
		{stranger, l.GetLease().GetId(), codes.PermissionDenied, nil},
		{holder, "", codes.InvalidArgument, []string{"lease_id is required"}},
		{holder, "0123456789abcdef01234567", codes.NotFound, []string{"lease 0123456789abcdef01234567"}},
	} {
		before := e.allLeases()
		_, err := e.client.ReleaseLease(tc.as.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: tc.id})
		wantCode(t, err, tc.code, tc.msg...)
		if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
			t.Errorf("leases changed (-before +after):\n%s", diff)
		}
	}

	resp, err := e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	if err != nil {
		t.Fatal(err)
	}
	got := resp.GetLease()
	if got.GetState() != brokerv1.LeaseState_LEASE_STATE_RELEASED || got.GetEndReason() != brokerv1.EndReason_END_REASON_RELEASED ||
		got.GetEndTime() == nil || got.GetEndedBy() != fmt.Sprintf("uid %d pid %d", uidHolder, os.Getpid()) {
		t.Errorf("released lease = %v", got)
	}
	if n := revokes(e.devA); n != 0 {
		t.Errorf("release revoked the device %d times", n)
	}

	before := e.allLeases()
	_, err = e.client.ReleaseLease(holder.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	wantCode(t, err, codes.FailedPrecondition, "has already ended (released)")
	if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
		t.Errorf("leases changed (-before +after):\n%s", diff)
	}

	// Admins may release anyone's lease.
	resp, err = e.client.ReleaseLease(groupAdm.ctx(t), &brokerv1.ReleaseLeaseRequest{LeaseId: other.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("uid %d (admin) pid %d", uidGroupAdm, os.Getpid()); resp.GetLease().GetEndedBy() != want {
		t.Errorf("ended_by = %q, want %q", resp.GetLease().GetEndedBy(), want)
	}
}

func TestRevokeLease(t *testing.T) {
	e := newEnv(t)
	victim := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	e.claim(victim.GetLease(), victim.GetClaimToken())
	survivor := e.allocate(holder2, oneRange(bdfA, 4, 0, page(2)))
	e.claim(survivor.GetLease(), survivor.GetClaimToken())
	elsewhere := e.allocate(holder, oneRange(bdfC, 0, 0, page(1))).GetLease()

	for _, tc := range []struct {
		as   user
		id   string
		code codes.Code
		msg  []string
	}{
		{holder, victim.GetLease().GetId(), codes.PermissionDenied, []string{"revoke lease " + victim.GetLease().GetId() + ": uid 1000 pid", "is not an admin"}},
		{stranger, victim.GetLease().GetId(), codes.PermissionDenied, nil},
		{holder, "0123456789abcdef01234567", codes.PermissionDenied, nil},
		{root, "", codes.InvalidArgument, []string{"lease_id is required"}},
		{root, "0123456789abcdef01234567", codes.NotFound, []string{"lease 0123456789abcdef01234567"}},
	} {
		before := e.allLeases()
		_, err := e.client.RevokeLease(tc.as.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: tc.id})
		wantCode(t, err, tc.code, tc.msg...)
		if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
			t.Errorf("leases changed (-before +after):\n%s", diff)
		}
		if revokes(e.devA) != 0 {
			t.Fatalf("a rejected revoke cycled the device")
		}
	}

	resp, err := e.client.RevokeLease(groupAdm.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: victim.GetLease().GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if l := resp.GetLease(); l.GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED || l.GetEndReason() != brokerv1.EndReason_END_REASON_REVOKED {
		t.Errorf("revoked lease = %v", l)
	}
	if a, c := revokes(e.devA), revokes(e.devC); a != 1 || c != 0 {
		t.Errorf("device revokes: A %d, C %d; want 1, 0", a, c)
	}
	// The survivor on the same device lives on as generation 2, unclaimed; the lease on
	// the other device is untouched.
	got, err := e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: survivor.GetLease().GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if l := got.GetLease(); l.GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || l.GetGeneration() != 2 || l.GetClaimTime() != nil ||
		l.GetInode() == survivor.GetLease().GetInode() {
		t.Errorf("survivor after revoke = %v, want ACTIVE generation 2, unclaimed, new inode", l)
	}
	got, err = e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: elsewhere.GetId()})
	if err != nil || got.GetLease().GetGeneration() != 1 {
		t.Errorf("lease on another device after revoke = %v, %v; want generation 1", got, err)
	}

	before := e.allLeases()
	_, err = e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: victim.GetLease().GetId()})
	wantCode(t, err, codes.FailedPrecondition, "has already ended (revoked)")
	if diff := cmp.Diff(before, e.allLeases(), protocmp.Transform()); diff != "" {
		t.Errorf("leases changed (-before +after):\n%s", diff)
	}
}

func TestRevokeLeaseDeviceFailure(t *testing.T) {
	e := newEnv(t)
	r1 := e.allocate(holder, oneRange(bdfA, 0, 0, page(1)))
	l1 := r1.GetLease()
	e.claim(l1, r1.GetClaimToken()) // a delivered fd: revoking it needs the device cycle
	l2 := e.allocate(holder2, oneRange(bdfA, 4, 0, page(1))).GetLease()
	setRevokeErr(e.devA, errors.New("fake cycle failure"))
	_, err := e.client.RevokeLease(root.ctx(t), &brokerv1.RevokeLeaseRequest{LeaseId: l1.GetId()})
	wantCode(t, err, codes.Unavailable, "cycling device 0000:00:03.0 failed", "fake cycle failure")
	got, err := e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: l2.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetLease().GetEndReason() != brokerv1.EndReason_END_REASON_DEVICE_LOST {
		t.Errorf("other lease after a failed cycle = %v, want DEVICE_LOST", got.GetLease())
	}
	dev, err := e.client.GetDevice(root.ctx(t), &brokerv1.GetDeviceRequest{Bdf: bdfA})
	if err != nil {
		t.Fatal(err)
	}
	if d := dev.GetDevice(); d.GetUsable() || d.GetError() == "" || d.GetAccessMode() != brokerv1.AccessMode_ACCESS_MODE_UNSPECIFIED {
		t.Errorf("device after a failed cycle = %v, want unusable with an error", d)
	}
}
