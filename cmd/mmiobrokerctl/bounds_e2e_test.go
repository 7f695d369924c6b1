package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// otherUID is the uid of the non-admin caller in tests run as root.
const otherUID = 65534

// startBoundsDaemon starts a daemon whose ended-but-live leases stay so for an hour
// (revoke_within), far longer than any test: only a cycle kills their fds. Both devices
// may be leased by the test process and by otherUID.
func startBoundsDaemon(t *testing.T) *testDaemon {
	t.Helper()
	return startDaemonConfig(t, fmt.Sprintf(`
[limits]
claim_timeout = "10s"
revoke_within = "1h"

[[device]]
address = %q
allow_uids = [%[2]d, %[3]d]

[[device]]
address = %[4]q
allow_uids = [%[2]d, %[3]d]
`, e2eBDF, os.Getuid(), otherUID, e2eBDF2))
}

// ctlAs runs mmiobrokerctl against the daemon as uid (a child process: the test binary
// with envAsUID), which is then not an admin. Only root can do that: the test is skipped
// otherwise. openToOthers must have been called.
func (d *testDaemon) ctlAs(t *testing.T, uid int, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	testutil.SkipUnlessRoot(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"-socket", d.Control}, args...)...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", envAsUID, uid))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("mmiobrokerctl as uid %d: %v", uid, err)
	}
	if code := cmd.ProcessState.ExitCode(); code == 125 {
		t.Fatalf("mmiobrokerctl as uid %d: %s", uid, errb.String())
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// openToOthers lets other uids reach the daemon's sockets (the test daemon's directory
// and sockets are for its own uid and group only).
func (d *testDaemon) openToOthers(t *testing.T) {
	t.Helper()
	testutil.SkipUnlessRoot(t)
	for p, mode := range map[string]os.FileMode{d.Dir: 0o711, d.Control: 0o666, d.Claim: 0o666} {
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
}

// watch runs "mmiobrokerctl watch ARGS..." in the background until the test ends.
func (d *testDaemon) watch(t *testing.T, args ...string) *lines {
	t.Helper()
	out := newLines()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, append([]string{"-socket", d.Control, "watch"}, args...), out.w, io.Discard, noEnv)
		out.w.Close()
	}()
	t.Cleanup(func() {
		stop()
		if code := <-done; code != 0 {
			t.Errorf("watch %v: exit %d after SIGINT, want 0", args, code)
		}
		for range out.ch { // drain
		}
	})
	return out
}

// leaseLine returns the line of the leases table that shows lease id.
func leaseLine(t *testing.T, table, id string) string {
	t.Helper()
	for _, l := range strings.Split(table, "\n") {
		if strings.HasPrefix(l, id+" ") {
			return l
		}
	}
	t.Fatalf("no lease %s in the table:\n%s", id, table)
	return ""
}

// tableTime formats an RFC 3339 JSON timestamp as the tables do.
func tableTime(t *testing.T, v any) string {
	t.Helper()
	s, _ := v.(string)
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("timestamp %#v: %v", v, err)
	}
	return ts.UTC().Format(time.RFC3339)
}

func tenantOf(l map[string]any) string {
	h, _ := l["holder"].(map[string]any)
	s, _ := h["tenant"].(string)
	return s
}

func TestEndToEndRevocationBounds(t *testing.T) {
	testutil.FDLeakCheck(t)
	d := startBoundsDaemon(t)
	cl, err := client.Dial(d.Control)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cycles := func() (n int) {
		d.dev.Locked(func(dev *brokertest.Device) { n = dev.Revokes })
		return n
	}

	// Two claimed leases of the test process on e2eBDF: one stays live, one is released.
	live, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}, VMName: "vm-live"})
	if err != nil {
		t.Fatal(err)
	}
	defer live.File.Close()
	ended, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0,
		Ranges: []*brokerv1.Range{{Offset: 4096, Length: 4096}}, VMName: "vm-ended"})
	if err != nil {
		t.Fatal(err)
	}
	defer ended.File.Close()
	// From seq 1 on: the watch replays what happens below whenever its stream starts.
	events := d.watch(t, "-cursor", "1")
	myTenant := tenantOf(d.leaseJSON(t, live.ID))
	if myTenant == "" {
		t.Fatalf("lease %s has no holder tenant: %v", live.ID, d.leaseJSON(t, live.ID))
	}

	t.Run("ended-but-live", func(t *testing.T) {
		before := cycles()
		out := d.mustCtl(t, "release", ended.ID)
		if !strings.HasPrefix(out, "released lease "+ended.ID+" (") ||
			!strings.Contains(out, "\nits fd keeps working until the device's next cycle, at the latest 20") {
			t.Errorf("release of a claimed lease:\n%s", out)
		}
		l := d.leaseJSON(t, ended.ID)
		if l["state"] != "LEASE_STATE_RELEASED" || l["end_reason"] != "END_REASON_RELEASED" || l["fd_dead"] != false || l["revoke_due"] == nil {
			t.Fatalf("released claimed lease in -json: state %v, end_reason %v, fd_dead %v, revoke_due %v; want released, fd live, revoke_due set",
				l["state"], l["end_reason"], l["fd_dead"], l["revoke_due"])
		}
		due := tableTime(t, l["revoke_due"])
		if dueTime, _ := time.Parse(time.RFC3339, due); time.Until(dueTime) < 50*time.Minute {
			t.Errorf("revoke_due %s is not about revoke_within (1h) after the release", due)
		}
		if got := tenantOf(l); got != myTenant {
			t.Errorf("holder tenant %q, want %q", got, myTenant)
		}
		if n := cycles(); n != before {
			t.Errorf("the release cycled the device (%d -> %d cycles)", before, n)
		}

		table := d.mustCtl(t, "leases", "-all")
		header := strings.Fields(strings.SplitN(table, "\n", 2)[0])
		if diff := cmp.Diff(strings.Fields("ID BDF BAR KIND STATE GEN SIZE UID PID VM CREATED EXPIRES REVOKE-BY END FD TENANT"), header); diff != "" {
			t.Errorf("leases header (-want +got):\n%s", diff)
		}
		endedRow := regexp.MustCompile(`^` + ended.ID + `\s.*\sreleased\s+1\s.*\sreleased\s+live until ` + regexp.QuoteMeta(due) + `\s+` + regexp.QuoteMeta(myTenant) + `$`)
		if line := leaseLine(t, table, ended.ID); !endedRow.MatchString(line) {
			t.Errorf("ended-but-live lease row %q does not match %s", line, endedRow)
		}
		liveRow := regexp.MustCompile(`^` + live.ID + `\s.*\sactive\s.*\s-\s+-\s+` + regexp.QuoteMeta(myTenant) + `$`)
		if line := leaseLine(t, table, live.ID); !liveRow.MatchString(line) {
			t.Errorf("live lease row %q does not match %s", line, liveRow)
		}
		events.waitAll(t, "watch", []string{"type=released", ended.ID, " revoke_due=" + due, fmt.Sprintf(" tenant=%s", logfmtValue(myTenant))})
	})

	t.Run("cycle", func(t *testing.T) {
		// A second ended-but-live lease, so that the two counts differ.
		second, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0,
			Ranges: []*brokerv1.Range{{Offset: 8192, Length: 4096}}})
		if err != nil {
			t.Fatal(err)
		}
		defer second.File.Close()
		d.mustCtl(t, "release", second.ID)
		before := cycles()
		out := d.mustCtl(t, "cycle", "00:03.0")
		want := "cycled device " + e2eBDF + ": every dma-buf it exported is dead; 2 ended lease(s) lost their live fd, 1 live lease(s) were reissued as a new generation\n"
		if out != want {
			t.Errorf("cycle output\n got %q\nwant %q", out, want)
		}
		if n := cycles(); n != before+1 {
			t.Errorf("device cycles %d -> %d, want one cycle", before, n)
		}
		admin := fmt.Sprintf(`caused_by="uid %d (admin) pid `, os.Getuid())
		events.waitAll(t, "watch",
			[]string{"type=fd_revoked", ended.ID, "end_reason=released", " fd_dead=true", admin},
			[]string{"type=fd_revoked", second.ID, " fd_dead=true", admin},
			[]string{"type=reissued", live.ID, "generation=2", admin})
		l := d.leaseJSON(t, ended.ID)
		if l["fd_dead"] != true || l["revoke_due"] != nil || l["state"] != "LEASE_STATE_RELEASED" {
			t.Errorf("lease after the cycle: fd_dead %v, revoke_due %v, state %v; want a dead fd, no revoke_due, still released",
				l["fd_dead"], l["revoke_due"], l["state"])
		}
		deadRow := regexp.MustCompile(`^` + ended.ID + `\s.*\sreleased\s+dead\s+` + regexp.QuoteMeta(myTenant) + `$`)
		if line := leaseLine(t, d.mustCtl(t, "leases", "-all"), ended.ID); !deadRow.MatchString(line) {
			t.Errorf("lease row after the cycle %q does not match %s", line, deadRow)
		}

		// -json: the response; no ended-but-live lease is left, the live one is reissued again.
		var r map[string]any
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "cycle", e2eBDF)), &r); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(map[string]any{"reissued_leases": float64(1), "fd_revoked_leases": float64(0)}, r); diff != "" {
			t.Errorf("cycle -json (-want +got):\n%s", diff)
		}

		_, errs, code := d.ctl(t, "cycle", "0000:00:1f.0")
		if code != exitNotFound || !strings.HasPrefix(errs, "mmiobrokerctl: NotFound: ") {
			t.Errorf("cycle of an unconfigured device: exit %d, stderr %q", code, errs)
		}
	})

	t.Run("revoke-ended-but-live", func(t *testing.T) {
		l, err := cl.Allocate(ctx, client.AllocateOptions{BDF: e2eBDF, BAR: 0,
			Ranges: []*brokerv1.Range{{Offset: 12288, Length: 4096}}})
		if err != nil {
			t.Fatal(err)
		}
		defer l.File.Close()
		d.mustCtl(t, "release", l.ID)
		out := d.mustCtl(t, "revoke", l.ID)
		if !strings.HasPrefix(out, "killed the fd of lease "+l.ID+", which had ended (released, by uid ") {
			t.Errorf("revoke of an ended-but-live lease:\n%s", out)
		}
		if j := d.leaseJSON(t, l.ID); j["fd_dead"] != true || j["end_reason"] != "END_REASON_RELEASED" {
			t.Errorf("lease after the revoke: fd_dead %v, end_reason %v", j["fd_dead"], j["end_reason"])
		}
		events.waitAll(t, "watch", []string{"type=fd_revoked", l.ID, " fd_dead=true"})
	})

	t.Run("cycle-not-admin", func(t *testing.T) {
		d.openToOthers(t)
		before := cycles()
		out, errs, code := d.ctlAs(t, otherUID, "cycle", e2eBDF)
		if code != exitPermissionDenied || out != "" ||
			!strings.HasPrefix(errs, "mmiobrokerctl: PermissionDenied: ") || !strings.Contains(errs, "not an admin") {
			t.Errorf("cycle by uid %d: exit %d, stdout %q, stderr %q; want exit %d and PermissionDenied", otherUID, code, out, errs, exitPermissionDenied)
		}
		if n := cycles(); n != before {
			t.Errorf("a refused cycle cycled the device (%d -> %d)", before, n)
		}
	})

	t.Run("tenant-filter", func(t *testing.T) {
		out := d.mustCtl(t, "leases", "-all", "-tenant", myTenant)
		for _, id := range []string{live.ID, ended.ID} {
			if line := leaseLine(t, out, id); !strings.HasSuffix(line, "  "+myTenant) {
				t.Errorf("lease row %q does not end with the tenant %q", line, myTenant)
			}
		}
		if out := d.mustCtl(t, "leases", "-all", "-tenant", "uid=4242"); strings.Count(out, "\n") != 1 || !strings.HasPrefix(out, "ID ") {
			t.Errorf("leases of a tenant without leases:\n%s", out)
		}
		var doc struct {
			Leases []map[string]any `json:"leases"`
		}
		if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "leases", "-tenant", myTenant)), &doc); err != nil {
			t.Fatal(err)
		}
		if len(doc.Leases) != 1 || doc.Leases[0]["id"] != live.ID || tenantOf(doc.Leases[0]) != myTenant {
			t.Errorf("live leases of tenant %s in -json: %v, want only %s", myTenant, doc.Leases, live.ID)
		}

		t.Run("other-tenant", func(t *testing.T) {
			d.openToOthers(t)
			// A lease of another tenant, released when its command exits.
			if _, errs, code := d.ctlAs(t, otherUID, "allocate", "-vm", "vm-other", "-exec", e2eBDF2, "0", "--", "/bin/true"); code != 0 {
				t.Fatalf("allocate -exec as uid %d: exit %d, stderr %q", otherUID, code, errs)
			}
			var doc struct {
				Leases []map[string]any `json:"leases"`
			}
			if err := json.Unmarshal([]byte(d.mustCtl(t, "-json", "leases", "-all", "-device", e2eBDF2)), &doc); err != nil {
				t.Fatal(err)
			}
			if len(doc.Leases) != 1 || doc.Leases[0]["vm_name"] != "vm-other" {
				t.Fatalf("leases of %s: %v, want the one of vm-other", e2eBDF2, doc.Leases)
			}
			other, otherTenant := doc.Leases[0]["id"].(string), tenantOf(doc.Leases[0])
			if otherTenant == "" || otherTenant == myTenant {
				t.Fatalf("uid %d's tenant %q, the test process's %q: want two tenants", otherUID, otherTenant, myTenant)
			}

			out := d.mustCtl(t, "leases", "-all", "-tenant", otherTenant)
			if rows := strings.Split(strings.TrimSuffix(out, "\n"), "\n")[1:]; len(rows) != 1 ||
				!strings.HasPrefix(rows[0], other+" ") || !strings.HasSuffix(rows[0], "  "+otherTenant) {
				t.Errorf("leases -tenant %s:\n%s\nwant only lease %s", otherTenant, out, other)
			}
			if out := d.mustCtl(t, "leases", "-all", "-tenant", myTenant); strings.Contains(out, other) {
				t.Errorf("leases -tenant %s shows uid %d's lease %s:\n%s", myTenant, otherUID, other, out)
			}
			// A holder may name only its own tenant.
			_, errs, code := d.ctlAs(t, otherUID, "leases", "-all", "-tenant", myTenant)
			if code != exitPermissionDenied || !strings.HasPrefix(errs, "mmiobrokerctl: PermissionDenied: ") {
				t.Errorf("leases -tenant %s as uid %d: exit %d, stderr %q; want PermissionDenied", myTenant, otherUID, code, errs)
			}
			out, errs, code = d.ctlAs(t, otherUID, "leases", "-all", "-tenant", otherTenant)
			if code != 0 || strings.Count(out, "\n") != 2 || !strings.Contains(out, other) {
				t.Errorf("leases -tenant %s as uid %d: exit %d, stderr %q, stdout:\n%s", otherTenant, otherUID, code, errs, out)
			}
		})
	})
}
