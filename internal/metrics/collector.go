package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/holders"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// Sources are what the metrics read at scrape time ([Metrics.Watch]).
type Sources struct {
	// Broker is the broker whose leases, devices and event subscribers are reported
	// ([broker.Broker.Stats]: one short hold of its lock, no device call). Required.
	Broker *broker.Broker
	// GRPCConns returns the control server's connections (server.Server.Conns); nil:
	// not reported.
	GRPCConns func() peercred.ConnStats
	// Claims returns the claim server's slots (fdpass.Server.Stats); nil: not reported.
	Claims func() fdpass.Stats
	// FDBudget is the most fds the configuration can need, which the daemon checked
	// against RLIMIT_NOFILE at start; 0: not reported.
	FDBudget int
	// Holders returns the last periodic holder check (holders.Checker.Last); nil: not
	// reported. Nothing is reported before the first check.
	Holders func() (holders.Report, bool)
}

// Lease states as the leases gauge labels them: live leases by their state, and
// ended-but-live ones (their fds work until the device cycles) as one.
const (
	stateAllocated = "allocated"
	stateActive    = "active"
	stateEndedLive = "ended_live"
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
}

var (
	leasesDesc = desc("leases", "Leases by device, kind and state: allocated (waiting for its claim), active (claimed), ended_live (ended by its tenant, but its fd works until the device's next cycle).",
		"bdf", "kind", "state")
	leasesLimitDesc = desc("leases_limit", "The most leases the daemon holds ([limits] max_leases; ended-but-live ones count).")
	leasesInUseDesc = desc("leases_in_use", "Leases counted against leases_limit: live, being exported, or ended but live.")

	deviceUsableDesc    = desc("device_usable", "1 if the device is open and leasable, 0 if not (failed to open, lost, unbound).", "bdf")
	deviceSuspendedDesc = desc("device_suspended", "1 while the device is suspended for maintenance (memory decode off).", "bdf")
	deviceErrorsDesc    = desc("device_errors_total", "Errors (AER) the device reported since it was last opened.", "bdf")
	deviceNextCycleDesc = desc("device_next_cycle_timestamp_seconds", "When the device's scheduled cycle runs (ended-but-live leases or a waiting allocation), as a Unix time; 0 if none is scheduled.", "bdf")
	deviceTenantCycle   = desc("device_last_tenant_cycle_timestamp_seconds", "When a tenant last caused the device to cycle, as a Unix time; 0 if never (tenant cycles happen at most once per tenant_cycle_interval).", "bdf")

	subscribersDesc = desc("event_subscribers", "Open event subscriptions (WatchEvents streams).")
	laggedDesc      = desc("event_subscribers_lagged_total", "Event subscriptions ended because their reader fell too far behind (events dropped for it; it must resume from its last sequence number).")

	grpcConnsDesc       = desc("grpc_connections", "Open connections to the control socket.")
	grpcConnsLimitDesc  = desc("grpc_connections_limit", "The most connections the control socket accepts.")
	grpcTenantDesc      = desc("grpc_connections_busiest_tenant", "Open control connections of the tenant with the most.")
	grpcTenantLimitDesc = desc("grpc_connections_tenant_limit", "The most control connections one tenant may have open.")
	grpcRefusedDesc     = desc("grpc_connections_refused_total", "Control connections refused at the total or the per-tenant limit.")

	claimConnsDesc       = desc("claim_connections", "Claims being served on the claim socket.")
	claimConnsLimitDesc  = desc("claim_connections_limit", "The most claims the claim socket serves at once.")
	claimTenantDesc      = desc("claim_connections_busiest_tenant", "Claims in progress of the tenant with the most.")
	claimTenantLimitDesc = desc("claim_connections_tenant_limit", "The most claims one tenant may have in progress.")
	claimRefusedDesc     = desc("claim_connections_refused_total", "Claim connections turned away at the limits: busy (answered RESOURCE_EXHAUSTED) or dropped (hung up at once, flooded).", "how")

	dmabufFDsDesc = desc("dmabuf_fds", "Descriptors of the daemon's dma-bufs open in other processes at the last holder check, by class: holder (a live lease's fd in its holder), passed_on (in another process), ended_live (an ended lease's fd that still works until its device cycles), dead (revoked but still open), unaccounted (a vfio-pci dma-buf no lease accounts for, also in the daemon).",
		"class")
	outlastingDesc       = desc("leases_outlasting", "Ended leases whose still-working fd a process held at the last holder check (a tenant outlasting its lease until the device cycles).")
	holderCheckDesc      = desc("holder_check_timestamp_seconds", "When the last holder check (a scan of /proc/*/fdinfo) ran, as a Unix time.")
	holderCheckDurDesc   = desc("holder_check_duration_seconds", "How long the last holder check's scan of /proc took.")
	holderCheckInaccDesc = desc("holder_check_processes_inaccessible", "Processes whose descriptors the last holder check could not read (their dma-bufs are not counted).")

	fdBudgetDesc = desc("fd_budget", "The most file descriptors the configuration can need (connections, claims, leases, devices, reserve), checked against RLIMIT_NOFILE at start; compare process_open_fds and process_max_fds.")
)

// collector reports Sources at scrape time.
type collector struct{ src Sources }

func newCollector(src Sources) *collector { return &collector{src: src} }

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		leasesDesc, leasesLimitDesc, leasesInUseDesc,
		deviceUsableDesc, deviceSuspendedDesc, deviceErrorsDesc, deviceNextCycleDesc, deviceTenantCycle,
		subscribersDesc, laggedDesc,
	} {
		ch <- d
	}
	if c.src.GRPCConns != nil {
		for _, d := range []*prometheus.Desc{grpcConnsDesc, grpcConnsLimitDesc, grpcTenantDesc, grpcTenantLimitDesc, grpcRefusedDesc} {
			ch <- d
		}
	}
	if c.src.Claims != nil {
		for _, d := range []*prometheus.Desc{claimConnsDesc, claimConnsLimitDesc, claimTenantDesc, claimTenantLimitDesc, claimRefusedDesc} {
			ch <- d
		}
	}
	if c.src.FDBudget > 0 {
		ch <- fdBudgetDesc
	}
	if c.src.Holders != nil {
		for _, d := range []*prometheus.Desc{dmabufFDsDesc, outlastingDesc, holderCheckDesc, holderCheckDurDesc, holderCheckInaccDesc} {
			ch <- d
		}
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	st := c.src.Broker.Stats()
	for _, l := range leaseSeries(st) {
		gauge(leasesDesc, float64(l.n), l.bdf, l.kind, l.state)
	}
	gauge(leasesLimitDesc, float64(st.Limits.MaxLeases))
	gauge(leasesInUseDesc, float64(st.NotDead))
	for _, d := range st.Devices {
		bdf := d.Policy.BDF
		gauge(deviceUsableDesc, b2f(d.Err == nil), bdf)
		gauge(deviceSuspendedDesc, b2f(d.Suspended), bdf)
		counter(deviceErrorsDesc, float64(d.Errors), bdf)
		gauge(deviceNextCycleDesc, unixSeconds(d.CycleAt), bdf)
		gauge(deviceTenantCycle, unixSeconds(d.LastTenantCycle), bdf)
	}
	gauge(subscribersDesc, float64(st.Subscribers))
	counter(laggedDesc, float64(st.Lagged))
	if c.src.GRPCConns != nil {
		g := c.src.GRPCConns()
		gauge(grpcConnsDesc, float64(g.Open))
		gauge(grpcConnsLimitDesc, float64(g.Limit))
		gauge(grpcTenantDesc, float64(g.TenantMax))
		gauge(grpcTenantLimitDesc, float64(g.TenantLimit))
		counter(grpcRefusedDesc, float64(g.Refused))
	}
	if c.src.Claims != nil {
		s := c.src.Claims()
		gauge(claimConnsDesc, float64(s.InProgress))
		gauge(claimConnsLimitDesc, float64(s.MaxConns))
		gauge(claimTenantDesc, float64(s.TenantMax))
		gauge(claimTenantLimitDesc, float64(s.TenantLimit))
		counter(claimRefusedDesc, float64(s.Rejected), "busy")
		counter(claimRefusedDesc, float64(s.Dropped), "dropped")
	}
	if c.src.FDBudget > 0 {
		gauge(fdBudgetDesc, float64(c.src.FDBudget))
	}
	if c.src.Holders != nil {
		if r, ok := c.src.Holders(); ok {
			n := r.Counts
			for class, v := range map[string]int{"holder": n.Holder, "passed_on": n.PassedOn, "ended_live": n.EndedLive, "dead": n.Dead, "unaccounted": n.Unaccounted} {
				gauge(dmabufFDsDesc, float64(v), class)
			}
			gauge(outlastingDesc, float64(n.Outlasting))
			gauge(holderCheckDesc, unixSeconds(r.Time))
			gauge(holderCheckDurDesc, r.Duration.Seconds())
			gauge(holderCheckInaccDesc, float64(r.Inaccessible))
		}
	}
}

// leaseCount is one value of the leases gauge.
type leaseCount struct {
	bdf, kind, state string
	n                int
}

// leaseSeries returns the leases gauge's values: every configured device, kind its policy
// allows and state, 0 if none, plus any other group that has leases.
func leaseSeries(st broker.Stats) []leaseCount {
	type key struct{ bdf, kind, state string }
	counts := map[key]int{}
	var order []key
	add := func(k key, n int) {
		if _, ok := counts[k]; !ok {
			order = append(order, k)
		}
		counts[k] += n
	}
	for _, d := range st.Devices {
		for _, kind := range d.Policy.Kinds {
			for _, state := range []string{stateAllocated, stateActive, stateEndedLive} {
				add(key{d.Policy.BDF, kind.String(), state}, 0)
			}
		}
	}
	for g, n := range st.Leases {
		state := stateEndedLive
		switch g.State {
		case broker.StateAllocated:
			state = stateAllocated
		case broker.StateActive:
			state = stateActive
		}
		add(key{g.BDF, g.Kind.String(), state}, n)
	}
	out := make([]leaseCount, 0, len(order))
	for _, k := range order {
		out = append(out, leaseCount{k.bdf, k.kind, k.state, counts[k]})
	}
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unixSeconds returns t as Unix seconds, 0 for the zero time.
func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}
