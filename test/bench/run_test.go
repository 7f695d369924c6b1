package bench

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// tinyRun is a run of a few operations, its processes this test binary (see TestMain).
func tinyRun(t *testing.T, child string) RunOptions {
	t.Helper()
	base := testutil.ShortTempDir(t)
	// Let the scale scenario's holder processes, other uids when root, reach the sockets.
	if err := os.Chmod(base, 0o711); err != nil {
		t.Fatal(err)
	}
	return RunOptions{
		Ops: 24, Clients: 3, Revokes: 8, AllocOps: 8, Warmup: 2, RevokeWithin: revokeAuto, FDStore: 4096,
		Scale:   ScaleOptions{Leases: 40, Devices: 4, UIDs: 2, PerProcess: 15, Probes: 3, Watchers: 3, Rate: 200, Stream: 300 * time.Millisecond},
		BaseDir: base, Exe: []string{os.Args[0]},
		// A race-enabled process sleeps a second before it exits unless told not to.
		Env:     []string{childEnvKey + "=" + child, "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")},
		Command: "tiny",
	}
}

// TestRun runs every scenario with a few operations through real processes and checks
// the counts and that the table has every row.
func TestRun(t *testing.T) {
	o := tinyRun(t, "1")
	var progress bytes.Buffer
	o.Progress = &progress
	rep, err := Run(context.Background(), o)
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	want := map[string][]struct {
		mode    Mode
		clients int
		ops     int
	}{
		ScenarioSingle:   {{ModeMixed, 1, 24}},
		ScenarioParallel: {{ModeMixed, 3, 24}},
		ScenarioRevoke:   {{ModeRevoke, 1, 8}},
		ScenarioAllocs:   {{ModeBroker, 1, 8}, {ModeFloor, 1, 8}},
	}
	if len(rep.Scenarios) != len(want) {
		t.Fatalf("%d scenarios, want %d", len(rep.Scenarios), len(want))
	}
	for _, sc := range rep.Scenarios {
		phases := want[sc.Name]
		if len(sc.Phases) != len(phases) {
			t.Fatalf("scenario %s: %d phases, want %d", sc.Name, len(sc.Phases), len(phases))
		}
		if sc.RevokeWithin != revokeBatched || sc.Fallback != "" {
			t.Errorf("scenario %s: revoke_within %s (%q), want %s: the tiny run's fds fit", sc.Name, sc.RevokeWithin, sc.Fallback, revokeBatched)
		}
		for i, ph := range sc.Phases {
			w := phases[i]
			if ph.Mode != w.mode || ph.Clients != w.clients || ph.Ops != w.ops {
				t.Errorf("scenario %s phase %d: %s, %d clients, %d ops; want %s, %d, %d", sc.Name, i, ph.Mode, ph.Clients, ph.Ops, w.mode, w.clients, w.ops)
			}
			counts := map[Mode][4]int{
				ModeMixed: {w.ops, w.ops, 0, 0}, ModeBroker: {w.ops, 0, 0, 0},
				ModeFloor: {0, w.ops, 0, 0}, ModeRevoke: {0, 0, w.ops, w.ops},
			}[w.mode]
			if got := [4]int{ph.Broker.N, ph.Floor.N, ph.Revoke.N, ph.Unary.N}; got != counts {
				t.Errorf("scenario %s phase %d: samples (broker, floor, revoke, unary) %v, want %v", sc.Name, i, got, counts)
			}
			if ph.After.RSS == 0 || ph.After.Metrics[metricMallocs] <= ph.Before.Metrics[metricMallocs] {
				t.Errorf("scenario %s phase %d: daemon samples before %+v, after %+v", sc.Name, i, ph.Before, ph.After)
			}
		}
	}
	if got := rep.phase(ScenarioRevoke, ModeRevoke).delta(metricCycles); got != 8 {
		t.Errorf("revoke scenario: %v device cycles, want 8 (one per revocation)", got)
	}
	var md bytes.Buffer
	if err := rep.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	checkTable(t, md.String(), 3)
	if len(rep.Targets()) != 10 {
		t.Errorf("targets %+v, want 10", rep.Targets())
	}
	checkScale(t, rep.Scale, o.Scale)
	if !strings.Contains(md.String(), "## Scale: 40 live leases") {
		t.Error("table lacks the scale section")
	}
}

// checkScale checks the counts of a scale scenario run with so.
func checkScale(t *testing.T, sr *ScaleResult, so ScaleOptions) {
	t.Helper()
	if sr == nil {
		t.Fatal("no scale result")
	}
	if got, want := len(sr.Levels), len(scaleLevels(so.Leases)); got != want {
		t.Fatalf("%d levels, want %d", got, want)
	}
	for _, lv := range sr.Levels {
		if lv.Get.N != so.Probes || lv.Alloc.N != so.Probes || lv.Spare.N != so.Probes || lv.Pages < 1 || lv.Sample.RSS == 0 || lv.Fill.N != lv.FillAdded {
			t.Errorf("level %d: %d GetLease, %d AllocateLease samples, %d pages, %d fill samples of %d; RSS %d",
				lv.Leases, lv.Get.N, lv.Alloc.N, lv.Pages, lv.Fill.N, lv.FillAdded, lv.Sample.RSS)
		}
	}
	if wantUIDs := so.UIDs; os.Geteuid() == 0 && len(sr.UIDs) != wantUIDs {
		t.Errorf("uids %v (%s), want %d as root", sr.UIDs, sr.UIDsNote, wantUIDs)
	}
	if len(sr.Lists) != 4 || sr.Lists[1].Leases != so.Leases {
		t.Errorf("list walks %+v, want 4, the live_only one listing %d", sr.Lists, so.Leases)
	}
	if w := sr.Watch; w == nil || len(w.Steps) != 1 || w.Steps[0].Drops() || w.Steps[0].Report.Streams != so.Watchers ||
		w.Steps[0].Report.Received != uint64(so.Watchers)*w.Steps[0].Events || w.Steps[0].Events == 0 {
		t.Errorf("watch: %+v", w)
	}
	r := sr.Restart
	if r == nil || r.Leases != so.Leases || r.LiveAfter != so.Leases || r.HoldersMatched != sr.Procs || r.SeqAfter != r.SeqBefore || r.Restored <= 0 || r.Ready <= 0 {
		t.Errorf("restart: %+v", r)
	}
}

// TestRunFails: a client process that fails fails the run, with its reason.
func TestRunFails(t *testing.T) {
	_, err := Run(context.Background(), tinyRun(t, "fail"))
	if err == nil || !strings.Contains(err.Error(), "client failing on purpose") || !strings.Contains(err.Error(), "scenario single") {
		t.Fatalf("Run with failing clients: %v, want the client's reason", err)
	}
}

// TestRunDaemonFails: a daemon that refuses its configuration fails the run, with the
// daemon's reason.
func TestRunDaemonFails(t *testing.T) {
	o := tinyRun(t, "1")
	o.TenantsBy = "nobody"
	_, err := Run(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "exited before READY=1") || !strings.Contains(err.Error(), "tenants.by") {
		t.Fatalf("Run with a bad configuration: %v, want the daemon's reason", err)
	}
}

func TestRunOptionsValidate(t *testing.T) {
	o := tinyRun(t, "1")
	o.Ops, o.Clients, o.RevokeWithin = 0, 5, "30s"
	err := o.validate()
	for _, want := range []string{"-ops 0", "-clients 5 is more than -ops 0", `-revoke-within "30s"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("validate: %v, want %q", err, want)
		}
	}
}
