package bench

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"time"
)

// Report is the outcome of a run.
type Report struct {
	Machine Machine
	// Command is the command line of the run.
	Command string
	Options RunOptions
	// Scenarios are in the order they ran.
	Scenarios []ScenarioResult
	// Scale is the scale scenario (nil: not run).
	Scale *ScaleResult
	// Limits explain the configuration's raised limits ([LimitNotes]).
	Limits []string
}

// ScenarioResult is one scenario: its daemon's configuration and its phases.
type ScenarioResult struct {
	Name    string
	Devices int
	// RevokeWithin and MaxLeases are the daemon's [limits] revoke_within and max_leases;
	// Fallback says why revoke_within is not the batching 1h with RunOptions.RevokeWithin
	// auto ("" if it is).
	RevokeWithin string
	MaxLeases    int
	Fallback     string
	// Config is the daemon's configuration file.
	Config string
	Phases []PhaseResult
	// Profile is the daemon's CPU profile file ("" if none); ProfileTop is its top.
	Profile, ProfileTop string
}

// PhaseResult is what one set of client processes measured.
type PhaseResult struct {
	Name    string
	Mode    Mode
	Clients int
	// Ops is how many operations of each kind the clients ran together.
	Ops int
	// Latencies by kind of operation.
	Broker, Floor, Revoke, Unary Summary
	// BrokerRate and FloorRate are the throughputs in operations per second
	// ([Throughput]).
	BrokerRate, FloorRate float64
	// Wall is the time from go to the last client's done.
	Wall time.Duration
	// FloorEOFs counts the floor replies read at a second recvmsg after a spurious EOF
	// (ClientResult.FloorEOFs).
	FloorEOFs int
	// Before and After sample the daemon process around the phase.
	Before, After Sample
}

// summarize fills in the latencies and rates of the clients' results.
func (pr *PhaseResult) summarize(rs []*ClientResult) {
	var b, f, rv, u []time.Duration
	var br, fr []Rate
	for _, r := range rs {
		b, f = append(b, r.Broker...), append(f, r.Floor...)
		rv, u = append(rv, r.Revoke...), append(u, r.Unary...)
		pr.FloorEOFs += r.FloorEOFs
		br = append(br, Rate{N: len(r.Broker), Busy: r.BrokerBusy})
		fr = append(fr, Rate{N: len(r.Floor), Busy: r.FloorBusy})
	}
	pr.Broker, pr.Floor, pr.Revoke, pr.Unary = Summarize(b), Summarize(f), Summarize(rv), Summarize(u)
	pr.BrokerRate, pr.FloorRate = Throughput(br), Throughput(fr)
}

// delta returns how much a sampled metric grew during the phase.
func (pr PhaseResult) delta(metric string) float64 {
	return pr.After.Metrics[metric] - pr.Before.Metrics[metric]
}

// perOp returns delta(metric) per operation of each kind.
func (pr PhaseResult) perOp(metric string) float64 {
	if pr.Ops == 0 {
		return 0
	}
	return pr.delta(metric) / float64(pr.Ops)
}

// phase returns the first phase of scenario name in mode, or nil.
func (r *Report) phase(name string, mode Mode) *PhaseResult {
	for i := range r.Scenarios {
		if r.Scenarios[i].Name != name {
			continue
		}
		for j := range r.Scenarios[i].Phases {
			if p := &r.Scenarios[i].Phases[j]; p.Mode == mode {
				return p
			}
		}
	}
	return nil
}

// Target is one of issue 10's targets and whether the run met it.
type Target struct {
	Name                   string
	Measured, Floor, Ratio string
	Goal                   string
	Met                    bool
}

// Targets returns the targets, measured.
func (r *Report) Targets() []Target {
	var ts []Target
	if p := r.phase(ScenarioSingle, ModeMixed); p != nil {
		for _, q := range []struct {
			name        string
			broker, flr time.Duration
			max         float64
		}{
			{"lease round trip, 1 client process, p50", p.Broker.P50, p.Floor.P50, 1.5},
			{"lease round trip, 1 client process, p99", p.Broker.P99, p.Floor.P99, 2},
		} {
			ratio := ratio(float64(q.broker), float64(q.flr))
			ts = append(ts, Target{Name: q.name, Measured: fmtDur(q.broker), Floor: fmtDur(q.flr),
				Ratio: fmtRatio(ratio), Goal: fmt.Sprintf("≤ %.1f× floor", q.max), Met: ratio <= q.max})
		}
	}
	if p := r.phase(ScenarioParallel, ModeMixed); p != nil {
		ratio := ratio(p.BrokerRate, p.FloorRate)
		ts = append(ts, Target{Name: fmt.Sprintf("throughput, %d client processes", p.Clients),
			Measured: fmtRate(p.BrokerRate), Floor: fmtRate(p.FloorRate), Ratio: fmtRatio(ratio),
			Goal: "≥ 0.7× floor", Met: ratio >= 0.7})
	}
	if p := r.phase(ScenarioRevoke, ModeRevoke); p != nil {
		ts = append(ts, Target{Name: "RevokeLease → dma-buf dead, p99", Measured: fmtDur(p.Revoke.P99),
			Floor: fmtDur(p.Unary.P99) + " (bare unary call)", Ratio: fmtRatio(ratio(float64(p.Revoke.P99), float64(p.Unary.P99))),
			Goal: "< 1 ms", Met: p.Revoke.P99 < time.Millisecond})
	}
	if r.Scale != nil {
		ts = append(ts, r.Scale.targets()...)
	}
	return ts
}

// Markdown writes the results table and its context.
func (r *Report) Markdown(out io.Writer) error {
	w := bufio.NewWriter(out)
	p := func(format string, a ...any) { fmt.Fprintf(w, format+"\n", a...) }
	m := r.Machine
	p("# Benchmarks: the lease round trip across processes")
	p("")
	p("Generated by `mmiobroker-bench run` (test/bench, run by `make bench`): do not edit by hand, run it again. Every broker figure stands next to its floor, measured in the same run against the same daemon process, interleaved with it so that both saw the same machine load, and their ratio. [How it measures](#method) is at the end. Where the time goes and why targets are missed: [performance.md](performance.md); the same lease on the real kernel in the VM, next to a VMM exporting the dma-buf itself: [benchmarks-vm.md](benchmarks-vm.md).")
	p("")
	p("- Date: %s", m.Date.Format("2006-01-02 15:04 UTC"))
	p("- Machine: %d CPUs (%s), Linux %s, %s", m.CPUs, orDash(m.CPU), orDash(m.Kernel), m.GoVersion)
	tmp := "not a tmpfs"
	if m.TmpFS {
		tmp = "a tmpfs, like mmiobrokerd's /run"
	}
	p("- Sockets and lease journal: %s (%s)", "`"+m.Dir+"`", tmp)
	p("- Command: `%s`", r.Command)
	p("")

	p("## Targets (issue 10)")
	p("")
	p("| target | broker | floor | ratio | goal | met |")
	p("|---|---:|---:|---:|---|---|")
	for _, t := range r.Targets() {
		p("| %s | %s | %s | %s | %s | %s |", t.Name, t.Measured, t.Floor, t.Ratio, t.Goal, yesNo(t.Met))
	}
	p("")

	for _, sc := range r.Scenarios {
		for _, ph := range sc.Phases {
			switch ph.Mode {
			case ModeMixed:
				p("## Lease round trip, %s", ph.Name)
				p("")
				p("%d lease round trips and %d floor round trips, interleaved, in %s; daemon with %s, revoke_within %s.", ph.Ops, ph.Ops, fmtWall(ph.Wall), plural(sc.Devices, "fake device"), sc.RevokeWithin)
				p("")
				latencyTable(p, "lease round trip", "floor", ph.Broker, ph.Floor)
				p("| throughput | %s | %s | %s |", fmtRate(ph.BrokerRate), fmtRate(ph.FloorRate), fmtRatio(ratio(ph.BrokerRate, ph.FloorRate)))
				p("")
				if ph.FloorEOFs > 0 {
					p("Floor replies read at a second recvmsg after a spurious EOF ([a kernel race](#a-kernel-race-spurious-eof-on-seqpacket)): %d.", ph.FloorEOFs)
					p("")
				}
			case ModeRevoke:
				p("## RevokeLease until the dma-buf is dead")
				p("")
				p("%d revocations of a claimed lease (an administrator's RevokeLease; it answers once the lease's dma-buf is dead: the fake device cycled), interleaved with %d bare unary calls, in %s.", ph.Ops, ph.Ops, fmtWall(ph.Wall))
				p("")
				latencyTable(p, "RevokeLease", "floor: bare unary call", ph.Revoke, ph.Unary)
				p("")
			}
		}
	}

	if r.Scale != nil {
		r.Scale.markdown(p)
	}

	if len(r.Scenarios) > 0 {
		p("## Daemon process")
		p("")
		p("Sampled before the clients start and after the last one is done (all still connected): RSS from /proc/PID/status, open fds (process_open_fds) and allocations (go_memstats_mallocs_total, go_memstats_alloc_bytes_total) from the daemon's metrics socket. The floor runs in the same process, so allocations per operation of a mixed phase count a lease round trip and a floor round trip; the allocation phases run each kind alone.")
		p("")
		p("| scenario | phase | RSS before | RSS after | peak RSS | open fds before | after | allocs / op | bytes / op | device cycles | claims refused |")
		p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, sc := range r.Scenarios {
			for _, ph := range sc.Phases {
				p("| %s | %s | %s | %s | %s | %.0f | %.0f | %.0f | %s | %.0f | %.0f |", sc.Name, ph.Name, fmtBytes(ph.Before.RSS), fmtBytes(ph.After.RSS), fmtBytes(ph.After.HWM),
					ph.Before.Metrics[metricOpenFDs], ph.After.Metrics[metricOpenFDs],
					ph.perOp(metricMallocs), fmtBytes(uint64(ph.perOp(metricAllocBytes))), ph.delta(metricCycles), ph.delta(metricClaimRefused))
			}
		}
		p("")
		if b, f := r.phase(ScenarioAllocs, ModeBroker), r.phase(ScenarioAllocs, ModeFloor); b != nil && f != nil {
			p("Per round trip alone (%d of each): the lease round trip allocates %.0f objects and %s in the daemon, %s the floor's %.0f objects and %s its %s.",
				b.Ops, b.perOp(metricMallocs), fmtBytes(uint64(b.perOp(metricAllocBytes))),
				fmtRatio(ratio(b.perOp(metricMallocs), f.perOp(metricMallocs))), f.perOp(metricMallocs),
				fmtRatio(ratio(b.perOp(metricAllocBytes), f.perOp(metricAllocBytes))), fmtBytes(uint64(f.perOp(metricAllocBytes))))
			p("")
		}

		p("## Configuration")
		p("")
		fdStore := fmt.Sprintf("with an fd store of %d fds (FileDescriptorStoreMax=, as deploy/mmiobrokerd.service), so that the daemon keeps its leases across restarts and runs its lease journal, as deployed", r.Options.FDStore)
		if r.Options.FDStore == 0 {
			fdStore = "without an fd store, so the daemon runs without its lease journal (not as deployed)"
		}
		p("Each scenario runs its own daemon process: `mmiobroker-bench daemon`, which runs the daemon as mmiobrokerd does (daemon.Run with its configuration file, logging at the configured level to its stderr, a pipe the orchestrator reads like journald) on fake devices (internal/broker/brokertest: memfds for dma-bufs, a device cycle is a generation counter), under a fake systemd (internal/systemd/systemdtest: $NOTIFY_SOCKET, READY=1, STOPPING=1) %s.", fdStore)
		p("")
		p("| scenario | fake devices | revoke_within | max_leases |")
		p("|---|---:|---:|---:|")
		for _, sc := range r.Scenarios {
			p("| %s | %d | %s | %d |", sc.Name, sc.Devices, sc.RevokeWithin, sc.MaxLeases)
		}
		p("")
		for _, sc := range r.Scenarios {
			if sc.Fallback != "" {
				p("The %s scenario runs with revoke_within %s: the daemon refused the batching configuration (%s): %s", sc.Name, sc.RevokeWithin, revokeBatched, sc.Fallback)
				p("")
			}
		}
		p("Limits raised, and why:")
		p("")
		for _, l := range r.Limits {
			p("- %s", l)
		}
		p("")
		for _, sc := range r.Scenarios {
			if sc.Name == ScenarioSingle {
				p("The configuration file of the %s scenario (the others differ in their devices, revoke_within and max_leases):", sc.Name)
				p("")
				fenced(p, "toml", sc.Config)
			}
		}
	}

	var profiled bool
	for _, sc := range r.Scenarios {
		if sc.ProfileTop == "" {
			continue
		}
		if !profiled {
			p("## CPU profiles of the daemon process")
			p("")
			p("The daemon's goroutines carry the profile label role=daemon and the floor's role=floor. The first listing is the top by own time with the floor left out (the runtime's unlabelled work, such as the garbage collector, stays in); the second the top by cumulative time of the daemon's goroutines alone.")
			p("")
			profiled = true
		}
		p("### Scenario %s", sc.Name)
		p("")
		p("Profile: `%s`", sc.Profile)
		p("")
		fenced(p, "", sc.ProfileTop)
	}

	p("## Method")
	p("")
	p("- A lease round trip is what a VMM does with the client library (client.Client.Allocate): AllocateLease over gRPC on the control socket, then the claim on the claim socket (a SOCK_SEQPACKET connection, request, reply with the dma-buf fd by SCM_RIGHTS) until the fd is in hand. That is its latency. The fd is then closed and the lease released (ReleaseLease), which counts for the throughput, not for the latency.")
	p("- Its floor is the same IPC with no broker behind it, served by the same daemon process: one unary gRPC call (the standard health service on a bare grpc.Server, its own unix socket), a dial of a second unix socket (SOCK_SEQPACKET), a 32-byte request, and a reply of a claim reply's size carrying one fd (a dup of a memfd) by SCM_RIGHTS. That is its latency; one more unary call stands for the release.")
	p("- Each client process alternates the two (BF FB BF …) after %d warm-up operations of each kind, which are not recorded, and all client processes of a phase start together.", r.Options.Warmup)
	p("- Percentiles are nearest-rank over every operation of the phase. Throughput is the sum over client processes of each one's operations divided by the time its operations of that kind took, releases included: the rate every client would run that kind at alone under the same load.")
	p("- Revocation: a lease is allocated and claimed (not timed), then an administrator's RevokeLease is timed until its response, which comes once the lease's dma-buf is dead (the fake device's cycle; on real hardware the VFIO device cycle costs more). Its floor is one bare unary call.")
	p("- A run fails, and writes no table, if any operation fails, any process fails or any count is off; it never fails on speed.")
	p("")
	p("### A kernel race: spurious EOF on SEQPACKET")
	p("")
	p("A client's recvmsg on a non-blocking SOCK_SEQPACKET socket (Go's sockets are) can report EOF although the server queued its reply, if the server sent and closed while recvmsg ran: unix_dgram_recvmsg finds the queue empty, then sees RCV_SHUTDOWN and returns 0 without looking at the queue again. The reply is still there for the next recvmsg. The floor's client reads again after an EOF and counts it (once in about 50,000 floor round trips on this machine, where the bare server answers within microseconds); the claim socket's client (fdpass.ClaimConn, used by the client library) reads once more after an end of file too, so such a claim gets its reply.")
	return w.Flush()
}

// fenced writes text as a fenced code block of language lang ("" for none), then a
// blank line.
func fenced(p func(string, ...any), lang, text string) {
	p("```%s", lang)
	p("%s", strings.TrimRight(text, "\n"))
	p("```")
	p("")
}

// latencyTable writes the percentile rows of a broker figure and its floor.
func latencyTable(p func(string, ...any), what, floor string, b, f Summary) {
	p("| | %s | %s | ratio |", what, floor)
	p("|---|---:|---:|---:|")
	for _, row := range []struct {
		name string
		b, f time.Duration
	}{{"p50", b.P50, f.P50}, {"p90", b.P90, f.P90}, {"p99", b.P99, f.P99}, {"p99.9", b.P999, f.P999}, {"mean", b.Mean, f.Mean}, {"max", b.Max, f.Max}} {
		p("| %s | %s | %s | %s |", row.name, fmtDur(row.b), fmtDur(row.f), fmtRatio(ratio(float64(row.b), float64(row.f))))
	}
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func fmtDur(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%.1f µs", float64(d)/float64(time.Microsecond))
	}
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

func fmtWall(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }

func fmtRatio(r float64) string { return fmt.Sprintf("%.2f×", r) }

func fmtRate(r float64) string { return fmt.Sprintf("%.0f /s", r) }

func fmtBytes(n uint64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "**no**"
}

// plural returns "1 thing" or "n things".
func plural(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
