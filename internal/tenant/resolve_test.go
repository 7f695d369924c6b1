package tenant

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// *peercred.Process is what the daemon passes to ResolveProcess.
var _ Process = (*peercred.Process)(nil)

const (
	pidVM      = 101 // qemu of a libvirt VM
	pidVCPU    = 102 // same VM, threaded sub-cgroup
	pidVM2     = 103 // another VM
	pidPod     = 104 // KubeVirt virt-launcher
	pidShell   = 105 // a user's shell
	pidService = 106 // a system service
	pidNS      = 107 // seen from another cgroup namespace
	pidV1      = 108 // a v1-only host
	pidMissing = 199
)

const (
	vm1 = `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`
	vm2 = `/machine.slice/machine-qemu\x2d2\x2dvm2.scope`
	pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c0d4e_2b7a_4c1e_9a55_0f3e8d2c1b7a.slice"
)

func resolverProc(t *testing.T) string {
	return fakeProc(t, map[int32]string{
		pidVM:      "0::" + vm1 + "/libvirt/emulator\n",
		pidVCPU:    "0::" + vm1 + "/libvirt/vcpu0\n",
		pidVM2:     "0::" + vm2 + "/libvirt/emulator\n",
		pidPod:     "0::" + pod + "/cri-containerd-0123.scope\n",
		pidShell:   hybridFile,
		pidService: "0::/system.slice/libvirtd.service\n",
		pidNS:      "0::/../machine.slice/x.scope\n",
		pidV1:      v1File,
	})
}

func TestResolve(t *testing.T) {
	root := resolverProc(t)
	const svirt = "system_u:system_r:svirt_t:s0:c10,c20"
	tests := []struct {
		name  string
		r     Resolver
		uid   uint32
		pid   int32
		label string
		want  ID
		err   error
	}{
		// ByUID never looks at /proc or the label.
		{"uid", Resolver{Mode: ByUID, ProcRoot: root}, 107, pidVM, svirt, "uid=107", nil},
		{"uid missing pid", Resolver{Mode: ByUID, ProcRoot: root}, 107, pidMissing, "", "uid=107", nil},
		// ByCgroup.
		{"cgroup vm", Resolver{Mode: ByCgroup, ProcRoot: root}, 107, pidVM, "", ID("uid=107,cgroup=" + vm1), nil},
		{"cgroup vcpu thread", Resolver{Mode: ByCgroup, ProcRoot: root}, 107, pidVCPU, "", ID("uid=107,cgroup=" + vm1), nil},
		{"cgroup other vm", Resolver{Mode: ByCgroup, ProcRoot: root}, 107, pidVM2, "", ID("uid=107,cgroup=" + vm2), nil},
		{"cgroup ignores label", Resolver{Mode: ByCgroup, ProcRoot: root}, 107, pidVM, svirt, ID("uid=107,cgroup=" + vm1), nil},
		{"cgroup pod", Resolver{Mode: ByCgroup, ProcRoot: root}, 107, pidPod, "", ID("uid=107,cgroup=" + pod), nil},
		{"cgroup pod without parents", Resolver{Mode: ByCgroup, Units: []string{}, ProcRoot: root}, 107, pidPod, "", ID("uid=107,cgroup=" + pod), nil},
		{"cgroup vm without parents", Resolver{Mode: ByCgroup, Units: []string{}, ProcRoot: root}, 107, pidVM, "", "uid=107", nil},
		{"cgroup shell", Resolver{Mode: ByCgroup, ProcRoot: root}, 1000, pidShell, "", "uid=1000", nil},
		{"cgroup service", Resolver{Mode: ByCgroup, ProcRoot: root}, 0, pidService, "", "uid=0", nil},
		{"cgroup service with system.slice", Resolver{Mode: ByCgroup, Units: []string{"/machine.slice", "/system.slice"}, ProcRoot: root},
			0, pidService, "", "uid=0,cgroup=/system.slice/libvirtd.service", nil},
		{"zero mode is cgroup", Resolver{ProcRoot: root}, 107, pidVM, "", ID("uid=107,cgroup=" + vm1), nil},
		{"cgroup gone", Resolver{ProcRoot: root}, 107, pidMissing, "", "", errdefs.ErrNotFound},
		{"cgroup namespace", Resolver{ProcRoot: root}, 107, pidNS, "", "", errdefs.ErrFailedPrecondition},
		{"cgroup v1 host", Resolver{ProcRoot: root}, 107, pidV1, "", "", errdefs.ErrNotSupported},
		{"cgroup bad pid", Resolver{ProcRoot: root}, 107, 0, "", "", errdefs.ErrInvalidArgument},
		// ByLabel.
		{"label", Resolver{Mode: ByLabel, ProcRoot: root}, 107, pidVM, svirt, ID("uid=107,label=" + svirt), nil},
		{"label needs no proc", Resolver{Mode: ByLabel, ProcRoot: root}, 107, pidMissing, svirt, ID("uid=107,label=" + svirt), nil},
		{"label empty falls back to cgroup", Resolver{Mode: ByLabel, ProcRoot: root}, 107, pidVM, "", ID("uid=107,cgroup=" + vm1), nil},
		{"label empty outside units", Resolver{Mode: ByLabel, ProcRoot: root}, 1000, pidShell, "", "uid=1000", nil},
		{"label empty and gone", Resolver{Mode: ByLabel, ProcRoot: root}, 107, pidMissing, "", "", errdefs.ErrNotFound},
		{"label too long", Resolver{Mode: ByLabel, ProcRoot: root}, 107, pidVM, strings.Repeat("l", MaxLabel+1), "", errdefs.ErrInvalidArgument},
		// Invalid input.
		{"bad mode", Resolver{Mode: 9, ProcRoot: root}, 107, pidVM, "", "", errdefs.ErrInvalidArgument},
		{"invalid uid", Resolver{Mode: ByUID}, InvalidUID, pidVM, "", "", errdefs.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.r.Resolve(tt.uid, tt.pid, tt.label)
			if tt.err != nil {
				if !errors.Is(err, tt.err) || got != "" {
					t.Errorf("Resolve = %q, %v; want an error matching %v", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("Resolve = %q, %v; want %q", got, err, tt.want)
			}
			if _, err := ParseID(string(got)); err != nil {
				t.Errorf("Resolve returned a malformed ID: %v", err)
			}
			if got.UID() != tt.uid {
				t.Errorf("%q.UID() = %d; want %d", got, got.UID(), tt.uid)
			}
		})
	}
}

func TestResolverValidate(t *testing.T) {
	for _, r := range []Resolver{
		{},
		{Mode: ByUID},
		{Mode: ByLabel, Units: []string{"/machine.slice", "/vms.slice", "/system.slice"}, ProcRoot: "/proc"},
		{Units: []string{}},
	} {
		if err := r.Validate(); err != nil {
			t.Errorf("%+v.Validate() = %v", r, err)
		}
	}
	for _, tt := range []struct {
		r    Resolver
		want string
	}{
		{Resolver{Mode: 4}, "Mode(4)"},
		{Resolver{Units: []string{"machine.slice"}}, `"machine.slice"`},
		{Resolver{Units: []string{"/machine.slice/"}}, `"/machine.slice/"`},
		{Resolver{Units: []string{"/a/../b"}}, `"/a/../b"`},
		{Resolver{Units: []string{"/"}}, "root"},
		{Resolver{Units: []string{"/a", "/a"}}, "twice"},
		{Resolver{Units: []string{"/a/b", "/a"}}, "below"},
		{Resolver{ProcRoot: "proc"}, "proc root"},
	} {
		err := tt.r.Validate()
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v.Validate() = %v; want ErrInvalidArgument mentioning %s", tt.r, err, tt.want)
		}
	}
}

// fakeProcess is a pinned process whose liveness the test sets.
type fakeProcess struct {
	pid   int32
	alive bool
	polls int
}

func (p *fakeProcess) PID() int32  { return p.pid }
func (p *fakeProcess) Alive() bool { p.polls++; return p.alive }

func TestResolveProcessFake(t *testing.T) {
	root := resolverProc(t)
	r := Resolver{ProcRoot: root}

	live := &fakeProcess{pid: pidVM, alive: true}
	if got, err := r.ResolveProcess(107, live, ""); err != nil || got != ID("uid=107,cgroup="+vm1) || live.polls != 1 {
		t.Errorf("ResolveProcess(live) = %q, %v after %d polls; want the VM's unit after 1 poll", got, err, live.polls)
	}
	// The pinned peer died: the cgroup read may be another process's.
	dead := &fakeProcess{pid: pidVM}
	if got, err := r.ResolveProcess(107, dead, ""); !errors.Is(err, errdefs.ErrNotFound) || got != "" {
		t.Errorf("ResolveProcess(dead) = %q, %v; want ErrNotFound", got, err)
	}
	// Nothing read from /proc, nothing to check.
	dead.polls = 0
	if got, err := (Resolver{Mode: ByUID}).ResolveProcess(107, dead, ""); err != nil || got != "uid=107" || dead.polls != 0 {
		t.Errorf("ResolveProcess(ByUID, dead) = %q, %v after %d polls; want uid=107 without a poll", got, err, dead.polls)
	}
	if got, err := (Resolver{Mode: ByLabel}).ResolveProcess(107, dead, "l"); err != nil || got != "uid=107,label=l" || dead.polls != 0 {
		t.Errorf("ResolveProcess(ByLabel, dead) = %q, %v after %d polls; want uid=107,label=l without a poll", got, err, dead.polls)
	}
	if _, err := r.ResolveProcess(107, nil, ""); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ResolveProcess(nil) error = %v; want ErrInvalidArgument", err)
	}
}

// TestResolveProcessPidReuse pins a real child with a pidfd, lets it exit, and plants a
// cgroup file for its pid, as if the pid had been reused by a process in another VM.
func TestResolveProcessPidReuse(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	pid := int32(cmd.Process.Pid)
	p, err := peercred.Open(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	r := Resolver{ProcRoot: fakeProc(t, map[int32]string{pid: "0::" + vm2 + "/libvirt/emulator\n"})}

	if got, err := r.ResolveProcess(107, p, ""); err != nil || got != ID("uid=107,cgroup="+vm2) {
		t.Fatalf("ResolveProcess(live child) = %q, %v; want %s's unit", got, err, vm2)
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	if got, err := r.ResolveProcess(107, p, ""); !errors.Is(err, errdefs.ErrNotFound) || got != "" {
		t.Errorf("ResolveProcess(exited child, pid file present) = %q, %v; want ErrNotFound", got, err)
	}
}

// TestResolveProcessSelf resolves this test process through the real /proc.
func TestResolveProcessSelf(t *testing.T) {
	p, err := peercred.Open(int32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	cg, err := ReadCgroup("", p.PID())
	if errors.Is(err, errdefs.ErrNotSupported) {
		t.Skipf("host has no cgroup v2 hierarchy: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	uid := uint32(os.Getuid())
	want := ForUID(uid)
	if unit, ok := Unit(cg, DefaultUnits()); ok {
		want = forUnit(uid, unit)
	}
	got, err := Resolver{}.ResolveProcess(uid, p, "")
	if errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Skipf("this process's cgroup %q is outside the test's cgroup namespace view: %v", cg, err)
	}
	if err != nil || got != want {
		t.Errorf("ResolveProcess(self) = %q, %v; want %q (cgroup %s)", got, err, want, cg)
	}
}
