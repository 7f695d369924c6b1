package vm_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/test/vm/vmrig"
)

// newerKeys are unit settings the host's systemd may predate, with the version that
// introduced them: systemd-analyze verify of an older systemd warns about them.
var newerKeys = map[string]int{
	"FileDescriptorStorePreserve": 254,
}

// TestDeployUnitsVerify runs the host's `systemd-analyze verify` on deploy/'s units (offline:
// nothing is installed or started). The authoritative check is the guest's systemd 257
// (TestVM/<kernel>-systemd/systemd/TestUnitsVerify); this one catches typos without a VM.
// Warnings about settings newer than the host's systemd, and about the daemon binary not
// being installed on the host, are logged, not failures.
func TestDeployUnitsVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("no systemd-analyze on this host; the rig's systemd guest verifies the units")
	}
	root, err := vmrig.FindRepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	units, _ := filepath.Glob(filepath.Join(root, "deploy", "*.service"))
	sockets, _ := filepath.Glob(filepath.Join(root, "deploy", "*.socket"))
	units = append(units, sockets...)
	if len(units) == 0 {
		t.Fatal("no units in deploy/")
	}
	verOut, err := exec.Command(sa, "--version").Output()
	if err != nil {
		t.Fatalf("systemd-analyze --version: %v", err)
	}
	version := 0
	if m := regexp.MustCompile(`^systemd (\d+)`).FindSubmatch(verOut); m != nil {
		version, _ = strconv.Atoi(string(m[1]))
	}
	// Copies in a private directory: verify loads units by file name from there.
	dir := t.TempDir()
	var paths []string
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command(sa, append([]string{"verify", "--man=no"}, paths...)...)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, _ := cmd.CombinedOutput()
	reUnknown := regexp.MustCompile(`Unknown key '?(\w+)'? in section`)
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l == "" {
			continue
		}
		if m := reUnknown.FindStringSubmatch(l); m != nil {
			if since, ok := newerKeys[m[1]]; ok && version > 0 && version < since {
				t.Logf("host systemd %d predates %s= (systemd %d): %s", version, m[1], since, l)
				continue
			}
		}
		if strings.Contains(l, "Command /usr/bin/mmiobrokerd is not executable") {
			t.Logf("not installed on the host (expected): %s", l)
			continue
		}
		t.Errorf("systemd-analyze verify (systemd %d): %s", version, l)
	}
}
