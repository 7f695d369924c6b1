//go:build vmsystemd

package systemd

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// soakShort is the number of kill -9 restarts of TestSoakShort (the soak in CI): 10, not
// 50, to keep `make test` near its time budget: a restart round takes 4.2 s (stock) to
// 5.2 s (iommufd) under TCG, so 50 would add about 4 minutes per kernel.
const soakShort = 10

// censusEvery: the soak takes the dma-buf census (the daemon's fds and systemd-analyze
// fdstore, slow under TCG) after every censusEvery-th restart and after the last.
const censusEvery = 5

// TestSoakShort is the soak with soakShort restarts; it runs in every systemd-mode run
// (make test). It skips when MMIOBROKER_VM_SOAK asks for TestSoak instead.
func TestSoakShort(t *testing.T) {
	if os.Getenv("MMIOBROKER_VM_SOAK") != "" {
		t.Skip("MMIOBROKER_VM_SOAK is set: TestSoak runs the long soak")
	}
	if !iommufdKernel() {
		// CI time: the short soak runs once, on the iommufd kernel; the stock kernel's
		// restart paths (group/container keeper) are covered by TestRestartModes and
		// TestCrashFailpoints, which run on both.
		t.Skip("runs on the iommufd kernel only (CI time)")
	}
	soak(t, soakShort)
}

// TestSoak runs MMIOBROKER_VM_SOAK kill -9 restarts (make soak: 1000, iommufd kernel;
// the rig passes it on the kernel command line as mmb.soak=N).
func TestSoak(t *testing.T) {
	s := os.Getenv("MMIOBROKER_VM_SOAK")
	if s == "" {
		t.Skip("the long soak runs with MMIOBROKER_VM_SOAK=N (make soak)")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("MMIOBROKER_VM_SOAK=%q: want a number of restarts", s)
	}
	soak(t, n)
}

// soak kills the daemon n times (kill -9 of MainPID; systemd restarts it) while a load
// generator allocates, claims and releases leases and two holders (own processes) hold
// theirs. After every restart: the holders' leases are live at their generation and their
// fds map (iommufd kernel), every lease the load generator was told about is where it
// should be, its errors were UNAVAILABLE only, and the daemon holds no dma-buf beyond the
// leases with an outstanding claim token. It prints restarts, leases granted, lost,
// leaked dma-bufs, unexpected revocations and restart-to-READY p50/p99, and fails if any
// of lost, leaked and unexpected is not 0.
func soak(t *testing.T, n int) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	iv, edu1, testdev, pcie := env(t, "IVSHMEM"), env(t, "EDU1"), env(t, "TESTDEV"), env(t, "PCIE")
	hiv := startHolder(t, "ivshmem-holder", iv, 2, "0:64K")
	hedu := startHolder(t, "edu-holder", edu1, 0, "0:64K")
	if iommufdKernel() {
		hiv.must("map")
		hedu.must("map")
	}
	load := startLoad(t,
		loadTarget{bdf: testdev, bar: 2, off: 0, length: 64 << 10},
		loadTarget{bdf: iv, bar: 2, off: 0x80000, length: 64 << 10},
		loadTarget{bdf: pcie, bar: 0, off: 0, length: 64 << 10},
	)
	c := dial(t)
	defer c.Close()
	load.waitGrants(0, 3, time.Minute)

	start := time.Now()
	var ready []time.Duration
	var serveSum, checkSum time.Duration // ready -> first grant, the checks
	lost, leaked, revoked := 0, 0, 0
	for i := 0; i < n; i++ {
		before := show(t, service)
		since := monoNow()
		if err := syscall.Kill(before.MainPID, syscall.SIGKILL); err != nil {
			t.Fatalf("restart %d: kill -9 %d: %v", i+1, before.MainPID, err)
		}
		st, d := readyAfter(t, before.MainPID, since, 60*time.Second)
		ready = append(ready, d)
		if st.NRestarts != before.NRestarts+1 {
			t.Errorf("restart %d: NRestarts %d, want %d", i+1, st.NRestarts, before.NRestarts+1)
		}
		t0 := time.Now()
		load.waitGrants(load.grants(), 1, time.Minute) // and it serves again
		serveSum += time.Since(t0)
		t0 = time.Now()

		load.pause()
		all := leases(t, c)
		l1, r1 := checkHolders(t, all, hiv, hedu)
		l2, r2 := load.check(t, all)
		lk := 0
		if (i+1)%censusEvery == 0 || i+1 == n {
			lk = checkBuffers(t, c) // leaks persist: a census every few restarts finds them
		}
		load.unpause()
		checkSum += time.Since(t0)
		lost, revoked, leaked = lost+l1+l2, revoked+r1+r2, leaked+lk
		if l1+l2+r1+r2+lk > 0 {
			t.Errorf("restart %d: %d lost, %d revoked, %d leaked", i+1, l1+l2, r1+r2, lk)
		}
		if (i+1)%10 == 0 || i+1 == n {
			t.Logf("restart %d/%d (%v): ready %v after the kill; per restart: ready to the next grant %v, checks %v; load %s", i+1, n, time.Since(start).Round(time.Second), d.Round(time.Millisecond),
				(serveSum / time.Duration(i+1)).Round(time.Millisecond), (checkSum / time.Duration(i+1)).Round(time.Millisecond), load.summary())
		}
	}
	load.pause()
	granted := load.grants()
	slices.Sort(ready)
	pct := func(p float64) time.Duration {
		k := int(p*float64(len(ready))+0.999999) - 1
		return ready[max(0, min(k, len(ready)-1))].Round(time.Millisecond)
	}
	res := fmt.Sprintf("SOAK RESULT: kernel=%s restarts=%d leases_granted=%d lost=%d leaked_dmabufs=%d unexpected_revocations=%d restart_to_ready_p50=%v p99=%v max=%v took=%v",
		os.Getenv("MMIOBROKER_VM_KERNEL"), len(ready), granted, lost, leaked, revoked, pct(0.50), pct(0.99), ready[len(ready)-1].Round(time.Millisecond), time.Since(start).Round(time.Second))
	t.Log(res)
	fmt.Println(res) // also outside the test's log, for make soak
	t.Logf("load generator: %s", load.summary())
	if lost+leaked+revoked > 0 {
		t.Errorf("soak: %d lost, %d leaked dma-bufs, %d unexpected revocations; want 0 each", lost, leaked, revoked)
	}
}
