package peercred

import (
	"errors"
	"os"
	"os/exec"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestParseStartTime(t *testing.T) {
	line := "1234 (a) b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000000 200 18446744073709551615\n"
	if got, err := parseStartTime([]byte(line)); err != nil || got != 98765 {
		t.Errorf("parseStartTime = %d, %v; want 98765", got, err)
	}
	for _, bad := range []string{"", "1 (x", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 zz"} {
		if _, err := parseStartTime([]byte(bad)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("parseStartTime(%q) = %v, want ErrInvalidArgument", bad, err)
		}
	}
}

func FuzzParseStartTime(f *testing.F) {
	f.Add([]byte("1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 7 1 2 3\n"))
	f.Add([]byte("1 ()) ) S"))
	f.Fuzz(func(t *testing.T, b []byte) { parseStartTime(b) })
}

func TestRepin(t *testing.T) {
	self, err := Open(int32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	start, err := self.Stamp()
	self.Close()
	if err != nil {
		t.Fatal(err)
	}
	p, err := Repin(int32(os.Getpid()), start)
	if err != nil {
		t.Fatalf("Repin(self): %v", err)
	}
	p.Close()
	if _, err := Repin(int32(os.Getpid()), start+1); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Repin with another start time = %v, want ErrNotFound (pid reuse)", err)
	}
	// A process that has exited and been reaped is gone.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("no true(1): %v", err)
	}
	if _, err := Repin(int32(cmd.Process.Pid), 1); err == nil {
		t.Errorf("Repin of an exited pid succeeded")
	}
}
