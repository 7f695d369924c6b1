package server

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// The benchmarks run the real stack on the fake exporter: the server with peer
// credentials and its interceptors on a unix socket, the broker, and the fdpass claim
// socket with SCM_RIGHTS. Compare with fdpass's BenchmarkSCMRightsBare (the floor of the
// claim) and BenchmarkUnaryBare here (the floor of an RPC).

// BenchmarkUnaryBare is one unary gRPC call (health Check) over the control socket,
// through the server's interceptors (peer identity, logging to a discarding logger).
func BenchmarkUnaryBare(b *testing.B) {
	e := newBenchEnv(b)
	h := healthpb.NewHealthClient(e.conn)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := h.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLeaseRoundTrip is one lease round trip: AllocateLease over gRPC, then the claim
// over the claim socket until the dma-buf fd is in hand. After each round trip the fd is
// closed and the lease released through the broker directly (in-process, a few µs), so
// that limits are not hit.
func BenchmarkLeaseRoundTrip(b *testing.B) {
	e := newBenchEnv(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := e.roundTrip(ctx, e.client); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLeaseRoundTripParallel is BenchmarkLeaseRoundTrip from 32 concurrent clients,
// each with its own connection; ns/op is the inverse of the throughput.
func BenchmarkLeaseRoundTripParallel(b *testing.B) {
	const clients = 32
	e := newBenchEnv(b)
	conns := make([]brokerv1.BrokerClient, clients)
	for i := range conns {
		conns[i] = brokerv1.NewBrokerClient(e.dial())
	}
	var next atomic.Int64
	// RunParallel starts parallelism × GOMAXPROCS goroutines: at least 32.
	procs := runtime.GOMAXPROCS(0)
	b.SetParallelism((clients + procs - 1) / procs)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		c := conns[int(next.Add(1)-1)%clients]
		for pb.Next() {
			if err := e.roundTrip(ctx, c); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// benchEnv is an env plus a claim socket.
type benchEnv struct {
	*env
	claimSocket string
}

func newBenchEnv(b *testing.B) *benchEnv {
	b.Helper()
	e := newEnv(b, func(o *envOptions) {
		o.identify = IdentifyPeer
		// One tenant (this process) churns leases: released ones stay ended-but-live
		// (R of an hour) and count, so the limits are raised; the device cycles every
		// 1024 releases (the per-device cap), as it would for such a tenant.
		o.cfg = func(c *broker.Config) {
			c.Limits.MaxLeasesPerHolder, c.Limits.MaxLeases = 1<<20, 1<<20
			c.RevokeWithin = time.Hour
		}
		o.quiet = true
	})
	be := &benchEnv{env: e, claimSocket: filepath.Join(testutil.ShortTempDir(b), "fd.sock")}
	l, err := fdpass.Listen(be.claimSocket, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	// Every client of a benchmark is this process, one tenant: its share of the claim
	// slots is raised to all of them, so that 32 parallel clients measure throughput, not
	// the per-tenant limit (16 by default).
	fs := fdpass.NewServer(claimer{e.b}, fdpass.Options{MaxConnsPerTenant: 64})
	done := make(chan error, 1)
	go func() { done <- fs.Serve(ctx, l) }()
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("claim socket Serve: %v", err)
		}
	})
	return be
}

// roundTrip allocates a lease, claims its fd, closes it and releases the lease.
func (e *benchEnv) roundTrip(ctx context.Context, c brokerv1.BrokerClient) error {
	resp, err := c.AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdfA, Bar: 0, Ranges: []*brokerv1.Range{{Offset: 0, Length: 1 << 16}}})
	if err != nil {
		return err
	}
	id := resp.GetLease().GetId()
	f, _, err := fdpass.Claim(ctx, e.claimSocket, id, resp.GetClaimToken())
	if err != nil {
		return err
	}
	f.Close()
	_, err = e.b.Release(id, broker.Actor{UID: uint32(os.Getuid()), PID: int32(os.Getpid())})
	return err
}

// claimer adapts the broker to fdpass, as the daemon does.
type claimer struct{ b *broker.Broker }

func (c claimer) Claim(_ context.Context, req fdpass.Request, peer fdpass.Peer) (fdpass.Grant, *os.File, error) {
	l, f, err := c.b.Claim(req.LeaseID, req.Token, broker.Peer{UID: peer.UID, PID: peer.PID})
	if err != nil {
		return fdpass.Grant{}, nil, err
	}
	return fdpass.Grant{LeaseID: l.ID, Generation: l.Generation, Size: l.Size, Inode: l.Inode, BDF: l.BDF, BAR: uint32(l.BAR)}, f, nil
}

// BenchmarkWatchFanout is one lease event delivered to 100 WatchEvents streams of an
// administrator (this process, root in CI: a tenant's streams are limited to 16) over 10
// connections: the broker renews a lease (a RENEWED event) and the benchmark waits until
// every stream received it. ns/op divided by 100 is the cost of one delivery, the
// daemon's and the receiving client's together (both in this process).
func BenchmarkWatchFanout(b *testing.B) {
	testutil.SkipUnlessRoot(b) // the 100 streams are an administrator's
	const streams, conns = 100, 10
	e := newBenchEnv(b)
	admin := broker.Actor{UID: 0, PID: int32(os.Getpid()), Admin: true}
	l, _, err := e.b.Allocate(broker.AllocateRequest{BDF: bdfA, BAR: 0, Ranges: []broker.Range{{Offset: 0, Length: 1 << 16}},
		Holder: broker.Holder{UID: 0, PID: int32(os.Getpid())}, Admin: true})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan struct{}, streams)
	errs := make(chan error, streams)
	for i := range streams {
		c := brokerv1.NewBrokerClient(e.dial())
		if i >= conns {
			c = brokerv1.NewBrokerClient(e.conns[i%conns])
		}
		s, err := c.WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Header(); err != nil {
			b.Fatal(err)
		}
		go func() {
			for {
				if _, err := s.Recv(); err != nil {
					errs <- err
					return
				}
				got <- struct{}{}
			}
		}()
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.b.Renew(l.ID, admin, time.Hour); err != nil {
			b.Fatal(err)
		}
		for range streams {
			select {
			case <-got:
			case err := <-errs:
				b.Fatalf("a stream ended: %v", err)
			}
		}
	}
}
