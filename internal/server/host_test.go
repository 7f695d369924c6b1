package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/host"
	"github.com/mmiobroker/mmiobroker/internal/kvm"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// hostClient serves a broker without devices with Options.Host = fn and returns a client.
func hostClient(t *testing.T, fn HostFunc) brokerv1.BrokerClient {
	t.Helper()
	testutil.FDLeakCheck(t)
	b, err := broker.New(broker.Config{}, brokertest.Opener(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	srv := New(b, Options{Identify: testIdentify, Host: fn})
	l, err := Listen(filepath.Join(testutil.ShortTempDir(t), "control.sock"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	var sockets connTracker
	conn, err := grpc.NewClient("passthrough:///"+l.Addr().String(),
		grpc.WithTransportCredentials(newEnvCreds()), grpc.WithContextDialer(sockets.dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		sockets.wait(t)
		b.Close()
	})
	return brokerv1.NewBrokerClient(conn)
}

// testReport is a host with KVM (SNP), one TSM and an absent iommufd.
func testReport() host.Report {
	return host.Report{
		KernelRelease: "7.2.13+deb14-amd64",
		Probes: []host.Probe{
			{Name: host.ProbeVFIO, OK: true, Value: "/dev/vfio/vfio, vfio_iommu_type1"},
			{Name: host.ProbeIOMMUFD, Reason: "no /dev/iommu: the kernel is built without CONFIG_IOMMUFD (ENOENT)", Err: errors.New("not sent")},
			{Name: host.ProbeKVM, OK: true, Value: "/dev/kvm, API 12"},
			{Name: "kvm.vm_types", OK: true, Value: "0x11 (default, snp)"},
		},
		VMTypes: []kvm.VMType{kvm.KVM_X86_DEFAULT_VM, kvm.KVM_X86_SNP_VM, 9},
		TSMs:    []host.TSM{{Name: "tsm0", Parent: "0000:00:00.2", Driver: "ccp", Connected: []string{"0000:3b:00.0"}, Bound: []string{"0000:3b:00.0"}}},
		Limits: host.Limits{MaxLeases: 4096, MaxLeasesPerHolder: 64, MaxRangesPerLease: 16, ClaimTimeout: 30 * time.Second,
			RevokeWithin: 0, TenantCycleInterval: 10 * time.Second, TenantCycleBudget: 0, MinTTL: time.Minute,
			MaxConnections: 1024, MaxConnectionsPerTenant: 128, MaxConcurrentClaims: 64, FDLimit: 524288, FDBudget: 15000, TenantsBy: "cgroup"},
	}
}

func TestGetHost(t *testing.T) {
	calls := 0
	c := hostClient(t, func(ctx context.Context) (host.Report, error) {
		calls++
		if _, err := identityFrom(ctx); err != nil {
			t.Errorf("the host func got no caller identity: %v", err)
		}
		return testReport(), nil
	})
	want := &brokerv1.Host{
		KernelRelease: "7.2.13+deb14-amd64",
		Probes: []*brokerv1.Probe{
			{Name: "vfio", Ok: true, Value: "/dev/vfio/vfio, vfio_iommu_type1"},
			{Name: "iommufd", Reason: "no /dev/iommu: the kernel is built without CONFIG_IOMMUFD (ENOENT)"},
			{Name: "kvm", Ok: true, Value: "/dev/kvm, API 12"},
			{Name: "kvm.vm_types", Ok: true, Value: "0x11 (default, snp)"},
		},
		VmTypes: []*brokerv1.VmType{{Name: "default", Type: 0}, {Name: "snp", Type: 4}, {Name: "type-9", Type: 9}},
		Tsms:    []*brokerv1.Tsm{{Name: "tsm0", Parent: "0000:00:00.2", Driver: "ccp", ConnectedDevices: []string{"0000:3b:00.0"}, BoundDevices: []string{"0000:3b:00.0"}}},
		Limits: &brokerv1.Limits{MaxLeases: 4096, MaxLeasesPerHolder: 64, MaxRangesPerLease: 16,
			ClaimTimeout: durationpb.New(30 * time.Second), RevokeWithin: durationpb.New(0), TenantCycleInterval: durationpb.New(10 * time.Second),
			MinTtl: durationpb.New(time.Minute), MaxConnections: 1024, MaxConnectionsPerTenant: 128, MaxConcurrentClaims: 64,
			FdLimit: 524288, FdBudget: 15000, TenantsBy: "cgroup"},
	}
	// Anyone may ask: an admin, a holder, a uid no device allows.
	for _, u := range []user{root, holder, stranger} {
		resp, err := c.GetHost(u.ctx(t), &brokerv1.GetHostRequest{})
		if err != nil {
			t.Fatalf("GetHost as uid %d: %v", u.uid, err)
		}
		if diff := cmp.Diff(want, resp.GetHost(), protocmp.Transform()); diff != "" {
			t.Errorf("GetHost as uid %d (-want +got):\n%s", u.uid, diff)
		}
	}
	if calls != 3 {
		t.Errorf("host func called %d times for 3 calls", calls)
	}
}

func TestGetHostErrors(t *testing.T) {
	// Without Options.Host (newEnv sets none): UNIMPLEMENTED.
	e := newEnv(t)
	_, err := e.client.GetHost(stranger.ctx(t), &brokerv1.GetHostRequest{})
	wantCode(t, err, codes.Unimplemented, "this daemon has no host report")

	// A failing report keeps its class.
	c := hostClient(t, func(context.Context) (host.Report, error) {
		return host.Report{}, fmt.Errorf("probing: %w", errdefs.ErrUnavailable)
	})
	_, err = c.GetHost(holder.ctx(t), &brokerv1.GetHostRequest{})
	wantCode(t, err, codes.Unavailable, "host report: probing")

	// An unidentified caller gets nothing.
	_, err = c.GetHost(metadata.AppendToOutgoingContext(holder.ctx(t), "x-test-deny", "1"), &brokerv1.GetHostRequest{})
	wantCode(t, err, codes.Unauthenticated, "test identity refused")
}
