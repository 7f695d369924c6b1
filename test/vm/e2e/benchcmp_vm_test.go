//go:build vmtest

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/hostdev"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
	"github.com/mmiobroker/mmiobroker/test/vm/guestd"
)

// The comparison the lease round trip is judged by on the real kernel: what a VMM pays to
// get a dma-buf of a BAR range through the broker, next to what it pays to get the same
// dma-buf by opening the device and exporting it itself, in the same guest run, on the
// same device and range (benchDevice's BAR benchBAR, its first benchLen bytes). `go run
// ./test/vm/cmd/rig bench` runs them on both kernels with the other benchmarks of this
// package and writes docs/benchmarks-vm.md.
//
// BenchmarkVMLease/brokered and BenchmarkVMExportSelf are the two sides alone;
// BenchmarkVMLeaseVsSelf measures them alternately, so that both see the same host load,
// and gives the verdict. BenchmarkVMExportOnly is the kernel's floor of the export, the
// other BenchmarkVMLease sub-benchmarks break the lease down.
//
// Every benchmark reports p50-µs and p99-µs over its timed operations (the last run's), or
// <step>-p50-µs and <step>-p99-µs for each of its steps; ns/op is the mean of what it
// times. Nothing here asserts a speed.

// BenchmarkVMLease runs the brokered benchmarks against one mmiobrokerd in the guest,
// started as the e2e tests start it (guestd: the guest's binary, a configuration file,
// READY=1 by sd_notify) with the device alone, which it opens at start. One daemon
// serves all three sub-benchmarks and every run of each (a start costs about half a
// second under TCG). The client is the benchmark, root: an administrator.
//
// The daemon runs with revoke_within = 1h (docs/benchmarks.md's single-client scenario):
// a released lease stays ended-but-live and costs no device cycle, and the 1025th
// ended-but-live lease of the device makes the next allocation cycle it (timed; at most
// once per 1024 leases). With R = 0 every release would cycle the device at once, which
// belongs to the revoke rows, not to the lease.
func BenchmarkVMLease(b *testing.B) {
	bdf := benchAddr(b, benchDevice)
	d, _ := benchDaemon(b, bdf)
	b.Run("brokered", func(b *testing.B) { benchLeaseBrokered(b, d, bdf) })
	b.Run("dial", func(b *testing.B) { benchLeaseDial(b, d, bdf) })
	b.Run("steps", func(b *testing.B) { benchLeaseSteps(b, d, bdf) })
}

// benchLeaseBrokered (BenchmarkVMLease/brokered) is the lease round trip of
// docs/benchmarks.md on the real kernel: a VMM with a connected client (client.Dial, one
// warm-up lease) calls client.Allocate: AllocateLease on the control socket, then the
// claim on the claim socket, timed until the dma-buf fd is in hand. Closing the fd and
// ReleaseLease follow outside the timed part.
func benchLeaseBrokered(b *testing.B, d *daemon, bdf pci.Address) {
	c, err := client.Dial(d.control, client.WithClaimSocket(d.claim))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	opt := benchAllocateOptions(bdf)
	benchRelease(b, c, benchAllocate(b, c, opt)) // connects to the control socket
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ds = append(ds, timedLease(b, c, opt))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// benchLeaseDial (BenchmarkVMLease/dial) is a VMM's first lease: client.Dial and the
// lease round trip on the new client (gRPC connects at the first call), timed until the
// fd is in hand; release and client.Close follow outside the timed part.
func benchLeaseDial(b *testing.B, d *daemon, bdf pci.Address) {
	opt := benchAllocateOptions(bdf)
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		c, err := client.Dial(d.control, client.WithClaimSocket(d.claim))
		if err != nil {
			b.Fatal(err)
		}
		l := benchAllocate(b, c, opt)
		ds = append(ds, time.Since(start))
		b.StopTimer()
		benchRelease(b, c, l)
		c.Close()
		b.StartTimer()
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// benchLeaseSteps (BenchmarkVMLease/steps) splits the lease round trip into its two
// calls and puts the floor of any call to the daemon next to them, all three in every
// iteration, so that they share the guest's load: a bare unary gRPC call
// (grpc.health.v1.Health/Check, which the daemon serves on the control socket, on a
// connection of its own), AllocateLease (client API, the range given: no GetDevice
// first), and the claim (client.Claim: a new connection to the claim socket, the token,
// the fd by SCM_RIGHTS). Each is timed alone and reported as <step>-p50-µs and
// <step>-p99-µs; ns/op is the mean of their sum. Closing the fd and ReleaseLease follow
// outside the timed part.
func benchLeaseSteps(b *testing.B, d *daemon, bdf pci.Address) {
	c, err := client.Dial(d.control, client.WithClaimSocket(d.claim))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	conn, err := grpc.NewClient("unix://"+d.control, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	opt := benchAllocateOptions(bdf)
	req := &brokerv1.AllocateLeaseRequest{Bdf: opt.BDF, Bar: uint32(opt.BAR), Ranges: opt.Ranges}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	step := func() (rpc, alloc, claim time.Duration) {
		start := time.Now()
		if _, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		resp, err := c.API().AllocateLease(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		f, _, err := c.Claim(ctx, resp.GetLease().GetId(), resp.GetClaimToken())
		if err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		b.StopTimer()
		benchRelease(b, c, &client.Lease{ID: resp.GetLease().GetId(), File: f})
		b.StartTimer()
		return t1.Sub(start), t2.Sub(t1), t3.Sub(t2)
	}
	step() // connects both connections
	var rpcs, allocs, claims []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rpc, alloc, claim := step()
		rpcs, allocs, claims = append(rpcs, rpc), append(allocs, alloc), append(claims, claim)
	}
	b.StopTimer()
	testutil.ReportPercentilesAs(b, "grpc", rpcs)
	testutil.ReportPercentilesAs(b, "allocate", allocs)
	testutil.ReportPercentilesAs(b, "claim", claims)
}

// BenchmarkVMExportSelf is what a VMM does without the broker to get the same dma-buf:
// open the device itself the way mmiobrokerd opens it (hostdev.Open, access mode auto:
// the VFIO cdev bound to an iommufd and attached to an IOAS on the iommufd kernel, the
// group joined to a type1 container on the stock kernel; memory decode on, since a
// dma-buf exported with it off is born revoked; the request and error notifiers a VMM
// registers too) and export the range (VFIO_DEVICE_FEATURE_DMA_BUF), timed until the fd is
// in hand. Closing the dma-buf and the device (which releases group and container, or
// iommufd) follows outside the timed part. vfio-pci resets the device when it is opened
// and when its last fd closes; the open's reset is in the timed part, as it is in any VMM
// that opens the device.
func BenchmarkVMExportSelf(b *testing.B) {
	bdf := benchAddr(b, benchDevice)
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ds = append(ds, exportSelf(b, bdf, i == 0))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// exportSelf opens the device, exports the range and returns how long that took; closing
// both follows with b's timer stopped. With check, it fails b unless the device was opened
// on the kernel's access path.
func exportSelf(b *testing.B, bdf pci.Address, check bool) time.Duration {
	start := time.Now()
	d, err := hostdev.Open(bdf, hostdev.Options{})
	if err != nil {
		b.Fatal(err)
	}
	buf, err := d.Export(benchBAR, []broker.Range{{Offset: 0, Length: benchLen}}, "")
	if err != nil {
		d.Close()
		b.Fatal(err)
	}
	took := time.Since(start)
	b.StopTimer()
	defer b.StartTimer()
	if check {
		checkBenchMode(b, d.Info().Mode)
	}
	if err := buf.Close(); err != nil {
		b.Fatal(err)
	}
	if err := d.Close(); err != nil {
		b.Fatal(err)
	}
	return took
}

// BenchmarkVMLeaseVsSelf measures the two sides of the target, a brokered lease and the
// VMM alone, alternately, so that both see the same load of the host (whose CPUs the
// guest's one vCPU shares): blocks of leaseVsSelfBlock brokered leases (as
// BenchmarkVMLease/brokered, against a daemon started for the block and stopped after it,
// since the daemon holds the device open) and as many opens + exports (as
// BenchmarkVMExportSelf), in the order ABBA (brokered first in even blocks, the VMM alone
// first in odd ones). b.N counts pairs; the daemon's start, its warm-up lease and its stop
// are not timed. Reported: brokered-p50-µs, brokered-p99-µs, self-p50-µs, self-p99-µs,
// and brokered/self-p50, the ratio of the two p50s.
func BenchmarkVMLeaseVsSelf(b *testing.B) {
	bdf := benchAddr(b, benchDevice)
	opt := benchAllocateOptions(bdf)
	leases := make([]time.Duration, 0, b.N)
	selves := make([]time.Duration, 0, b.N)
	brokered := func(k int) {
		b.StopTimer()
		d, gd := benchDaemon(b, bdf)
		c, err := client.Dial(d.control, client.WithClaimSocket(d.claim))
		if err != nil {
			b.Fatal(err)
		}
		benchRelease(b, c, benchAllocate(b, c, opt)) // connects to the control socket
		b.StartTimer()
		for j := 0; j < k; j++ {
			leases = append(leases, timedLease(b, c, opt))
		}
		b.StopTimer()
		c.Close()
		stopDaemon(b, gd) // it holds the device open
		b.StartTimer()
	}
	self := func(k int) {
		for j := 0; j < k; j++ {
			selves = append(selves, exportSelf(b, bdf, len(selves) == 0))
		}
	}
	b.ResetTimer()
	for block := 0; len(leases) < b.N; block++ {
		k := min(leaseVsSelfBlock, b.N-len(leases))
		if block%2 == 0 {
			brokered(k)
			self(k)
		} else {
			self(k)
			brokered(k)
		}
	}
	b.StopTimer()
	testutil.ReportPercentilesAs(b, "brokered", leases)
	testutil.ReportPercentilesAs(b, "self", selves)
	if p := testutil.Percentile(selves, 0.5); p > 0 {
		b.ReportMetric(float64(testutil.Percentile(leases, 0.5))/float64(p), "brokered/self-p50")
	}
}

// leaseVsSelfBlock is how many operations of one side BenchmarkVMLeaseVsSelf does before
// it turns to the other: enough to pay for a daemon start (about half a second under
// TCG) with leases, few enough that both sides alternate every second or two.
const leaseVsSelfBlock = 8

// stopDaemon stops a daemon that benchDaemon started before b's run ends (SIGTERM; it
// drains its leases and closes its device) and waits until its process is gone. guestd's
// cleanup then finds it stopped and checks its exit status.
func stopDaemon(b *testing.B, gd *guestd.Daemon) {
	b.Helper()
	fd, err := unix.PidfdOpen(gd.Cmd.Process.Pid, 0)
	if err != nil {
		b.Fatalf("mmiobrokerd (pid %d): pidfd_open: %v", gd.Cmd.Process.Pid, err)
	}
	defer unix.Close(fd)
	if err := gd.Cmd.Process.Signal(unix.SIGTERM); err != nil {
		b.Fatal(err)
	}
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 30_000)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			b.Fatal(err)
		case n == 0:
			b.Fatal("mmiobrokerd did not exit within 30 s of SIGTERM")
		}
		return
	}
}

// BenchmarkVMExportOnly is the kernel's floor of the export: VFIO_DEVICE_FEATURE_DMA_BUF
// of the same range on a device this process opened once before the timed part
// (vfio.Open, access mode auto, memory decode on), timed until the fd is in hand; closing
// the dma-buf follows outside the timed part.
func BenchmarkVMExportOnly(b *testing.B) {
	d, err := vfio.Open(benchAddr(b, benchDevice), vfio.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	checkBenchMode(b, string(d.Mode()))
	if err := d.SetMemoryEnable(true); err != nil {
		b.Fatal(err)
	}
	ranges := []vfio.DMARange{{Offset: 0, Length: benchLen}}
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		f, err := d.ExportDMABuf(benchBAR, ranges, unix.O_RDWR)
		if err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
		b.StopTimer()
		f.Close()
		b.StartTimer()
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// checkBenchMode fails b unless the device was opened on the path of the running kernel:
// cdev + iommufd on the iommufd kernel, group/container on the stock kernel.
func checkBenchMode(b *testing.B, mode string) {
	b.Helper()
	want := string(vfio.ModeGroup)
	if iommufdKernel() {
		want = string(vfio.ModeCdev)
	}
	if mode != want {
		b.Fatalf("device opened in mode %q on the %s kernel, want %q", mode, os.Getenv("MMIOBROKER_VM_KERNEL"), want)
	}
}

func benchAllocateOptions(bdf pci.Address) client.AllocateOptions {
	return client.AllocateOptions{BDF: bdf.String(), BAR: benchBAR, Ranges: []*brokerv1.Range{{Offset: 0, Length: benchLen}}}
}

func benchAllocate(b *testing.B, c *client.Client, opt client.AllocateOptions) *client.Lease {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := c.Allocate(ctx, opt)
	if err != nil {
		b.Fatal(err)
	}
	return l
}

// timedLease returns how long one lease took until its fd was in hand; the release that
// follows is outside the benchmark's timer.
func timedLease(b *testing.B, c *client.Client, opt client.AllocateOptions) time.Duration {
	start := time.Now()
	l := benchAllocate(b, c, opt)
	d := time.Since(start)
	b.StopTimer()
	benchRelease(b, c, l)
	b.StartTimer()
	return d
}

func benchRelease(b *testing.B, c *client.Client, l *client.Lease) {
	l.File.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.Release(ctx, l.ID); err != nil {
		b.Fatal(err)
	}
}

// benchDaemon starts the guest's mmiobrokerd (guestd, as the e2e tests do) on the device
// bdf alone, BAR benchBAR, until b's run ends (or stopDaemon). Its limits do not throttle a benchmark:
// revoke_within 1h (see BenchmarkVMLease), room for the ended-but-live leases that pile
// up, no tenant cycle rate or budget; log level info, as deployed.
func benchDaemon(b *testing.B, bdf pci.Address) (*daemon, *guestd.Daemon) {
	b.Helper()
	dir := b.TempDir()
	d := &daemon{dir: dir, control: filepath.Join(dir, "control.sock"), claim: filepath.Join(dir, "fd.sock")}
	cfg := fmt.Sprintf(`
[daemon]
control_socket = %q
claim_socket = %q
log_format = "json"
log_level = "info"

[limits]
revoke_within = "1h"
tenant_cycle_interval = "0s"
tenant_cycle_budget = 0
max_leases = 2048
max_leases_per_holder = 2048

[[device]]
address = %q
bars = [%d]
`, d.control, d.claim, bdf, benchBAR)
	cfgPath := filepath.Join(dir, "mmiobrokerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	return d, guestd.Start(b, dir, cfgPath)
}
