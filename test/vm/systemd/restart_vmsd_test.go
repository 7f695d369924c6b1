//go:build vmsystemd

package systemd

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// restartDMAOffset is where in the ivshmem BAR2 TestRestartModes has the edu DMA its
// patterns: "MMB-RESTART-BEFORE" at restartDMAOffset, then "MMB-RESTART-<MODE>" one page
// further for each mode in restartModes. test/vm/vm_test.go finds them in the host's
// ivshmem backing file.
const restartDMAOffset = 0x40000

// restartModes are the ways TestRestartModes replaces the daemon, in order (the host
// check in test/vm/vm_test.go lists the same).
var restartModes = []string{"RESTART", "KILL", "SWAP", "STOP-REACTIVATE"}

// withoutDevice returns the daemon configuration without the [[device]] block of bdf.
func withoutDevice(conf, bdf string) string {
	blocks := strings.Split(conf, "\n[[device]]\n")
	kept := blocks[:1]
	for _, b := range blocks[1:] {
		if !strings.Contains(b, `address = "`+bdf+`"`) {
			kept = append(kept, b)
		}
	}
	return strings.Join(kept, "\n[[device]]\n")
}

func sha(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:8])
}

// installBinary puts src at /usr/bin/mmiobrokerd as a package upgrade does: a new file
// renamed over the old one (the running daemon keeps its old inode).
func installBinary(t *testing.T, src string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := "/usr/bin/.mmiobrokerd.new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, "/usr/bin/mmiobrokerd"); err != nil {
		t.Fatal(err)
	}
}

// TestRestartModes: two holders in their own processes (mmiobrokerctl allocate -exec ...
// -- mmb-holder) hold an ivshmem BAR2 lease and an edu BAR0 lease while a load generator
// allocates, claims and releases leases; the daemon is then restarted (systemctl restart),
// killed (kill -9 of MainPID; Restart=on-failure), upgraded (another build installed at
// /usr/bin/mmiobrokerd, then restarted) and stopped (systemctl stop, re-activated through
// its socket by a client). After each: the holders' leases are live at the same
// generation (nothing ended, nothing reissued), their fds still map into a fresh IOAS
// (iommufd kernel), the ivshmem holder's IOAS mapping taken before the first restart still
// carries an edu peer-to-peer DMA into the BAR (checked back in the guest through the
// same mapping, and on the host in the ivshmem backing file), the load generator saw only
// UNAVAILABLE errors and lost no lease, and the daemon holds no dma-buf beyond those of
// leases with an outstanding claim token.
func TestRestartModes(t *testing.T) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	edu1, edu2, iv, testdev, pcie := env(t, "EDU1"), env(t, "EDU2"), env(t, "IVSHMEM"), env(t, "TESTDEV"), env(t, "PCIE")
	dma := iommufdKernel()

	if dma {
		// The edu DMA engine belongs to the ivshmem holder (its own VFIO cdev in its own
		// IOAS): the daemon must not have it open, so it leaves the configuration.
		orig, err := os.ReadFile(daemonConfig)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(daemonConfig, []byte(withoutDevice(string(orig), edu2)), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			os.WriteFile(daemonConfig, orig, 0o644)
			run(time.Minute, "systemctl", "restart", service)
		})
		before := show(t, service)
		must(t, "systemctl", "restart", service)
		waitUnit(t, "restarted without "+edu2+" in its configuration", 30*time.Second,
			func(s unitState) bool { return active(s) && s.MainPID != before.MainPID })
	}
	origBin := "/usr/lib/mmb/mmiobrokerd.orig"
	if err := os.WriteFile(origBin, mustRead(t, "/usr/bin/mmiobrokerd"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sha(t, "/usr/bin/mmiobrokerd") != sha(t, origBin) {
			installBinary(t, origBin)
			run(time.Minute, "systemctl", "restart", service)
		}
	})

	hiv := startHolder(t, "ivshmem-holder", iv, 2)
	hedu := startHolder(t, "edu-holder", edu1, 0, "0:64K")
	holders := []*holder{hiv, hedu}
	if dma {
		t.Log(hiv.must("map"))
		t.Log(hedu.must("map"))
		t.Log(hiv.must("edu " + edu2))
		t.Log(hiv.must(fmt.Sprintf("dma MMB-RESTART-BEFORE %#x", restartDMAOffset)))
	} else {
		t.Log("kernel " + os.Getenv("MMIOBROKER_VM_KERNEL") + " has no iommufd: the holders' fds are checked through the daemon's view only (no IOAS mapping, no P2P DMA)")
	}

	load := startLoad(t,
		loadTarget{bdf: testdev, bar: 2, off: 0, length: 64 << 10},
		loadTarget{bdf: iv, bar: 2, off: 0x80000, length: 64 << 10},
		loadTarget{bdf: pcie, bar: 0, off: 0, length: 64 << 10},
	)
	c := dial(t)
	defer c.Close()
	load.waitGrants(0, 3, time.Minute)

	swapSHA, origSHA := sha(t, "/usr/bin/mmiobrokerd-swap"), sha(t, origBin)
	if swapSHA == origSHA {
		t.Fatalf("/usr/bin/mmiobrokerd-swap is the same binary as mmiobrokerd (sha256 %s): no upgrade to test", swapSHA)
	}
	for i, mode := range restartModes {
		ok := t.Run(mode, func(t *testing.T) {
			g0 := load.grants()
			load.waitGrants(g0, 1, time.Minute) // the load is flowing when the daemon goes
			before := show(t, service)
			since := monoNow()
			switch mode {
			case "RESTART":
				must(t, "systemctl", "restart", service)
			case "KILL":
				if err := syscall.Kill(before.MainPID, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			case "SWAP":
				installBinary(t, "/usr/bin/mmiobrokerd-swap")
				since = monoNow()
				must(t, "systemctl", "restart", service)
			case "STOP-REACTIVATE":
				load.pause() // the next client call must be ours
				must(t, "systemctl", "stop", service)
				if st := show(t, service); st.Active != "inactive" {
					t.Fatalf("after systemctl stop: %v, want inactive", st)
				}
				since = monoNow()
				// socket activation by a client call (the rig's devices but the edu the
				// holder owns on the iommufd kernel)
				if out, err := ctl("devices"); err != nil || !strings.Contains(out, iv) {
					t.Fatalf("mmiobrokerctl devices after systemctl stop (re-activation): %v\n%s\n%s", err, out, journal(service, 40))
				}
				load.unpause()
			}
			st, ready := readyAfter(t, before.MainPID, since, 60*time.Second)
			t.Logf("%s: new main PID %d ready %v after the %s (%v)", mode, st.MainPID, ready.Round(time.Millisecond), strings.ToLower(mode), st)
			if mode == "KILL" && st.NRestarts != before.NRestarts+1 {
				t.Errorf("NRestarts %d after kill -9, want %d (Restart=on-failure)", st.NRestarts, before.NRestarts+1)
			}
			if mode == "SWAP" {
				if got := sha(t, fmt.Sprintf("/proc/%d/exe", st.MainPID)); got != swapSHA {
					t.Errorf("the new main process runs sha256 %s, want the swapped binary's %s", got, swapSHA)
				}
			}
			load.waitGrants(load.grants(), 2, time.Minute) // the new daemon serves the load

			load.pause()
			defer load.unpause()
			all := leases(t, c)
			checkHolders(t, all, holders...)
			lost, revoked := load.check(t, all)
			if lost+revoked > 0 {
				t.Errorf("load generator: %d lost, %d revoked", lost, revoked)
			}
			checkBuffers(t, c)
			if dma {
				tag := "MMB-RESTART-" + mode
				out, err := hiv.do(fmt.Sprintf("dma %s %#x", tag, restartDMAOffset+(i+1)*0x1000))
				if err != nil {
					t.Errorf("P2P DMA through the IOAS mapping made before the restarts: %v", err)
				} else {
					t.Logf("P2P DMA through the mapping made before the restarts: %s", out)
				}
			}
			t.Logf("load so far: %s", load.summary())
		})
		if !ok {
			break
		}
	}
	load.pause()
	t.Logf("load generator: %s", load.summary())
	if dma {
		var want []string
		for i, m := range append([]string{"BEFORE"}, restartModes...) {
			want = append(want, fmt.Sprintf("%q at %#x", "MMB-RESTART-"+m, restartDMAOffset+i*0x1000))
		}
		t.Logf("host-side expectation: the ivshmem backing file holds %s", strings.Join(want, ", "))
	}
	// The holders end: mmiobrokerctl releases their leases.
	for _, h := range holders {
		h.stop()
	}
	all := leases(t, c)
	for _, h := range holders {
		if l := all[h.ID]; l == nil || live(l) {
			t.Errorf("holder %s's lease %s after the holder ended: %v, want released", h.name, h.ID, l)
		}
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
