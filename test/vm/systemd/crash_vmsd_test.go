//go:build vmsystemd

package systemd

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	failpointDropIn = "/run/systemd/system/mmiobrokerd.service.d/50-mmb-failpoint.conf"
	// failpointFile arms a failpoint once (internal/failpoint: the kill removes it). It
	// lives in the daemon's RuntimeDirectory: ProtectSystem=strict leaves the rest of /run
	// read-only to the daemon, and a file it cannot remove does not arm the point.
	failpointFile = "/run/mmiobroker/mmb-fp"
)

// armFailpoint installs the drop-in with MMIOBROKER_FAILPOINTS=spec@failpointFile, creates
// the file and restarts the daemon into it.
func armFailpoint(t *testing.T, spec string) unitState {
	t.Helper()
	if err := os.MkdirAll(strings.TrimSuffix(failpointDropIn, "/50-mmb-failpoint.conf"), 0o755); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf("[Service]\nEnvironment=MMIOBROKER_FAILPOINTS=%s@%s\n", spec, failpointFile)
	if err := os.WriteFile(failpointDropIn, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	must(t, "systemctl", "daemon-reload")
	before := show(t, service)
	must(t, "systemctl", "restart", service)
	st := waitUnit(t, "restarted with failpoint "+spec, 30*time.Second, func(s unitState) bool { return active(s) && s.MainPID != before.MainPID })
	environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", st.MainPID))
	if !strings.Contains(string(environ), "MMIOBROKER_FAILPOINTS="+spec+"@") {
		t.Fatalf("the daemon's environment lacks MMIOBROKER_FAILPOINTS=%s@...", spec)
	}
	// armed only now, after the start (the restart itself passes no point of a lease)
	if err := os.WriteFile(failpointFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return st
}

func disarmFailpoint(t *testing.T) {
	os.Remove(failpointFile)
	if err := os.Remove(failpointDropIn); err == nil {
		run(time.Minute, "systemctl", "daemon-reload")
	}
}

// killedCount counts systemd's "Main process exited, code=killed, status=9/KILL" lines
// for the service in this boot's journal.
func killedCount(t *testing.T) int {
	out, err := run(time.Minute, "journalctl", "-b", "--no-pager", "-o", "cat", "-u", service)
	if err != nil {
		t.Fatalf("journalctl: %v", err)
	}
	return strings.Count(out, "code=killed, status=9/KILL")
}

// held is a lease this test allocated and claimed through the client library.
type held struct {
	name string
	l    *client.Lease
	gen  uint64
}

// TestCrashFailpoints arms each of the daemon's failpoints once (a drop-in with
// MMIOBROKER_FAILPOINTS=name@file, restart), triggers the step (allocate; claim; an admin
// revoke of a lease whose device has other live leases, which cycles the device and
// reissues them), sees systemd restart the daemon after its SIGKILL, and checks the
// invariant: every lease the test was told about is intact (live, and if the test holds
// its current generation, that fd maps into a fresh IOAS on the iommufd kernel) or ended
// with a reason; a lease holder on another device (its own process) is untouched; and the
// daemon holds exactly the dma-bufs of leases with an outstanding claim token, in its fds
// and in the fd store.
func TestCrashFailpoints(t *testing.T) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	t.Cleanup(func() {
		disarmFailpoint(t)
		run(time.Minute, "systemctl", "restart", service)
	})
	iv, edu1, testdev := env(t, "IVSHMEM"), env(t, "EDU1"), env(t, "TESTDEV")
	hiv := startHolder(t, "ivshmem-holder", iv, 2, "0:64K")
	if iommufdKernel() {
		t.Log(hiv.must("map"))
	}
	c := dial(t)
	defer c.Close()

	alloc := func(t *testing.T, name, bdf string, bar int, off uint64) held {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: bar, VMName: name,
			Ranges: []*brokerv1.Range{{Offset: off, Length: 64 << 10}}})
		if err != nil {
			t.Fatalf("allocate %s (%s bar %d): %v", name, bdf, bar, err)
		}
		return held{name: name, l: l, gen: l.Claim.Generation}
	}
	// trigger runs the step that passes the armed point; the daemon must die in it, so
	// the call fails UNAVAILABLE.
	type step func(t *testing.T, ctx context.Context) error
	allocStep := func(t *testing.T, ctx context.Context) error {
		_, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: testdev, Bar: 2,
			Ranges: []*brokerv1.Range{{Offset: 0x40000, Length: 64 << 10}}, VmName: "crash-alloc"})
		return err
	}
	cases := []struct {
		name, spec string
		cycle      bool // the step is a revoke that cycles edu1 (victim plus two survivors)
		claim      bool // the step is the claim of a lease allocated just before
	}{
		{name: "after-export", spec: "after-export"},
		{name: "after-journal", spec: "after-journal"},
		{name: "after-journal-claim", spec: "after-journal:2", claim: true},
		{name: "mid-cycle", spec: "mid-cycle", cycle: true},
		{name: "after-fdstore-remove", spec: "after-fdstore-remove", cycle: true},
		{name: "mid-reissue", spec: "mid-reissue", cycle: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer disarmFailpoint(t)
			before := armFailpoint(t, tc.spec)
			kills := killedCount(t)
			var mine []held
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				for _, h := range mine {
					c.Release(ctx, h.l.ID)
					h.l.File.Close()
				}
			})
			var trigger step = allocStep
			var victim string
			cycled := map[string]bool{}
			var token, claimID string
			switch {
			case tc.cycle:
				v := alloc(t, "victim", edu1, 0, 0)
				mine = append(mine, v, alloc(t, "survivor-1", edu1, 0, 64<<10), alloc(t, "survivor-2", edu1, 0, 128<<10))
				victim = v.l.ID
				for _, h := range mine {
					cycled[h.l.ID] = true
				}
				trigger = func(t *testing.T, ctx context.Context) error {
					_, err := c.Revoke(ctx, victim)
					return err
				}
			case tc.claim:
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: testdev, Bar: 2,
					Ranges: []*brokerv1.Range{{Offset: 0x40000, Length: 64 << 10}}, VmName: "crash-claim"})
				cancel()
				if err != nil {
					t.Fatalf("allocate (the failpoint's first hit): %v", err)
				}
				claimID, token = resp.GetLease().GetId(), resp.GetClaimToken()
				trigger = func(t *testing.T, ctx context.Context) error {
					f, _, err := c.Claim(ctx, claimID, token)
					if err == nil {
						f.Close()
					}
					return err
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			since := monoNow()
			err := trigger(t, ctx)
			cancel()
			if err == nil {
				t.Fatalf("failpoint %s: the step succeeded; the daemon did not die in it\n%s", tc.spec, journal(service, 40))
			}
			code := status.Code(err)
			if ce, ok := err.(*client.ClaimError); ok {
				code = ce.GRPCCode()
			}
			if code != codes.Unavailable {
				t.Errorf("the step in which the daemon died failed %v, want UNAVAILABLE: %v", code, err)
			}
			st, ready := readyAfter(t, before.MainPID, since, 60*time.Second)
			t.Logf("%s: the step failed (%v); new main PID %d ready %v later", tc.spec, code, st.MainPID, ready.Round(time.Millisecond))
			if st.NRestarts != before.NRestarts+1 {
				t.Errorf("NRestarts %d, want %d: not restarted by Restart=on-failure", st.NRestarts, before.NRestarts+1)
			}
			if n := killedCount(t); n != kills+1 {
				t.Errorf("journal: %d more \"code=killed, status=9/KILL\" lines, want 1 (SIGKILL at the failpoint)", n-kills)
			}
			if _, err := os.Stat(failpointFile); err == nil {
				t.Errorf("%s still exists: the failpoint did not fire", failpointFile)
			}

			// The invariant.
			all := leases(t, c)
			checkHolders(t, all, hiv)
			for _, h := range mine {
				l := all[h.l.ID]
				switch {
				case l == nil:
					t.Errorf("LOST: lease %s (%s) is not listed after the crash", h.l.ID, h.name)
				case !live(l):
					if l.GetEndReason() == brokerv1.EndReason_END_REASON_UNSPECIFIED {
						t.Errorf("lease %s (%s) ended without a reason: %v", h.l.ID, h.name, l)
					} else if !cycled[h.l.ID] || (h.l.ID != victim && l.GetEndReason() != brokerv1.EndReason_END_REASON_REVOKED && l.GetEndReason() != brokerv1.EndReason_END_REASON_REISSUE_FAILED) {
						t.Errorf("lease %s (%s) ended %v by %q: not a lease the step may end", h.l.ID, h.name, l.GetEndReason(), l.GetEndedBy())
					} else {
						t.Logf("lease %s (%s) ended cleanly: %v %v by %q", h.l.ID, h.name, l.GetState(), l.GetEndReason(), l.GetEndedBy())
					}
					// Revoked means dead in every process: the fd the test holds must be too.
					if iommufdKernel() && l.GetState() == brokerv1.LeaseState_LEASE_STATE_REVOKED {
						if err := mapsFresh(h.l.File, h.l.Claim.Size); err == nil {
							t.Errorf("NOT REVOKED: lease %s (%s) is reported %v %v, yet the fd of its generation %d still maps into a fresh IOAS (the device cycle never completed)",
								h.l.ID, h.name, l.GetState(), l.GetEndReason(), h.gen)
						} else {
							t.Logf("lease %s (%s): its fd is dead as reported (%v)", h.l.ID, h.name, err)
						}
					}
				case l.GetGeneration() != h.gen:
					if !cycled[h.l.ID] {
						t.Errorf("lease %s (%s) was reissued (generation %d -> %d) by a step on another device", h.l.ID, h.name, h.gen, l.GetGeneration())
					} else {
						t.Logf("lease %s (%s) live, reissued: generation %d -> %d, claimed %v", h.l.ID, h.name, h.gen, l.GetGeneration(), l.GetClaimTime() != nil)
					}
				default:
					// Live at the generation the test holds: the fd must be live too.
					if iommufdKernel() {
						if err := mapsFresh(h.l.File, h.l.Claim.Size); err != nil {
							t.Errorf("REVOKED but reported live: lease %s (%s) is %v at generation %d, yet the holder's fd of that generation does not map: %v",
								h.l.ID, h.name, l.GetState(), l.GetGeneration(), err)
						}
					}
					t.Logf("lease %s (%s) live at generation %d (%v)", h.l.ID, h.name, l.GetGeneration(), l.GetState())
				}
			}
			if claimID != "" {
				l := all[claimID]
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				f, info, err := c.Claim(ctx, claimID, token)
				cancel()
				switch {
				case l == nil:
					t.Errorf("LOST: lease %s (allocated, then the claim died) is not listed after the crash", claimID)
				case err == nil:
					t.Logf("lease %s: the claim journaled before the crash; claiming with the same token again gave generation %d (the lease was %v)", claimID, info.Generation, l.GetState())
					f.Close()
				default:
					t.Logf("lease %s after the crash: %v claimed %v; a second claim with the token: %v", claimID, l.GetState(), l.GetClaimTime() != nil, err)
					switch {
					case live(l) && l.GetClaimTime() == nil:
						t.Errorf("lease %s waits for its claim, but its token is refused: %v", claimID, err)
					case live(l):
						// The claim was journaled, the daemon died before sending the fd, and
						// the restart dropped the kept copy: no process has this dma-buf.
						t.Errorf("LOST (claim): lease %s is reported %v and claimed at generation %d, but its fd never reached the client (the claim reply died with the daemon) and the token is spent: no process holds its dma-buf and the holder cannot get it",
							claimID, l.GetState(), l.GetGeneration())
					}
				}
				ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
				c.Release(ctx, claimID)
				cancel()
			}
			checkBuffers(t, c)
		})
	}
}
