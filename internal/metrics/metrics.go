package metrics

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// namespace starts the name of every metric of this package.
const namespace = "mmiobroker"

// Histogram buckets, in seconds.
var (
	// fastBuckets: device cycles and immediate revocations (a memory decode toggle and a
	// device fd reopen: milliseconds, up to a device reset's seconds).
	fastBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	// roundTripBuckets: allocation to delivered fd, bounded by claim_timeout (30 s by
	// default).
	roundTripBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}
	// endedLiveBuckets: an ended lease's fd until its device cycles, bounded by
	// revoke_within (R, 30 s by default, at most an hour).
	endedLiveBuckets = []float64{.01, .1, .5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600}
)

// Metrics is the daemon's metrics on a private registry. Create it with [New] before the
// broker (it is the broker's [broker.Observer]), add the scrape-time sources with
// [Metrics.Watch] once the broker and the servers exist, and serve [Metrics.Handler].
// Its methods are safe for concurrent use.
type Metrics struct {
	reg     *prometheus.Registry
	grpc    *grpcprom.ServerMetrics
	handler http.Handler

	events    *prometheus.CounterVec // type
	ended     *prometheus.CounterVec // reason
	reissues  *prometheus.CounterVec // bdf
	cycles    *prometheus.CounterVec // bdf, cause, result
	cycleTime prometheus.Histogram
	revoke    prometheus.Histogram
	endedLive prometheus.Histogram
	claims    *prometheus.CounterVec // code
	roundTrip prometheus.Histogram

	watchOnce sync.Once
}

var _ broker.Observer = (*Metrics)(nil)

// New returns the metrics with the Go runtime and process collectors, the broker's
// event-driven metrics and the gRPC server metrics registered. log receives the errors of
// scrapes; nil discards.
func New(log *slog.Logger) *Metrics {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets(roundTripBuckets))),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "events_total",
			Help: "Lease events the broker published, by type (what WatchEvents streams carry).",
		}, []string{"type"}),
		ended: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "leases_ended_total",
			Help: "Leases ended, by end reason: holder_exited counts VMMs that exited holding a lease, released their holders' releases, revoked admins' revokes.",
		}, []string{"reason"}),
		reissues: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "lease_reissues_total",
			Help: "Live leases re-exported as a new generation (new dma-buf and claim token) after a device cycle killed their dma-buf, by device.",
		}, []string{"bdf"}),
		cycles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "device_cycles_total",
			Help: "Device cycles (every dma-buf of the device revoked), by device, by who caused them (tenant, admin, broker) and by result (ok, failed: the device was lost).",
		}, []string{"bdf", "cause", "result"}),
		cycleTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "device_cycle_duration_seconds", Buckets: fastBuckets,
			Help: "How long a device cycle's revoke took (memory decode off, device fd closed and reopened, decode on).",
		}),
		revoke: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "revoke_latency_seconds", Buckets: fastBuckets,
			Help: "Immediate revocations (admin revoke, enforced cooperative revoke, end with revoke_within 0, lost TSM binding): from the lease's end to its delivered dma-buf dead in every process.",
		}),
		endedLive: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "ended_lease_fd_live_seconds", Buckets: endedLiveBuckets,
			Help: "Leases their tenant ended after claiming (release, holder exit, ttl): how long the fd kept working after the end, until the device cycled (bounded by revoke_within).",
		}),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "claims_total",
			Help: "Claims on the claim socket that reached the broker, by reply code (OK once the fd was sent; docs/claim-protocol.md codes otherwise).",
		}, []string{"code"}),
		roundTrip: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "lease_round_trip_seconds", Buckets: roundTripBuckets,
			Help: "From a lease's allocation to its first fd delivered on the claim socket.",
		}),
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.grpc, m.events, m.ended, m.reissues, m.cycles, m.cycleTime, m.revoke, m.endedLive, m.claims, m.roundTrip,
	)
	// Series that exist before their first event, so that rates start from zero.
	for _, t := range eventTypes {
		m.events.WithLabelValues(string(t))
	}
	for _, r := range endReasons {
		m.ended.WithLabelValues(string(r))
	}
	for c := fdpass.CodeOK; c <= fdpass.CodeInternal; c++ {
		m.claims.WithLabelValues(c.String())
	}
	m.handler = promhttp.InstrumentMetricHandler(m.reg, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            m.reg,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	return m
}

// eventTypes and endReasons are the label values created before their first event.
var (
	eventTypes = []broker.EventType{
		broker.EventAllocated, broker.EventClaimed, broker.EventRevoked, broker.EventReleased,
		broker.EventReissued, broker.EventExpired, broker.EventDeviceLost, broker.EventRevokeRequested,
		broker.EventRenewed, broker.EventSuspended, broker.EventResumed, broker.EventFdRevoked, broker.EventDeviceChanged,
	}
	endReasons = []broker.Reason{
		broker.ReasonReleased, broker.ReasonRevoked, broker.ReasonHolderExited, broker.ReasonExpired,
		broker.ReasonClaimExpired, broker.ReasonDeviceLost, broker.ReasonReissueFailed, broker.ReasonShutdown,
		broker.ReasonTSMUnbound, broker.ReasonRestoreFailed,
	}
)

// Registry returns the private registry (for tests and extra collectors).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler returns the HTTP handler of the metrics (text or OpenMetrics exposition).
func (m *Metrics) Handler() http.Handler { return m.handler }

// UnaryInterceptor and StreamInterceptor count and time every RPC
// (grpc_server_started_total, grpc_server_handled_total by grpc_code,
// grpc_server_handling_seconds, grpc_server_msg_*_total). Give them to the server
// outside its own interceptor, so that they see the status code each client gets
// (server.Options.UnaryInterceptors).
func (m *Metrics) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return m.grpc.UnaryServerInterceptor()
}

// StreamInterceptor: see [Metrics.UnaryInterceptor].
func (m *Metrics) StreamInterceptor() grpc.StreamServerInterceptor {
	return m.grpc.StreamServerInterceptor()
}

// Event implements [broker.Observer]: events by type, lease ends by reason, reissues,
// and how long ended leases' fds lived.
func (m *Metrics) Event(e broker.Event) {
	m.events.WithLabelValues(string(e.Type)).Inc()
	switch e.Type {
	case broker.EventReleased, broker.EventRevoked, broker.EventExpired, broker.EventDeviceLost:
		if e.Lease.State.Ended() {
			m.ended.WithLabelValues(string(e.Lease.EndReason)).Inc()
		}
	case broker.EventReissued:
		m.reissues.WithLabelValues(e.Lease.BDF).Inc()
	case broker.EventFdRevoked:
		if !e.Lease.Ended.IsZero() {
			m.endedLive.Observe(e.Time.Sub(e.Lease.Ended).Seconds())
		}
	}
}

// DeviceCycled implements [broker.Observer].
func (m *Metrics) DeviceCycled(c broker.Cycle) {
	result := "ok"
	if c.Err != nil {
		result = "failed"
	}
	m.cycles.WithLabelValues(c.BDF, string(c.Cause), result).Inc()
	m.cycleTime.Observe(c.Took.Seconds())
}

// Revoked implements [broker.Observer].
func (m *Metrics) Revoked(_ broker.Lease, took time.Duration) {
	m.revoke.Observe(took.Seconds())
}

// Claimed counts a claim that the broker decided, with the code its client got.
func (m *Metrics) Claimed(code fdpass.Code) {
	m.claims.WithLabelValues(code.String()).Inc()
}

// RoundTrip observes the time from a lease's allocation to its first fd delivered.
func (m *Metrics) RoundTrip(d time.Duration) {
	m.roundTrip.Observe(d.Seconds())
}

// Watch adds the metrics read at scrape time from src. It may be called once.
func (m *Metrics) Watch(src Sources) error {
	if src.Broker == nil {
		return errors.New("metrics: Sources.Broker is required")
	}
	err := fmt.Errorf("metrics: Watch called twice")
	m.watchOnce.Do(func() {
		m.initCycles(src.Broker)
		err = m.reg.Register(newCollector(src))
	})
	return err
}

// initCycles creates the device cycle and reissue series of every configured device.
func (m *Metrics) initCycles(b *broker.Broker) {
	for _, d := range b.Stats().Devices {
		m.reissues.WithLabelValues(d.Policy.BDF)
		for _, cause := range []broker.CycleCause{broker.CauseTenant, broker.CauseAdmin, broker.CauseBroker} {
			for _, result := range []string{"ok", "failed"} {
				m.cycles.WithLabelValues(d.Policy.BDF, string(cause), result)
			}
		}
	}
}
