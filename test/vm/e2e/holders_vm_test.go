//go:build vmtest

package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestE2EHolders: `mmiobrokerctl allocate -exec` claims a lease (it is the lease's
// holder), runs a shell with the dma-buf as fd 3 and closes its own copy; the shell and
// the `mmiobrokerctl holders` it runs (which inherits fd 3 too) are processes the fd was
// passed on to. The scan, run from inside that shell while the lease is live, must find
// both as passed_on by pid and fd on the real kernel's /proc, and nothing held by the
// allocating process any more.
func TestE2EHolders(t *testing.T) {
	d := startDaemon(t)
	dir := t.TempDir()
	shPID, report := filepath.Join(dir, "sh.pid"), filepath.Join(dir, "holders.json")
	script := `echo $$ >` + shPID + `; echo $PPID >` + shPID + `.parent; ` +
		`mmiobrokerctl -socket ` + d.control + ` -json holders >` + report + `; echo done`
	out, code := d.ctl(t, 0, "allocate", "-exec", env(t, "IVSHMEM"), "2", "--", "/bin/sh", "-c", script)
	if code != 0 || !strings.Contains(out, "done") {
		t.Fatalf("allocate -exec sh: exit %d", code)
	}
	readPID := func(path string) int {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return n
	}
	sh, holder := readPID(shPID), readPID(shPID+".parent")
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("holders, from inside the -exec shell (pid %d, parent %d):\n%s", sh, holder, b)
	var s struct {
		Leases []struct {
			Lease struct {
				ID     string `json:"id"`
				Holder struct {
					PID int `json:"pid"`
				} `json:"holder"`
			} `json:"lease"`
			Holders []struct {
				PID     int    `json:"pid"`
				FD      int    `json:"fd"`
				Role    string `json:"role"`
				Current bool   `json:"current_generation"`
			} `json:"holders"`
		} `json:"leases"`
		Unaccounted []any `json:"unaccounted"`
	}
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	if len(s.Leases) != 1 {
		t.Fatalf("holders reports %d leases, want the one -exec holds", len(s.Leases))
	}
	l := s.Leases[0]
	if l.Lease.Holder.PID != holder {
		t.Errorf("lease holder pid %d, want the allocating mmiobrokerctl %d", l.Lease.Holder.PID, holder)
	}
	passed, shell := 0, false
	for _, h := range l.Holders {
		if !h.Current {
			t.Errorf("pid %d fd %d: not the current generation", h.PID, h.FD)
		}
		switch {
		case h.PID == holder:
			t.Errorf("the allocating mmiobrokerctl (pid %d) still holds the dma-buf as fd %d after -exec", h.PID, h.FD)
		case h.Role == "HOLDER_ROLE_PASSED_ON" && h.FD == 3:
			passed++
			shell = shell || h.PID == sh
		default:
			t.Errorf("pid %d fd %d: role %s, want the shell or its mmiobrokerctl holders, passed_on with fd 3", h.PID, h.FD, h.Role)
		}
	}
	if passed != 2 || !shell {
		t.Errorf("want the shell (pid %d) and its mmiobrokerctl holders, each passed_on with fd 3; got %+v", sh, l.Holders)
	}
	if len(s.Unaccounted) != 0 {
		t.Errorf("unaccounted dma-bufs: %v", s.Unaccounted)
	}
}
