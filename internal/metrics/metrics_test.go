package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/holders"
	"github.com/mmiobroker/mmiobroker/internal/metrics/metricstest"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	bdf  = "0000:00:03.0"
	page = 4096
)

var admin = broker.Actor{UID: 0, PID: 1, Admin: true}

// rig is a broker on one fake device observed by fresh metrics.
type rig struct {
	m *Metrics
	b *broker.Broker
	// check is the holder check the metrics see; nil: none has run yet.
	check *holders.Report
}

func newRig(t *testing.T, revokeWithin time.Duration) *rig {
	t.Helper()
	m := New(nil)
	cfg := broker.Config{
		Devices:      []broker.DeviceConfig{{BDF: bdf, UIDs: []uint32{1000}, Kinds: []broker.Kind{broker.KindShared, broker.KindPrivate}, AllowUnattestedPrivate: true}},
		RevokeWithin: revokeWithin,
	}
	b, err := broker.NewWithOptions(cfg, brokertest.Opener(brokertest.NewDevice(bdf)), nil, broker.Options{Observer: m})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	r := &rig{m: m, b: b}
	err = m.Watch(Sources{
		Broker: b,
		GRPCConns: func() peercred.ConnStats {
			return peercred.ConnStats{Open: 3, Limit: 1024, TenantMax: 2, TenantLimit: 128, Refused: 5}
		},
		Claims: func() fdpass.Stats {
			return fdpass.Stats{InProgress: 1, MaxConns: 64, TenantMax: 1, TenantLimit: 16, Rejected: 2, Dropped: 1}
		},
		FDBudget: 13000,
		Holders: func() (holders.Report, bool) {
			if r.check == nil {
				return holders.Report{}, false
			}
			return *r.check, true
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Watch(Sources{Broker: b}); err == nil {
		t.Error("a second Watch succeeded")
	}
	return r
}

// allocate allocates page n of BAR 0 for uid 1000 pid 42 and, if claim, claims it.
func (r *rig) allocate(t *testing.T, n uint64, kind broker.Kind, claim bool) broker.Lease {
	t.Helper()
	l, tok, err := r.b.Allocate(broker.AllocateRequest{BDF: bdf, BAR: 0, Kind: kind,
		Ranges: []broker.Range{{Offset: n * page, Length: page}},
		Holder: broker.Holder{UID: 1000, GID: 1000, PID: 42, Proc: &brokertest.Process{Pid: 42}}})
	if err != nil {
		t.Fatal(err)
	}
	if claim {
		_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 42})
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return l
}

// value returns the value of the sample of metric name with labels (a histogram's
// sample count), 0 if there is none.
func value(t *testing.T, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	return metricstest.Gather(t, g).Value(name, labels...)
}

// lint fails the test on every promlint problem of the registry.
func lint(t *testing.T, g prometheus.Gatherer) {
	t.Helper()
	metricstest.Lint(t, metricstest.Gather(t, g))
}

func TestLint(t *testing.T) {
	r := newRig(t, time.Hour)
	// Every metric present: a lease of each state, a cycle, a revoke, a reissue.
	r.allocate(t, 0, broker.KindShared, false)
	r.allocate(t, 1, broker.KindShared, true)
	l := r.allocate(t, 2, broker.KindShared, true)
	if _, err := r.b.Release(l.ID, broker.Actor{UID: 1000, PID: 42}); err != nil {
		t.Fatal(err)
	}
	r.m.Claimed(fdpass.CodeOK)
	r.m.RoundTrip(time.Millisecond)
	lint(t, r.m.Registry())
	for _, name := range []string{
		"mmiobroker_leases", "mmiobroker_leases_limit", "mmiobroker_leases_in_use",
		"mmiobroker_device_usable", "mmiobroker_device_next_cycle_timestamp_seconds",
		"mmiobroker_event_subscribers", "mmiobroker_grpc_connections_limit", "mmiobroker_claim_connections_refused_total",
		"mmiobroker_fd_budget", "mmiobroker_claims_total", "mmiobroker_lease_round_trip_seconds",
		"mmiobroker_device_cycles_total", "process_open_fds", "process_max_fds", "go_goroutines",
	} {
		if n, err := testutil.GatherAndCount(r.m.Registry(), name); err != nil || n == 0 {
			t.Errorf("%s: %d series, %v; want some", name, n, err)
		}
	}
}

func TestLeasesAndCycles(t *testing.T) {
	r := newRig(t, time.Hour)
	reg := r.m.Registry()
	leases := func(kind, state string) float64 {
		return value(t, reg, "mmiobroker_leases", "bdf", bdf, "kind", kind, "state", state)
	}
	// Every configured combination exists before any lease.
	if n, _ := testutil.GatherAndCount(reg, "mmiobroker_leases"); n != 2*3 {
		t.Errorf("mmiobroker_leases has %d series, want 6 (2 kinds x 3 states)", n)
	}
	r.allocate(t, 0, broker.KindShared, false)
	held := r.allocate(t, 1, broker.KindShared, true)
	private := r.allocate(t, 8, broker.KindPrivate, true)
	if a, s, p := leases("shared", "allocated"), leases("shared", "active"), leases("private", "active"); a != 1 || s != 1 || p != 1 {
		t.Errorf("leases allocated/active shared, active private = %v %v %v, want 1 1 1", a, s, p)
	}
	if got := value(t, reg, "mmiobroker_leases_in_use"); got != 3 {
		t.Errorf("leases_in_use = %v, want 3", got)
	}

	// A tenant's release of a claimed lease: ended but live until the device cycles.
	if _, err := r.b.Release(held.ID, broker.Actor{UID: 1000, PID: 42}); err != nil {
		t.Fatal(err)
	}
	if got := leases("shared", "ended_live"); got != 1 {
		t.Errorf("ended_live after release = %v, want 1", got)
	}
	if got := value(t, reg, "mmiobroker_device_next_cycle_timestamp_seconds", "bdf", bdf); got <= 0 {
		t.Errorf("next cycle = %v, want a time (the ended lease's revoke deadline)", got)
	}
	if got := value(t, reg, "mmiobroker_leases_ended_total", "reason", "released"); got != 1 {
		t.Errorf("leases_ended_total{released} = %v, want 1", got)
	}

	// An admin's revoke of the private lease cycles the device: the ended-but-live
	// lease's fd dies with it, and the still live shared lease is reissued.
	r.allocate(t, 2, broker.KindShared, true)
	if _, err := r.b.Revoke(private.ID, admin, 0); err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"mmiobroker_device_cycles_total", []string{"bdf", bdf, "cause", "admin", "result", "ok"}, 1},
		{"mmiobroker_device_cycles_total", []string{"bdf", bdf, "cause", "tenant", "result", "ok"}, 0},
		{"mmiobroker_device_cycle_duration_seconds", nil, 1},
		{"mmiobroker_revoke_latency_seconds", nil, 1},
		{"mmiobroker_ended_lease_fd_live_seconds", nil, 1},
		{"mmiobroker_leases_ended_total", []string{"reason", "revoked"}, 1},
		// Both live leases, the claimed one and the pending one, get a new generation.
		{"mmiobroker_lease_reissues_total", []string{"bdf", bdf}, 2},
		{"mmiobroker_events_total", []string{"type", "fd_revoked"}, 1},
		{"mmiobroker_events_total", []string{"type", "reissued"}, 2},
		{"mmiobroker_events_total", []string{"type", "claimed"}, 3},
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "ended_live"}, 0},
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "private", "state", "active"}, 0},
		// A reissued lease keeps its state (active: its holder claims the new generation
		// with the token of the reissued event).
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "allocated"}, 1},
		{"mmiobroker_leases", []string{"bdf", bdf, "kind", "shared", "state", "active"}, 1},
		{"mmiobroker_device_next_cycle_timestamp_seconds", []string{"bdf", bdf}, 0},
		{"mmiobroker_device_usable", []string{"bdf", bdf}, 1},
	}
	for _, c := range checks {
		if got := value(t, reg, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

func TestTenantCycleAndHolderExit(t *testing.T) {
	r := newRig(t, 0) // revoke_within 0: a tenant's end cycles the device at once
	reg := r.m.Registry()
	p := &brokertest.Process{Pid: 43}
	l, tok, err := r.b.Allocate(broker.AllocateRequest{BDF: bdf, BAR: 0, Ranges: []broker.Range{{Offset: 0, Length: page}},
		Holder: broker.Holder{UID: 1000, GID: 1000, PID: 43, Proc: p}})
	if err != nil {
		t.Fatal(err)
	}
	_, f, err := r.b.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: 43})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	p.Exit()
	for e := range sub.Events() {
		if e.Type == broker.EventReleased && e.Lease.ID == l.ID {
			break
		}
	}
	if got := value(t, reg, "mmiobroker_leases_ended_total", "reason", "holder_exited"); got != 1 {
		t.Errorf("leases_ended_total{holder_exited} = %v, want 1", got)
	}
	if got := value(t, reg, "mmiobroker_device_cycles_total", "bdf", bdf, "cause", "tenant", "result", "ok"); got != 1 {
		t.Errorf("device_cycles_total{tenant} = %v, want 1", got)
	}
	if got := value(t, reg, "mmiobroker_revoke_latency_seconds"); got != 1 {
		t.Errorf("revoke latency count = %v, want 1", got)
	}
}

func TestSubscribersAndLag(t *testing.T) {
	r := newRig(t, time.Hour)
	reg := r.m.Registry()
	l := r.allocate(t, 0, broker.KindShared, false)
	sub, err := r.b.Subscribe(0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if got := value(t, reg, "mmiobroker_event_subscribers"); got != 1 {
		t.Errorf("event_subscribers = %v, want 1", got)
	}
	// Never read: the subscription falls behind and is cut off.
	for sub.Err() == nil {
		if _, err := r.b.Renew(l.ID, admin, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	if !errors.Is(sub.Err(), broker.ErrSubscriberLagged) {
		t.Fatalf("subscription ended with %v", sub.Err())
	}
	if s, lagged := value(t, reg, "mmiobroker_event_subscribers"), value(t, reg, "mmiobroker_event_subscribers_lagged_total"); s != 0 || lagged != 1 {
		t.Errorf("event_subscribers, lagged = %v, %v; want 0, 1", s, lagged)
	}
}

func TestSources(t *testing.T) {
	r := newRig(t, time.Hour)
	reg := r.m.Registry()
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"mmiobroker_grpc_connections", nil, 3},
		{"mmiobroker_grpc_connections_limit", nil, 1024},
		{"mmiobroker_grpc_connections_busiest_tenant", nil, 2},
		{"mmiobroker_grpc_connections_tenant_limit", nil, 128},
		{"mmiobroker_grpc_connections_refused_total", nil, 5},
		{"mmiobroker_claim_connections", nil, 1},
		{"mmiobroker_claim_connections_limit", nil, 64},
		{"mmiobroker_claim_connections_tenant_limit", nil, 16},
		{"mmiobroker_claim_connections_refused_total", []string{"how", "busy"}, 2},
		{"mmiobroker_claim_connections_refused_total", []string{"how", "dropped"}, 1},
		{"mmiobroker_fd_budget", nil, 13000},
		{"mmiobroker_leases_limit", nil, broker.DefaultMaxLeases},
	} {
		if got := value(t, reg, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := value(t, reg, "process_max_fds"); got <= 0 {
		t.Errorf("process_max_fds = %v, want RLIMIT_NOFILE", got)
	}
}

// The holder check's counts appear once a check has run, and follow the latest one.
func TestHolderCheck(t *testing.T) {
	r := newRig(t, time.Hour)
	reg := r.m.Registry()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "mmiobroker_holder_check") || mf.GetName() == "mmiobroker_dmabuf_fds" {
			t.Errorf("%s reported before any holder check", mf.GetName())
		}
	}
	at := time.Unix(1_800_000_000, 0)
	for _, counts := range []holders.Counts{
		{Holder: 3, PassedOn: 1, EndedLive: 2, Dead: 4, Unaccounted: 1, Outlasting: 2},
		{Holder: 2},
	} {
		r.check = &holders.Report{Time: at, Duration: 25 * time.Millisecond, Inaccessible: 7, Counts: counts}
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"mmiobroker_dmabuf_fds", []string{"class", "holder"}, float64(counts.Holder)},
			{"mmiobroker_dmabuf_fds", []string{"class", "passed_on"}, float64(counts.PassedOn)},
			{"mmiobroker_dmabuf_fds", []string{"class", "ended_live"}, float64(counts.EndedLive)},
			{"mmiobroker_dmabuf_fds", []string{"class", "dead"}, float64(counts.Dead)},
			{"mmiobroker_dmabuf_fds", []string{"class", "unaccounted"}, float64(counts.Unaccounted)},
			{"mmiobroker_leases_outlasting", nil, float64(counts.Outlasting)},
			{"mmiobroker_holder_check_timestamp_seconds", nil, 1_800_000_000},
			{"mmiobroker_holder_check_duration_seconds", nil, 0.025},
			{"mmiobroker_holder_check_processes_inaccessible", nil, 7},
		} {
			if got := value(t, reg, c.name, c.labels...); got != c.want {
				t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
			}
		}
	}
	lint(t, reg)
}

func TestClaimsAndGRPC(t *testing.T) {
	m := New(nil)
	reg := m.Registry()
	if got := value(t, reg, "mmiobroker_claims_total", "code", "BAD_TOKEN"); got != 0 {
		t.Errorf("claims_total{BAD_TOKEN} before = %v", got)
	}
	m.Claimed(fdpass.CodeBadToken)
	m.Claimed(fdpass.CodeOK)
	m.Claimed(fdpass.CodeOK)
	if ok, bad := value(t, reg, "mmiobroker_claims_total", "code", "OK"), value(t, reg, "mmiobroker_claims_total", "code", "BAD_TOKEN"); ok != 2 || bad != 1 {
		t.Errorf("claims_total OK, BAD_TOKEN = %v, %v; want 2, 1", ok, bad)
	}
	// The interceptor counts what the handler returned, by status code.
	info := &grpc.UnaryServerInfo{FullMethod: "/mmiobroker.v1.Broker/AllocateLease"}
	call := m.UnaryInterceptor()
	for _, err := range []error{nil, status.Error(codes.PermissionDenied, "no"), nil} {
		call(context.Background(), nil, info, func(context.Context, any) (any, error) { return nil, err })
	}
	for code, want := range map[string]float64{"OK": 2, "PermissionDenied": 1} {
		if got := value(t, reg, "grpc_server_handled_total", "grpc_method", "AllocateLease", "grpc_code", code); got != want {
			t.Errorf("grpc_server_handled_total{AllocateLease,%s} = %v, want %v", code, got, want)
		}
	}
	if got := value(t, reg, "grpc_server_handling_seconds", "grpc_method", "AllocateLease"); got != 3 {
		t.Errorf("grpc_server_handling_seconds count = %v, want 3", got)
	}
	lint(t, reg)

	// The handler serves the text exposition.
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	if rec.Code != http.StatusOK || !strings.Contains(string(body), `mmiobroker_claims_total{code="OK"} 2`) {
		t.Errorf("GET /metrics: %d\n%s", rec.Code, body)
	}
}
