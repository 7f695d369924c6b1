package bench

import (
	"fmt"
	"strings"
	"time"
)

// Metrics the scale scenario reads besides the others.
const (
	metricHeapInuse = "go_memstats_heap_inuse_bytes"
	metricHeapAlloc = "go_memstats_heap_alloc_bytes"
	metricHeapIdle  = "go_memstats_heap_idle_bytes"
	metricHeapFreed = "go_memstats_heap_released_bytes"
	metricLeases    = "mmiobroker_leases"
	metricReissues  = "mmiobroker_lease_reissues_total"
	metricCPU       = "process_cpu_seconds_total"
)

// Goals of the scale scenario (the issue's).
const (
	goalRSS      = 200e6 // bytes, at the top level
	goalListP99  = 50 * time.Millisecond
	goalRestart  = time.Second
	goalFlatRise = 0.25 // the fitted p50's rise over the levels, relative to its value at the lowest
	goalRateMade = 0.9  // of the target rate, for the event stream target
)

// Slope is a least-squares line of a latency's p50 against the number of leases.
type Slope struct {
	// Per10k is the slope: how much the p50 grows per 10,000 leases.
	Per10k time.Duration
	// From and To are the fitted p50 at the lowest and the highest level; Rise is
	// (To-From)/From.
	From, To time.Duration
	Rise     float64
	// OK is false if there were fewer than two levels.
	OK bool
}

// fitSlope fits p50 (as pick returns it) against the number of leases over levels.
func fitSlope(levels []ScaleLevel, pick func(ScaleLevel) time.Duration) Slope {
	var xs, ys []float64
	for _, lv := range levels {
		xs = append(xs, float64(lv.Leases))
		ys = append(ys, float64(pick(lv)))
	}
	slope, icpt, ok := FitLine(xs, ys)
	if !ok {
		return Slope{}
	}
	lo, hi := xs[0], xs[len(xs)-1]
	s := Slope{Per10k: time.Duration(slope * 1e4), From: time.Duration(icpt + slope*lo), To: time.Duration(icpt + slope*hi), OK: true}
	if s.From > 0 {
		s.Rise = float64(s.To-s.From) / float64(s.From)
	}
	return s
}

// String writes the slope as "+1.2 µs per 10k leases (+3% from 1,000 to 100,000)".
func (s Slope) String() string {
	if !s.OK {
		return "-"
	}
	return fmt.Sprintf("%s per 10k leases (%+.0f%%)", fmtSigned(s.Per10k), 100*s.Rise)
}

// top returns the highest level (nil if none).
func (sr *ScaleResult) top() *ScaleLevel {
	if len(sr.Levels) == 0 {
		return nil
	}
	return &sr.Levels[len(sr.Levels)-1]
}

// scaleTargets returns the scale scenario's rows of the targets table.
func (sr *ScaleResult) targets() []Target {
	top := sr.top()
	if top == nil {
		return nil
	}
	n := fmtCount(top.Leases)
	dash := "-"
	ts := []Target{
		{Name: "scale: daemon RSS, " + n + " live leases", Measured: fmtMB(top.Sample.RSS), Floor: dash, Ratio: dash,
			Goal: "< 200 MB", Met: float64(top.Sample.RSS) < goalRSS},
	}
	if len(sr.Lists) > 0 {
		l := sr.Lists[0]
		ts = append(ts, Target{Name: fmt.Sprintf("scale: ListLeases p99 per page (page_size 1000), %s leases", fmtCount(l.Leases)),
			Measured: fmtDur(l.Lat.P99), Floor: dash, Ratio: dash, Goal: "< 50 ms", Met: l.Lat.P99 < goalListP99})
	}
	for _, k := range []struct {
		name string
		pick func(ScaleLevel) time.Duration
	}{
		{"GetLease", func(lv ScaleLevel) time.Duration { return lv.Get.P50 }},
		{"AllocateLease + claim", func(lv ScaleLevel) time.Duration { return lv.Alloc.P50 }},
	} {
		s := fitSlope(sr.Levels, k.pick)
		ts = append(ts, Target{Name: fmt.Sprintf("scale: %s p50, slope over %s to %s leases", k.name, fmtCount(sr.Levels[0].Leases), n),
			Measured: s.String(), Floor: dash, Ratio: dash, Goal: "flat: the fit rises ≤ 25%", Met: s.OK && s.Rise <= goalFlatRise})
	}
	if w := sr.Watch; w != nil && len(w.Steps) > 0 {
		first := w.Steps[0]
		m := fmt.Sprintf("%.0f events/s made, %d of %d cut, %d events missing", first.Achieved, first.Report.Cut, first.Report.Streams, first.Report.Missing)
		if last := w.Steps[len(w.Steps)-1]; len(w.Steps) > 1 && !last.Drops() {
			m += fmt.Sprintf("; no drops at %d events/s", last.Rate)
		}
		ts = append(ts, Target{Name: fmt.Sprintf("scale: WatchEvents, %s subscribers at %s events/s", fmtCount(w.Subscribers), fmtCount(first.Rate)),
			Measured: m, Floor: dash, Ratio: dash, Goal: "no drops",
			Met: !first.Drops() && first.Achieved >= goalRateMade*float64(first.Rate)})
	}
	if r := sr.Restart; r != nil {
		ts = append(ts, Target{Name: fmt.Sprintf("scale: restart with %s leases, journal replayed (start → leases restored)", fmtCount(r.Leases)),
			Measured: fmtSecs(r.Restored), Floor: dash, Ratio: dash, Goal: "< 1 s", Met: r.Restored >= 0 && r.Restored < goalRestart})
	}
	return ts
}

// markdown writes the scale scenario's section.
func (sr *ScaleResult) markdown(p func(string, ...any)) {
	top := sr.top()
	if top == nil {
		return
	}
	p("## Scale: %s live leases", fmtCount(top.Leases))
	p("")
	uids := fmt.Sprintf("%d uids (%d–%d)", len(sr.UIDs), sr.UIDs[0], sr.UIDs[len(sr.UIDs)-1])
	if len(sr.UIDs) == 1 {
		uids = fmt.Sprintf("one uid (%d: %s)", sr.UIDs[0], sr.UIDsNote)
	}
	p("%s live leases on %s (and a spare device without leases), held by %d holder processes running as %s, each holding its leases' fds (RLIMIT_NOFILE, %d here, bounds a process's fds). Every lease is one 4 KiB page of a device's 16 MiB BAR 4, so that leases of different tenants (uids) never overlap. The daemon runs as deployed (lease journal and fd store), with revoke_within %s and max_leases = max_leases_per_holder = %d. The holders fill up level by level; at each level, with the holders idle, an administrator's process (the orchestrator, root) samples the daemon, walks ListLeases, and times GetLease of random live leases and AllocateLease + claim (%d of each after %d unrecorded).",
		fmtCount(top.Leases), plural(sr.Devices, "fake device"), sr.Procs, uids, sr.RealFDLimit, sr.RevokeWithin, sr.MaxLeases, sr.Probes, sr.Warmup)
	p("")
	p("The machine's load average (1, 5, 15 minutes) was %s when the scenario started and %s when it ended (%d CPUs, shared with whatever else runs).", sr.LoadBefore, sr.LoadAfter, sr.CPUs)
	p("")
	p("### Cost by number of leases")
	p("")
	p("| live leases | fill (all holders together) | fill round trip p50 / p99 | daemon RSS | Go heap in use | open fds | ListLeases page p50 / p99 | GetLease p50 / p99 | AllocateLease + claim p50 / p99 | the same on the spare device p50 / p99 |")
	p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, lv := range sr.Levels {
		p("| %s | %s in %s (%s) | %s / %s | %s | %s | %.0f | %s / %s | %s / %s | %s / %s | %s / %s |", fmtCount(lv.Leases),
			fmtCount(lv.FillAdded), fmtWall(lv.FillWall), fmtRate(float64(lv.FillAdded)/lv.FillWall.Seconds()),
			fmtDur(lv.Fill.P50), fmtDur(lv.Fill.P99), fmtBytes(lv.Sample.RSS), fmtBytes(uint64(lv.Sample.Metrics[metricHeapInuse])),
			lv.Sample.Metrics[metricOpenFDs], fmtDur(lv.List.P50), fmtDur(lv.List.P99), fmtDur(lv.Get.P50), fmtDur(lv.Get.P99),
			fmtDur(lv.Alloc.P50), fmtDur(lv.Alloc.P99), fmtDur(lv.Spare.P50), fmtDur(lv.Spare.P99))
	}
	p("")
	p("AllocateLease + claim is timed on the devices that hold the leases (about %s each at the top level) and on a spare device that holds none (its released probe leases aside), to tell what grows with the leases of the device from what grows with the daemon's.", fmtCount(top.Leases/max(sr.Devices, 1)))
	p("")
	p("Slopes, a least-squares fit of the p50 against the number of live leases over the %d levels (the rise is the fit's, from the lowest level to the highest):", len(sr.Levels))
	p("")
	for _, k := range []struct {
		name string
		pick func(ScaleLevel) time.Duration
	}{
		{"GetLease", func(lv ScaleLevel) time.Duration { return lv.Get.P50 }},
		{"AllocateLease + claim", func(lv ScaleLevel) time.Duration { return lv.Alloc.P50 }},
		{"AllocateLease + claim on the spare device", func(lv ScaleLevel) time.Duration { return lv.Spare.P50 }},
		{"ListLeases page", func(lv ScaleLevel) time.Duration { return lv.List.P50 }},
	} {
		s := fitSlope(sr.Levels, k.pick)
		if s.OK {
			p("- %s: %s per 10,000 leases, from %s to %s (%+.0f%%).", k.name, fmtSigned(s.Per10k), fmtDur(s.From), fmtDur(s.To), 100*s.Rise)
		}
	}
	p("")

	p("### Per lease")
	p("")
	n := float64(top.Leases)
	base, at := sr.Base, top.Sample
	p("| | no leases | %s leases | per lease |", fmtCount(top.Leases))
	p("|---|---:|---:|---:|")
	for _, row := range []struct {
		name     string
		from, to float64
		bytes    bool
	}{
		{"daemon RSS (VmRSS)", float64(base.RSS), float64(at.RSS), true},
		{"Go heap in use (go_memstats_heap_inuse_bytes)", base.Metrics[metricHeapInuse], at.Metrics[metricHeapInuse], true},
		{"Go heap allocated, live and garbage (go_memstats_heap_alloc_bytes)", base.Metrics[metricHeapAlloc], at.Metrics[metricHeapAlloc], true},
		{"Go heap free but kept from the OS (heap_idle − heap_released)", base.Metrics[metricHeapIdle] - base.Metrics[metricHeapFreed], at.Metrics[metricHeapIdle] - at.Metrics[metricHeapFreed], true},
		{"open fds (process_open_fds)", base.Metrics[metricOpenFDs], at.Metrics[metricOpenFDs], false},
		{"lease journal file", 0, float64(sr.JournalBytes), true},
	} {
		if row.bytes {
			p("| %s | %s | %s | %.0f B |", row.name, fmtBytes(uint64(row.from)), fmtBytes(uint64(row.to)), (row.to-row.from)/n)
		} else {
			p("| %s | %.0f | %.0f | %.4f |", row.name, row.from, row.to, (row.to-row.from)/n)
		}
	}
	p("")
	p("Peak RSS (VmHWM) by then: %s. A claimed lease holds no fd in the daemon: the open fds are its listeners, metrics and journal, two per control connection (the socket and the caller's pidfd) and two per holder process (its pidfd pin and the dup its exit watcher waits on), not per lease. The journal's size is the bbolt file's, which grows in steps (doubling up to 1 GiB).", fmtBytes(at.HWM))
	p("")

	if len(sr.Lists) > 0 {
		p("### ListLeases at %s leases", fmtCount(top.Leases))
		p("")
		p("Walks with page_size 1000 (AIP-158: next_page_token until none) by an administrator; a filter is the same on every page. Without live_only the list also has the ended leases the daemon still keeps (the probes' released leases, ended-but-live with revoke_within %s, and the last 1024 ended ones).", sr.RevokeWithin)
		p("")
		p("| walk | calls | leases listed | call p50 | call p99 | call max | whole walk |")
		p("|---|---:|---:|---:|---:|---:|---:|")
		for _, l := range sr.Lists {
			p("| %s | %d | %s | %s | %s | %s | %s |", l.Name, l.Calls, fmtCount(l.Leases), fmtDur(l.Lat.P50), fmtDur(l.Lat.P99), fmtDur(l.Lat.Max), fmtWall(l.Wall))
		}
		p("")
	}

	if w := sr.Watch; w != nil && len(w.Steps) > 0 {
		p("### WatchEvents: %s subscribers", fmtCount(w.Subscribers))
		p("")
		p("%s event streams of an administrator (root: admins have no limit of streams; a tenant may open 16, so %s subscribers of tenants would take %d tenants) in %s over %s (the daemon serves at most 64 concurrent RPCs per connection), each counted from its subscription (its response headers). A producer in the orchestrator renews random live leases (an administrator's RenewLease, one RENEWED event each) at the target rate for %s, up to %d calls in flight (a call due while all of them still wait for the daemon is skipped, not made up later: the daemon sets the pace it can take); every subscriber sees every event. Then each stream reads up to the last event. A stream that falls more than 256 events behind is cut by the daemon (RESOURCE_EXHAUSTED) and misses the rest; missing counts the events the streams did not receive. Latency is from the event's time (the daemon stamps it when it emits the event, before its journal commit) to its receipt. If subscribers lost events the rate is halved and the step run again (at most %d steps).",
			fmtCount(w.Subscribers), fmtCount(w.Subscribers), (w.Subscribers+15)/16, strings.Replace(plural(w.Procs, "watcher process"), "processs", "processes", 1), plural(w.Conns, "connection"), fmtWall(w.Steps[0].Elapsed), renewers, rateSteps)
		p("")
		p("| target rate | events | made /s | calls skipped | deliveries /s | streams completed | cut | events missing | latency p50 | latency p99 | latency p99.9 | latency max | daemon RSS | open fds | CPU: daemon / watchers |")
		p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, st := range w.Steps {
			p("| %s /s | %s | %.0f | %s | %.0f | %d of %d | %d | %s | %s | %s | %s | %s | %s | %.0f | %.1f s / %.1f s |", fmtCount(st.Rate), fmtCount(int(st.Events)), st.Achieved,
				fmtCount(st.Skipped), float64(st.Report.Received)/st.Elapsed.Seconds(), st.Report.Completed, st.Report.Streams, st.Report.Cut, fmtCount(int(st.Report.Missing)),
				fmtDur(st.Latency.P50), fmtDur(st.Latency.P99), fmtDur(st.Latency.P999), fmtDur(st.Latency.Max), fmtBytes(st.Sample.RSS), st.Sample.Metrics[metricOpenFDs],
				st.DaemonCPU.Seconds(), st.WatcherCPU.Seconds())
		}
		p("")
		p("CPU is the CPU time the daemon process used while the producer ran (process_cpu_seconds_total) and the watcher processes used from their streams' opening to their last event (getrusage), out of %d CPUs shared with the rest of the machine: the subscribers' own processes compete with the daemon for them.", sr.CPUs)
		p("")
	}

	p("### Restart with %s leases", fmtCount(top.Leases))
	p("")
	if r := sr.Restart; r != nil {
		p("The daemon is stopped as systemd stops it (SIGTERM, on_stop keep: no lease ends, the fake devices' markers stay in the fake systemd's fd store) and a new daemon process started on the same journal, with the fd store's fds passed as systemd passes them (LISTEN_FDS), while every holder process keeps running (holders are re-pinned by pid and start time). Times are from the new process's start; the log's are its lines' millisecond timestamps.")
		p("")
		p("| | |")
		p("|---|---:|")
		p("| live leases before the stop | %s |", fmtCount(r.Leases))
		p("| lease journal | %s (%.0f B per lease) |", fmtBytes(uint64(r.JournalBytes)), float64(r.JournalBytes)/float64(max(r.Leases, 1)))
		p("| stop: SIGTERM until the old process exited (with its profiles written, if profiled) | %s |", fmtSecs(r.Stop))
		p("| start → journal loaded (log: leases are kept across restarts) | %s |", fmtSecs(r.Loaded))
		p("| start → every lease taken back, holders re-pinned (log: leases restored) | %s |", fmtSecs(r.Restored))
		p("| start → serving (log) | %s |", fmtSecs(r.Serving))
		p("| start → READY=1 | %s |", fmtSecs(r.Ready))
		p("| live leases after the restart | %s |", fmtCount(r.LiveAfter))
		p("| holder processes whose leases all came back | %d of %d |", r.HoldersMatched, sr.Procs)
		p("| events the restart emitted (reissues, ends) | %d |", r.SeqAfter-r.SeqBefore)
		p("| daemon RSS after the restart | %s |", fmtBytes(r.After.RSS))
		p("")
		if r.RestoredLine != "" {
			p("The new daemon's log line: `%s`", strings.TrimSpace(r.RestoredLine))
			p("")
		}
	} else {
		p("Not run: %s.", sr.RestartNote)
		p("")
	}

	p("### How the scale scenario runs")
	p("")
	p("- The daemon's start-up check of its fd budget is told RLIMIT_NOFILE is %s (daemon.Options.FDLimit; the real limit, %s, is unchanged). The check counts three fds for every lease up to max_leases (the daemon's dma-buf copy, the holder's pidfd, its waiter's dup), the worst case of a device cycle reissuing every lease at once, and would refuse max_leases %s under the real limit. A claimed lease holds no fd in the daemon (it closes its copy and the fd store's once the claim is delivered) and a holder process costs two however many leases it holds, so the scenario measures the daemon's real open fds instead (the tables above); a daemon that ran out of fds would fail the run.", fmtCount(int(sr.FDLimit)), fmtCount(int(sr.RealFDLimit)), fmtCount(sr.MaxLeases))
	p("- The fake devices (test/bench's keptDevice) export memfds, as internal/broker/brokertest's do, but keep nothing per buffer, so the daemon's memory per lease is its own; and each keeps a marker memfd in the fd store, as a real device keeps its VFIO fd there, so that the restarted daemon finds the device kept open and takes its leases back as they were. Their device cycle does nothing; the scenario never cycles a device with leases on it.")
	p("- revoke_within is %s so that a probe's release leaves its lease ended-but-live (it counts, and ListLeases without live_only lists it) instead of cycling its device, which would reissue the other leases of the device to holders that do not watch for it.", sr.RevokeWithin)
	p("- The holders are tenants (uid=N: they run in no VM cgroup); the orchestrator and the watchers, root, are administrators. Holders of different uids may not share pages, hence one page per lease and at most 4096 leases per device.")
	p("")
	p("The scale daemon's configuration (its %d devices alike):", sr.Devices)
	p("")
	cfg := sr.Config
	if i := strings.Index(cfg, "\n[[device]]"); i >= 0 {
		if j := strings.Index(cfg[i+1:], "\n[[device]]"); j >= 0 {
			cfg = cfg[:i+1+j] + "\n# … one [[device]] table per fake device"
		}
	}
	fenced(p, "toml", cfg)
	if sr.ProfileTop != "" || sr.MemProfileTop != "" || sr.RestartProfileTop != "" {
		p("### Profiles of the scale daemon")
		p("")
		if sr.ProfileTop != "" {
			p("CPU profile of the first daemon process, from its start to its stop before the restart: `%s`", sr.Profile)
			p("")
			fenced(p, "", sr.ProfileTop)
		}
		if sr.MemProfileTop != "" {
			p("Heap profile of the same process when it was told to stop (before the daemon began its stop), after a garbage collection, with every lease: the bytes in use, sampled every 64 KiB allocated. `%s`", sr.MemProfile)
			p("")
			fenced(p, "", sr.MemProfileTop)
		}
		if sr.RestartProfileTop != "" {
			p("CPU profile of the restarted daemon process, from its start (journal replay included) to its stop: `%s`", sr.RestartProfile)
			p("")
			fenced(p, "", sr.RestartProfileTop)
		}
	}
}

// fmtCount writes n with thousands separators: 100,000.
func fmtCount(n int) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// fmtMB writes bytes as decimal megabytes, the unit of the goal.
func fmtMB(n uint64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }

// fmtSecs writes a duration in seconds; a negative one is unknown.
func fmtSecs(d time.Duration) string {
	if d < 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f s", d.Seconds())
}

// fmtSigned writes a duration with its sign, as fmtDur does.
func fmtSigned(d time.Duration) string {
	if d < 0 {
		return "-" + fmtDur(-d)
	}
	return "+" + fmtDur(d)
}
