package tenant

import (
	"strings"
	"testing"
)

func TestUnit(t *testing.T) {
	const (
		libvirtScope = `/machine.slice/machine-qemu\x2d3\x2dvm1.scope`
		podUID       = "6f1c0d4e_2b7a_4c1e_9a55_0f3e8d2c1b7a"
		podUIDDash   = "6f1c0d4e-2b7a-4c1e-9a55-0f3e8d2c1b7a"
		ctr          = "cri-containerd-0123456789abcdef.scope"
	)
	machine := []string{"/machine.slice"}
	withSystem := []string{"/machine.slice", "/system.slice"}
	tests := []struct {
		name    string
		p       string
		parents []string
		want    string // "" means no unit
	}{
		// libvirt under systemd: qemu's emulator and vcpu threads are one unit.
		{"libvirt emulator", libvirtScope + "/libvirt/emulator", machine, libvirtScope},
		{"libvirt vcpu", libvirtScope + "/libvirt/vcpu0", machine, libvirtScope},
		{"libvirt scope itself", libvirtScope, machine, libvirtScope},
		{"libvirt no parents", libvirtScope + "/libvirt/emulator", nil, ""},
		{"parent itself", "/machine.slice", machine, ""},
		{"custom parent", "/vms.slice/vm-7.scope/qemu", []string{"/vms.slice"}, "/vms.slice/vm-7.scope"},
		{"parent is a prefix of a name only", "/machine.slice2/x.scope", machine, ""},
		// systemd-nspawn, as a service and as a scope.
		{"nspawn service", "/machine.slice/systemd-nspawn@debian.service/payload/init.scope", machine, "/machine.slice/systemd-nspawn@debian.service"},
		{"nspawn scope", "/machine.slice/machine-debian.scope/payload", machine, "/machine.slice/machine-debian.scope"},
		// KubeVirt, systemd driver.
		{"k8s systemd burstable", "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podUID + ".slice/" + ctr, nil,
			"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podUID + ".slice"},
		{"k8s systemd besteffort", "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + podUID + ".slice/" + ctr, machine,
			"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + podUID + ".slice"},
		{"k8s systemd guaranteed", "/kubepods.slice/kubepods-pod" + podUID + ".slice/" + ctr + "/housekeeping", machine,
			"/kubepods.slice/kubepods-pod" + podUID + ".slice"},
		{"k8s systemd pod slice itself", "/kubepods.slice/kubepods-pod" + podUID + ".slice", machine,
			"/kubepods.slice/kubepods-pod" + podUID + ".slice"},
		{"k8s systemd qos slice only", "/kubepods.slice/kubepods-burstable.slice", machine, ""},
		{"k8s systemd kubepods only", "/kubepods.slice", machine, ""},
		{"k8s systemd pod of wrong qos prefix", "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod" + podUID + ".slice/" + ctr, machine, ""},
		{"k8s systemd uid with dash", "/kubepods.slice/kubepods-pod" + podUIDDash + ".slice/" + ctr, machine, ""},
		{"k8s systemd empty uid", "/kubepods.slice/kubepods-pod.slice/" + ctr, machine, ""},
		// KubeVirt, cgroupfs driver.
		{"k8s cgroupfs burstable", "/kubepods/burstable/pod" + podUIDDash + "/0123456789abcdef", machine,
			"/kubepods/burstable/pod" + podUIDDash},
		{"k8s cgroupfs besteffort", "/kubepods/besteffort/pod" + podUIDDash + "/0123456789abcdef", machine,
			"/kubepods/besteffort/pod" + podUIDDash},
		{"k8s cgroupfs guaranteed", "/kubepods/pod" + podUIDDash + "/0123456789abcdef", machine, "/kubepods/pod" + podUIDDash},
		{"k8s cgroupfs no pod", "/kubepods/burstable", machine, ""},
		{"k8s cgroupfs bad pod name", "/kubepods/burstable/pod/x", machine, ""},
		// Kubelets below a prefix: kind nodes, containerized kubelets, --cgroup-root.
		{"k8s nested systemd", "/system.slice/docker-abc.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podUID + ".slice/" + ctr, machine,
			"/system.slice/docker-abc.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podUID + ".slice"},
		{"k8s cgroup-root systemd", "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + podUID + ".slice/" + ctr, machine,
			"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + podUID + ".slice"},
		{"k8s nested cgroupfs", "/docker/abc/kubepods/burstable/pod" + podUIDDash + "/def", machine, "/docker/abc/kubepods/burstable/pod" + podUIDDash},
		// The outermost unit wins.
		{"k8s in a configured parent", "/system.slice/docker-abc.scope/kubepods.slice/kubepods-pod" + podUID + ".slice/" + ctr, withSystem,
			"/system.slice/docker-abc.scope"},
		{"fake pod inside a VM", libvirtScope + "/kubepods.slice/kubepods-pod" + podUID + ".slice", machine, libvirtScope},
		{"fake pod inside a pod", "/kubepods.slice/kubepods-pod" + podUID + ".slice/" + ctr + "/kubepods.slice/kubepods-podabc.slice", machine,
			"/kubepods.slice/kubepods-pod" + podUID + ".slice"},
		{"only the first kubepods counts", "/kubepods.slice/kubepods-burstable.slice/x/kubepods.slice/kubepods-podabc.slice", machine, ""},
		{"nested parents", "/vms.slice/a.slice/vm.scope", []string{"/vms.slice/a.slice", "/vms.slice"}, "/vms.slice/a.slice"},
		// Peers in no unit.
		{"user session", "/user.slice/user-1000.slice/session-3.scope", machine, ""},
		{"user manager", "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", machine, ""},
		{"system service", "/system.slice/mmiobrokerd.service", machine, ""},
		{"system service with system.slice", "/system.slice/mmiobrokerd.service", withSystem, "/system.slice/mmiobrokerd.service"},
		{"root", "/", machine, ""},
		{"root parent ignored", "/user.slice/user-1000.slice", []string{"/"}, ""},
		{"bad parent ignored", libvirtScope + "/libvirt", []string{"machine.slice", "/machine.slice/"}, ""},
		// Paths Unit refuses.
		{"empty", "", machine, ""},
		{"relative", "machine.slice/machine-qemu.scope", machine, ""},
		{"dotdot", "/machine.slice/../machine.slice/x.scope", machine, ""},
		{"outside the cgroup namespace", "/../../machine.slice/x.scope/libvirt", machine, ""},
		{"dot", "/machine.slice/./x.scope", machine, ""},
		{"trailing slash", "/machine.slice/x.scope/", machine, ""},
		{"double slash", "/machine.slice//x.scope", machine, ""},
		{"newline", "/machine.slice/x\n.scope", machine, ""},
		{"nul", "/machine.slice/x\x00.scope", machine, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := Unit(tt.p, tt.parents)
			if got != tt.want || ok != (tt.want != "") {
				t.Errorf("Unit(%q, %q) = %q, %v; want %q, %v", tt.p, tt.parents, got, ok, tt.want, tt.want != "")
			}
			if ok {
				// A unit is its own unit.
				if again, ok := Unit(got, tt.parents); !ok || again != got {
					t.Errorf("Unit(%q) = %q, %v; want itself", got, again, ok)
				}
			}
		})
	}
}

func TestDefaultUnitsFresh(t *testing.T) {
	DefaultUnits()[0] = "/changed"
	if got := DefaultUnits(); len(got) != 1 || got[0] != "/machine.slice" {
		t.Errorf("DefaultUnits() = %q after a caller changed an earlier result", got)
	}
}

func TestPodUID(t *testing.T) {
	for _, c := range []struct {
		unit, uid string
		ok        bool
	}{
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d1c_4e2a_11f0_9c3b_0242ac120002.slice", "8d1c-4e2a-11f0-9c3b-0242ac120002", true},
		{"/kubepods.slice/kubepods-pod0a1b2c3d_0000_1111_2222_333344445555.slice", "0a1b2c3d-0000-1111-2222-333344445555", true},
		{"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podabc_def.slice", "abc-def", true},
		{"/kubepods/burstable/pod8d1c4e2a-11f0-9c3b-0242ac120002", "8d1c4e2a-11f0-9c3b-0242ac120002", true},
		{"/kubepods/pod1234", "1234", true},
		// not exactly a pod's unit
		{"/kubepods/burstable/pod1234/cri-containerd-abc.scope", "", false},
		{"/kubepods.slice/kubepods-burstable.slice", "", false},
		{"/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope", "", false},
		{"kubepods/pod1234", "", false},
		{"", "", false},
	} {
		uid, ok := PodUID(c.unit)
		if uid != c.uid || ok != c.ok {
			t.Errorf("PodUID(%q) = %q, %v; want %q, %v", c.unit, uid, ok, c.uid, c.ok)
		}
		if ok && !ValidPodUID(uid) {
			t.Errorf("PodUID(%q) = %q, which ValidPodUID refuses", c.unit, uid)
		}
	}
	for _, s := range []string{"", "a/b", "a_b", "ü", strings.Repeat("a", 129)} {
		if ValidPodUID(s) {
			t.Errorf("ValidPodUID(%q) = true", s)
		}
	}
}
