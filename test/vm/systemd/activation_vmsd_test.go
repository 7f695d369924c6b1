//go:build vmsystemd

package systemd

import (
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The tests run in this order: the first client connection must be TestSocketActivation's.

// TestUnitsVerify: systemd-analyze verify of the installed units prints nothing (any
// warning is a failure).
func TestUnitsVerify(t *testing.T) {
	var paths []string
	for _, u := range []string{service, controlUnit, claimUnit} {
		paths = append(paths, filepath.Join(unitDir, u))
	}
	out, err := run(time.Minute, "systemd-analyze", append([]string{"verify", "--no-pager"}, paths...)...)
	if err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", strings.Join(paths, " "), err, out)
	}
	t.Logf("systemd-analyze verify: clean (%s)", strings.TrimSpace(must(t, "systemctl", "--version")))
}

// TestSecurityExposure logs systemd-analyze security of the service and fails above 2.0.
func TestSecurityExposure(t *testing.T) {
	out, _ := run(time.Minute, "systemd-analyze", "security", "--no-pager", service)
	var kept []string
	for _, l := range strings.Split(out, "\n") {
		// the lines that count against the service (✗) and the verdict
		if strings.Contains(l, "✗") || strings.Contains(l, "Overall exposure") {
			kept = append(kept, strings.TrimRight(l, " "))
		}
	}
	t.Logf("systemd-analyze security %s (exposed settings):\n%s", service, strings.Join(kept, "\n"))
	exp, err := parseExposure(out)
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	t.Logf("exposure %.1f (goal: at most 2.0)", exp)
	if exp > 2.0 {
		t.Errorf("exposure %.1f, want at most 2.0", exp)
	}
}

// TestSocketActivation: systemd listens on both sockets (mode 0660, group mmiobroker) and
// the service is inactive until the first client: `mmiobrokerctl devices` starts it and
// lists every rig device.
func TestSocketActivation(t *testing.T) {
	g, err := user.LookupGroup("mmiobroker")
	if err != nil {
		t.Fatalf("group mmiobroker (deploy/sysusers.d): %v", err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	for _, s := range []struct{ unit, path string }{{controlUnit, controlSock}, {claimUnit, claimSock}} {
		if st := show(t, s.unit); st.Active != "active" {
			t.Errorf("%s: %v, want active", s.unit, st)
		}
		fi, err := os.Lstat(s.path)
		if err != nil {
			t.Errorf("%s: %v", s.unit, err)
			continue
		}
		sys := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 || int(sys.Gid) != gid || sys.Uid != 0 {
			t.Errorf("%s: mode %v uid %d gid %d, want a socket 0660 root:mmiobroker (gid %d)", s.path, fi.Mode(), sys.Uid, sys.Gid, gid)
		}
	}
	if st := show(t, service); st.Active != "inactive" {
		t.Fatalf("%s before any client: %v, want inactive (socket activation)", service, st)
	}
	start := time.Now()
	out, err := ctl("devices")
	if err != nil {
		j := journal(service, 40)
		if legacyListenError(j) {
			notActivatable = "mmiobrokerd does not take its sockets from systemd yet ($LISTEN_FDS with the names control and claim): it creates them itself and finds systemd listening there"
			t.Skipf("%s\nmmiobrokerctl devices: %v\n%s", notActivatable, err, j)
		}
		t.Fatalf("first mmiobrokerctl devices (activation): %v\n%s\n%s", err, out, j)
	}
	t.Logf("activation + mmiobrokerctl devices took %v:\n%s", time.Since(start).Round(time.Millisecond), out)
	for _, bdf := range rigDevices(t) {
		if !strings.Contains(out, bdf) {
			t.Errorf("mmiobrokerctl devices does not list %s", bdf)
		}
	}
	if st := show(t, service); !active(st) {
		t.Errorf("%s after the first client: %v, want active with a main PID", service, st)
	}
}

// TestSandbox checks the daemon's namespaces as the unit sets them up: the VFIO nodes are in
// its private /dev, it has no capabilities, and /sys is read-only except the PCI binding
// files.
func TestSandbox(t *testing.T) {
	requireDaemon(t)
	st := waitUnit(t, "daemon running", 30*time.Second, active)
	root := "/proc/" + strconv.Itoa(st.MainPID)
	ents, err := os.ReadDir(root + "/root/dev/vfio")
	if err != nil {
		t.Errorf("the daemon's /dev/vfio: %v", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	t.Logf("the daemon's /dev/vfio: %v", names)
	if os.Getenv("MMIOBROKER_VM_KERNEL") == "iommufd" {
		if _, err := os.Stat(root + "/root/dev/iommu"); err != nil {
			t.Errorf("the daemon's /dev/iommu: %v", err)
		}
	}
	if _, err := os.Stat(root + "/root/dev/mem"); err == nil {
		t.Error("the daemon sees /dev/mem: PrivateDevices= is not in effect")
	}
	status, err := os.ReadFile(root + "/status")
	if err != nil {
		t.Fatal(err)
	}
	// CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19), for the holder scan, and nothing else.
	const caps = "0000000000080004"
	for _, want := range []string{"CapBnd:\t" + caps, "CapEff:\t" + caps, "NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want+"\n") {
			t.Errorf("the daemon's /proc/PID/status lacks %q", want)
		}
	}
	mounts, err := os.ReadFile(root + "/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ro := map[string]bool{}
	for _, l := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(l)
		if len(f) > 5 {
			ro[f[4]] = strings.HasPrefix(f[5], "ro")
		}
	}
	for mp, wantRO := range map[string]bool{"/sys": true, "/sys/devices": false, "/sys/bus/pci": false, "/": true, "/run/mmiobroker": false} {
		if got, ok := ro[mp]; !ok {
			t.Errorf("no mount at %s in the daemon's namespace", mp)
		} else if got != wantRO {
			t.Errorf("%s in the daemon's namespace: read-only %v, want %v", mp, got, wantRO)
		}
	}
}

// TestRestart: systemctl restart gives a new main process, and the CLI works again.
func TestRestart(t *testing.T) {
	requireDaemon(t)
	before := waitUnit(t, "daemon running", 30*time.Second, active)
	start := time.Now()
	must(t, "systemctl", "restart", service)
	t.Logf("systemctl restart returned after %v", time.Since(start).Round(time.Millisecond))
	waitUnit(t, "restarted", 30*time.Second, func(s unitState) bool { return active(s) && s.MainPID != before.MainPID })
	devicesListed(t)
}

// TestKillRestarts: kill -9 of the main process is a failure, and Restart=on-failure starts
// a new one.
func TestKillRestarts(t *testing.T) {
	requireDaemon(t)
	before := waitUnit(t, "daemon running", 30*time.Second, active)
	if err := syscall.Kill(before.MainPID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", before.MainPID, err)
	}
	waitUnit(t, "restarted by systemd after kill -9", 30*time.Second, func(s unitState) bool {
		return active(s) && s.MainPID != before.MainPID && s.NRestarts > before.NRestarts
	})
	devicesListed(t)
}

// TestStopReactivates: after systemctl stop the sockets stay (units active, files in place),
// and the next client starts the daemon again.
func TestStopReactivates(t *testing.T) {
	requireDaemon(t)
	waitUnit(t, "daemon running", 30*time.Second, active)
	must(t, "systemctl", "stop", service)
	if st := show(t, service); st.Active != "inactive" {
		t.Fatalf("after systemctl stop: %v, want inactive", st)
	}
	for _, s := range []struct{ unit, path string }{{controlUnit, controlSock}, {claimUnit, claimSock}} {
		if st := show(t, s.unit); st.Active != "active" {
			t.Errorf("%s after stopping the service: %v, want active", s.unit, st)
		}
		if _, err := os.Lstat(s.path); err != nil {
			t.Errorf("after stopping the service: %v", err)
		}
	}
	start := time.Now()
	devicesListed(t)
	t.Logf("re-activation + mmiobrokerctl devices took %v", time.Since(start).Round(time.Millisecond))
	waitUnit(t, "re-activated", 30*time.Second, active)
}
