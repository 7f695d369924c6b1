package failpoint

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

func TestParse(t *testing.T) {
	m := parse(" after-export:3, mid-cycle ,bad:x,neg:0,:2,mid-reissue:2@/run/x")
	if len(m) != 3 || m[AfterExport].after != 3 || m[MidCycle].after != 1 || m[MidReissue].after != 2 || m[MidReissue].file != "/run/x" {
		t.Errorf("parse = %v", m)
	}
	if parse("") != nil {
		t.Error("empty spec armed something")
	}
}

func FuzzParse(f *testing.F) {
	f.Add("after-export:2,mid-cycle")
	f.Fuzz(func(t *testing.T, s string) {
		for name, p := range parse(s) {
			if name == "" || p.after < 1 {
				t.Fatalf("parse(%q) armed %q after %d", s, name, p.after)
			}
		}
	})
}

// TestHitKills runs the test binary as a child with a point armed for its 2nd hit: the
// child must die of SIGKILL there, not before and not later.
func TestHitKills(t *testing.T) {
	if os.Getenv("FAILPOINT_CHILD") == "1" {
		Hit(AfterJournal)
		os.Stdout.WriteString("first\n")
		Hit(AfterJournal)
		os.Stdout.WriteString("second\n")
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHitKills$")
	cmd.Env = append(os.Environ(), "FAILPOINT_CHILD=1", Env+"="+AfterJournal+":2")
	out, err := cmd.Output()
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if err == nil || !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v (%v), want killed by SIGKILL", err, cmd.ProcessState)
	}
	if string(out) != "first\n" {
		t.Errorf("child output %q, want it killed at the second hit", out)
	}

	// Armed by a file: the kill removes it, so the next run passes the point.
	file := t.TempDir() + "/armed"
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"first\n", "first\nsecond\n"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHitKills$")
		cmd.Env = append(os.Environ(), "FAILPOINT_CHILD=1", Env+"="+AfterJournal+":2@"+file)
		out, _ := cmd.Output()
		if string(out) != want {
			t.Errorf("run %d with the point armed by a file: output %q, want %q", i+1, out, want)
		}
	}
}
