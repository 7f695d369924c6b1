package journal

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

const crashBacklog = 64

// crashLease is what the child commits with event seq: a lease record of varying size (so
// that commits allocate, free and grow pages), with Seq = seq so the parent can check that
// the lease and the event of one commit landed together.
func crashLease(seq uint64) Lease {
	l := Lease{
		ID:      fmt.Sprintf("lease-%02d", seq%24),
		State:   "active",
		Seq:     seq,
		Created: time.Unix(int64(seq), 0),
		Labels:  map[string]string{"pad": strings.Repeat("p", int(seq*37%5000))},
	}
	return l
}

// runCommitChild commits one event and one lease per iteration, forever, and writes each
// seq whose Commit returned to stdout; every 7th commit also drops a lease.
func runCommitChild(path string) error {
	j, err := Open(path, Options{BootID: testBoot, EventBacklog: crashBacklog})
	if err != nil {
		return err
	}
	st, err := j.Load()
	if err != nil {
		return err
	}
	for seq := st.LastSeq + 1; ; seq++ {
		l := crashLease(seq)
		var drop []string
		if seq%7 == 0 {
			drop = []string{fmt.Sprintf("lease-%02d", (seq+5)%24)}
		}
		if err := j.Commit([]Event{{Seq: seq, Type: "renewed", Lease: l}}, []Lease{l}, drop); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(os.Stdout, "%d\n", seq); err != nil {
			return err
		}
	}
}

// TestCrash SIGKILLs a committing child process at random points; after each kill the
// journal must load, with LastSeq the last seq whose Commit returned in the child or the
// one after it (in flight), and the lease and event of that commit both present.
func TestCrash(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	var last uint64
	rounds := 8
	if testing.Short() {
		rounds = 3
	}
	for round := range rounds {
		killAfter := 1 + rand.IntN(400)
		high, stderr := runAndKill(t, path, killAfter)
		if high <= last {
			t.Fatalf("round %d: child reported seq %d, not above %d; stderr:\n%s", round, high, last, stderr)
		}

		j, err := Open(path, Options{BootID: testBoot, EventBacklog: crashBacklog})
		if err != nil {
			t.Fatalf("round %d: Open after kill: %v", round, err)
		}
		if fresh, reason := j.Fresh(); fresh {
			t.Fatalf("round %d: journal fresh after kill: %s", round, reason)
		}
		st, err := j.Load()
		j.Close()
		if err != nil {
			t.Fatalf("round %d: Load after kill: %v", round, err)
		}
		if st.LastSeq != high && st.LastSeq != high+1 {
			t.Fatalf("round %d: LastSeq %d after the child's last returned commit %d", round, st.LastSeq, high)
		}
		checkCrashState(t, round, st)
		t.Logf("round %d: killed after %d commits, last returned seq %d, LastSeq %d",
			round, killAfter, high, st.LastSeq)
		last = st.LastSeq
	}
}

// runAndKill runs the commit child on path, SIGKILLs it once it has reported killAfter
// commits, and returns the highest seq it reported.
func runAndKill(t *testing.T, path string, killAfter int) (uint64, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"=commit", envPath+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var high uint64
	n := 0
	killed := false
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		seq, err := strconv.ParseUint(sc.Text(), 10, 64)
		if err != nil {
			t.Errorf("child wrote %q", sc.Text())
			continue
		}
		high = seq
		if n++; n == killAfter {
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	err = cmd.Wait()
	if !killed {
		t.Fatalf("child exited by itself (%v) after %d commits; stderr:\n%s", err, n, stderr.String())
	}
	return high, stderr.String()
}

// checkCrashState checks that st is what the commits up to st.LastSeq produce.
func checkCrashState(t *testing.T, round int, st State) {
	t.Helper()
	if n := len(st.Events); n == 0 || n > crashBacklog {
		t.Fatalf("round %d: %d events", round, n)
	}
	for i, e := range st.Events {
		want := st.LastSeq - uint64(len(st.Events)-1-i)
		if e.Seq != want || e.Lease.Seq != want {
			t.Fatalf("round %d: event %d has seq %d (lease seq %d), want %d", round, i, e.Seq, e.Lease.Seq, want)
		}
	}
	// The lease the last commit wrote is there with that commit's seq, and no lease is
	// newer than LastSeq.
	lastID := crashLease(st.LastSeq).ID
	found := false
	for _, l := range st.Leases {
		if l.Seq > st.LastSeq {
			t.Fatalf("round %d: lease %s has seq %d above LastSeq %d", round, l.ID, l.Seq, st.LastSeq)
		}
		if l.ID == lastID {
			found = l.Seq == st.LastSeq
		}
	}
	if !found {
		t.Fatalf("round %d: lease %s of the last commit %d missing or stale", round, lastID, st.LastSeq)
	}
}
