//go:build vmtest

package dravm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/dra"
	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
	"github.com/mmiobroker/mmiobroker/test/vm/guestd"
)

// The rig's revocation bound R for this test: short, so that the unprepare's end of the
// lease is seen to kill the fd within it.
const vmRevokeWithin = 2 * time.Second

// vmDMAOffset is where in the ivshmem BAR the pod's DMA lands; test/vm's host side
// looks for vmDMATag there in the BAR's backing file (checkDRAFromHost).
const (
	vmDMAOffset = "0x60000"
	vmDMATag    = "MMB-DRA-P2P-LANDED"
)

// The claim socket's group (the daemon's socket_group; the socket is 0660) and the
// user the pod's VMM runs as: KubeVirt's QEMU is 107:107 and is given the socket's group
// only as a supplementary group, from the CDI spec's additionalGids. The group is not the
// VMM's own gid, so that the VMM can connect through the spec's group alone.
const (
	vmSocketGID = 4107
	vmmUID      = 107
	vmmGID      = 107
)

func vmEnv(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv("MMIOBROKER_VM_" + name)
	if v == "" {
		t.Fatalf("MMIOBROKER_VM_%s is not set: run in the rig (make test-vm)", name)
	}
	return v
}

// startVMDaemon runs the guest's mmiobrokerd on the ivshmem device, tenants by cgroup,
// R = vmRevokeWithin, its sockets 0660 and of group vmSocketGID as on a host whose VMMs
// run unprivileged, and waits for its READY=1.
func startVMDaemon(t *testing.T, dir, ivshmem string) (control, claim string) {
	t.Helper()
	control, claim = filepath.Join(dir, "control.sock"), filepath.Join(dir, "fd.sock")
	cfg := fmt.Sprintf(`
[daemon]
control_socket = %q
claim_socket = %q
claim_socket_mode = "0660"
socket_group = %d
log_level = "debug"

[limits]
revoke_within = %q
tenant_cycle_interval = "1s"

[tenants]
by = "cgroup"

[[device]]
address = %q
bars = [2]
`, control, claim, vmSocketGID, vmRevokeWithin.String(), ivshmem)
	cfgPath := filepath.Join(dir, "mmiobrokerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	guestd.Start(t, dir, cfgPath)
	return control, claim
}

// startPlugin runs the plugin in this process until the test ends, logging to t.
func startPlugin(t *testing.T, opt dra.Options) {
	t.Helper()
	opt.NodeName = dratest.Node
	opt.Log = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	for _, d := range []string{opt.CDIDir, opt.PluginDataDir, opt.RegistrarDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	d, err := dra.Start(context.Background(), opt)
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Errorf("plugin stop: %v", err)
		}
	})
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// readSpec reads the CDI spec file the plugin wrote, strictly.
func readSpec(t *testing.T, path string) *cdispec.Spec {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("cdi spec: %v", err)
	}
	var spec cdispec.Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		t.Fatalf("cdi spec %s: %v", path, err)
	}
	return &spec
}

// podCgroup creates the cgroup the kubelet (systemd cgroup driver) gives a burstable pod
// and returns its path; it is removed when the test ends.
func podCgroup(t *testing.T, uid types.UID) string {
	t.Helper()
	path := filepath.Join("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice",
		"kubepods-burstable-pod"+strings.ReplaceAll(string(uid), "-", "_")+".slice")
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatalf("pod cgroup: %v", err)
	}
	t.Cleanup(func() {
		for _, p := range []string{path, filepath.Dir(path), filepath.Dir(filepath.Dir(path))} {
			if err := os.Remove(p); err != nil && !os.IsNotExist(err) && !strings.Contains(err.Error(), "busy") {
				t.Errorf("remove cgroup: %v", err)
			}
		}
	})
	return path
}

// child is a re-executed test binary in a runtime's role (see runChild).
type child struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	done  chan error
}

// startChild starts a child with exactly the CDI device's environment (and PATH), in a
// new mount namespace, in cgroup (if not ""). As the runtime it applies the device's
// mounts and the device nodes, and runs the VMM as user (nil: root); what the runtime
// adds to user's groups from the spec is the caller's (cdiGIDs).
func startChild(t *testing.T, mode string, spec *cdispec.Spec, device, cgroup string, user *containerUser, nodes []*cdispec.DeviceNode) *child {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	rt := runtimeSpec{DeviceNodes: nodes, User: user}
	for _, edits := range []cdispec.ContainerEdits{spec.ContainerEdits, specDevice(t, spec, device).ContainerEdits} {
		env = append(env, edits.Env...)
		rt.Mounts = append(rt.Mounts, edits.Mounts...)
	}
	rj, err := json.Marshal(rt)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(env, "PATH="+os.Getenv("PATH"), childEnv+"="+mode, runtimeEnv+"="+string(rj))
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if cgroup != "" {
		fd, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
	}
	cmd.Stderr = os.Stderr
	c := &child{cmd: cmd, lines: make(chan string, 16), done: make(chan error, 1)}
	if c.in, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		c.in.Close()
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-c.done
		}
	})
	return c
}

// line returns the child's next output line (30 s at most).
func (c *child) line(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-c.lines:
		if !ok {
			t.Fatalf("child %d ended: %v", c.cmd.Process.Pid, <-c.done)
		}
		return l
	case <-time.After(30 * time.Second):
		t.Fatalf("child %d: no answer in 30 s", c.cmd.Process.Pid)
	}
	return ""
}

// exited waits (30 s at most) for the child to end, logging what it still wrote, and
// returns cmd.Wait's answer (which stays for startChild's cleanup).
func (c *child) exited(t *testing.T) error {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-c.lines:
			if ok {
				t.Logf("child %d: %s", c.cmd.Process.Pid, l)
				continue
			}
			err := <-c.done
			c.done <- err
			return err
		case <-timeout:
			t.Fatalf("child %d: still running after 30 s", c.cmd.Process.Pid)
		}
	}
}

// ask sends mmb-holder a command and returns its answer, which must start with "ok".
func (c *child) ask(t *testing.T, cmd string) string {
	t.Helper()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		t.Fatal(err)
	}
	l := c.line(t)
	t.Logf("mmb-holder %s: %s", cmd, l)
	return l
}

// cdiGIDs are the additionalGids a runtime gives a container with CDI device device.
func cdiGIDs(t *testing.T, spec *cdispec.Spec, device string) []uint32 {
	t.Helper()
	return append(slices.Clone(spec.ContainerEdits.AdditionalGIDs), specDevice(t, spec, device).ContainerEdits.AdditionalGIDs...)
}

// vmmDeviceNodes are the device nodes the pod's VMM needs for its DMA (iommufd kernel):
// /dev/iommu and the VFIO cdev of the edu device bdf, owned by the VMM's user. A KubeVirt
// launcher gets its VFIO devices and /dev/iommu from device plugins, and its runtime
// makes the container's nodes the container user's (containerd's
// device_ownership_from_security_context; virt-handler chowns them otherwise): the host's
// nodes, root's and 0600 or 0660, would refuse uid 107. The runtime (applyDeviceNodes)
// makes them in the child's mount namespace: the host's nodes do not change.
func vmmDeviceNodes(t *testing.T, bdf string) []*cdispec.DeviceNode {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join("/sys/bus/pci/devices", bdf, "vfio-dev"))
	if err != nil || len(ents) != 1 {
		t.Fatalf("the VFIO cdev of %s: %v %v", bdf, ents, err)
	}
	var nodes []*cdispec.DeviceNode
	for _, path := range []string{"/dev/iommu", filepath.Join("/dev/vfio/devices", ents[0].Name())} {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR {
			t.Fatalf("%s: not a character device (mode %#o)", path, st.Mode)
		}
		t.Logf("host %s: %d:%d mode %#o uid %d gid %d; the VMM's: mode 0600 uid %d gid %d",
			path, unix.Major(st.Rdev), unix.Minor(st.Rdev), st.Mode&0o7777, st.Uid, st.Gid, vmmUID, vmmGID)
		mode, uid, gid := os.FileMode(0o600), uint32(vmmUID), uint32(vmmGID)
		nodes = append(nodes, &cdispec.DeviceNode{Path: path, HostPath: path, Type: "c",
			Major: int64(unix.Major(st.Rdev)), Minor: int64(unix.Minor(st.Rdev)), FileMode: &mode, UID: &uid, GID: &gid})
	}
	return nodes
}

// checkCreds checks that process pid runs as u, with exactly its groups and no
// capabilities, as /proc/pid/status has it.
func checkCreds(t *testing.T, pid int, u *containerUser) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	var lines []string
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		switch k {
		case "Uid", "Gid", "Groups", "CapPrm", "CapEff":
			if ok {
				got[k] = strings.Fields(v)
				lines = append(lines, k+":"+strings.Join(got[k], " "))
			}
		}
	}
	id := func(n uint32) []string { s := strconv.Itoa(int(n)); return []string{s, s, s, s} }
	groups := []string{}
	for _, g := range u.AdditionalGIDs {
		groups = append(groups, strconv.Itoa(int(g)))
	}
	noCaps := []string{"0000000000000000"}
	for k, want := range map[string][]string{"Uid": id(u.UID), "Gid": id(u.GID), "Groups": groups, "CapPrm": noCaps, "CapEff": noCaps} {
		if !slices.Equal(got[k], want) {
			t.Errorf("pid %d: %s %v, want %v", pid, k, got[k], want)
		}
	}
	t.Logf("pid %d: %s", pid, strings.Join(lines, ", "))
}

func specDevice(t *testing.T, spec *cdispec.Spec, cdiID string) cdispec.Device {
	t.Helper()
	name, ok := strings.CutPrefix(cdiID, spec.Kind+"=")
	if !ok {
		t.Fatalf("CDI device %s is not of kind %s", cdiID, spec.Kind)
	}
	for _, d := range spec.Devices {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("CDI device %s is not in the spec", cdiID)
	return cdispec.Device{}
}

// TestVMDelegatedLease is the whole DRA flow on the rig's ivshmem BAR2 with the real
// daemon (tenants by cgroup; its claim socket 0660 and of group vmSocketGID) and the
// plugin in this process (there is no API server in the VM: the claim comes from a fake
// clientset). The test is the kubelet: it prepares a claim for a pod uid, whose CDI spec
// gives the containers the socket's group as additionalGids, makes that pod's cgroup and
// starts a "container" in it with only the CDI spec's environment, mounts and group, its
// VMM running as uid 107 as KubeVirt's does; the VMM claims the fd and (iommufd kernel,
// with /dev/iommu and the edu device's VFIO cdev given to uid 107 as device plugins
// would) has the edu device DMA through it into the ivshmem BAR, which the host sees in
// the BAR's backing file (test/vm). A process outside the pod is refused the same claim
// by the daemon; a uid-107 process in the pod without the spec's group cannot even
// connect to the claim socket; neither spends the token. The unprepare ends the lease and
// its fd dies within R. Then (HolderExited) a second pod's VMM claims a lease of the BAR
// and is killed: its exit ends the lease, whose fd dies within R, and the unprepare that
// follows has nothing left to release.
func TestVMDelegatedLease(t *testing.T) {
	ivshmem := vmEnv(t, "IVSHMEM")
	iommufdKernel := vmEnv(t, "KERNEL") == "iommufd"
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		t.Fatalf("cgroup v2 is not mounted on /sys/fs/cgroup: %v", err)
	}
	dir, err := os.MkdirTemp("", "dra")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	control, claimSock := startVMDaemon(t, dir, ivshmem)
	cdi, plugins, registry := filepath.Join(dir, "cdi"), filepath.Join(dir, "plugins"), filepath.Join(dir, "registry")
	kube := dratest.NewKube(t)
	startPlugin(t, dra.Options{
		Kube: kube, ControlSocket: control, ClaimSocketHost: claimSock, CDIDir: cdi, PluginDataDir: plugins, RegistrarDir: registry,
		SysFS: os.DirFS("/sys"),
	})

	// Published: the ivshmem BAR2, with what sysfs adds.
	devName := dra.DeviceName(ivshmem, 2, 0, 1)
	devs := dratest.WaitDevices(t, kube, devName)
	if r := devs[0].Attributes["resource.kubernetes.io/pcieRoot"].StringValue; r == nil || !strings.HasPrefix(*r, "pci0000:") {
		t.Errorf("published %s without its PCIe root: %+v", devName, devs[0].Attributes)
	}
	if s := devs[0].Attributes[dra.AttrBARSize].IntValue; s == nil || *s != 1<<20 {
		t.Errorf("published %s: BAR size %v, want 1 MiB", devName, s)
	}

	podUID := types.UID("5f0e7c3a-21b4-4c6e-9a8d-0c1d2e3f4a5b")
	claim := dratest.CreateClaim(t, kube, dratest.NewClaim("vm1-mmio", "7d2a9b10-3c4d-4e5f-8a9b-0c1d2e3f4a5c",
		[]dratest.Pod{{Name: "virt-launcher-vm1", UID: podUID}}, []dratest.Alloc{{Request: "bar", Device: devName}}))
	k := dratest.RegisterPlugin(t, registry)
	r := k.Prepare(claim)
	if r.GetError() != "" || len(r.GetDevices()) != 1 || len(r.GetDevices()[0].GetCdiDeviceIds()) != 1 {
		t.Fatalf("prepare: %v", r)
	}
	cdiID := r.GetDevices()[0].GetCdiDeviceIds()[0]
	spec := readSpec(t, dra.CDISpecPath(cdi, claim.UID))
	c := dratest.DialBroker(t, control)
	leases := dratest.ClaimLeases(t, c, claim.UID)
	if len(leases) != 1 {
		t.Fatalf("leases of the claim: %v", leases)
	}
	lease := leases[0]
	if m := specDevice(t, spec, cdiID).ContainerEdits.Mounts; len(m) != 1 || m[0].HostPath != claimSock {
		t.Fatalf("cdi mounts %v: want the daemon's claim socket %s", m, claimSock)
	}
	// The daemon made its claim socket the socket group's, g+w; the spec gives the
	// containers that group.
	var sst unix.Stat_t
	if err := unix.Stat(claimSock, &sst); err != nil {
		t.Fatal(err)
	}
	if sst.Mode&0o7777 != 0o660 || sst.Gid != vmSocketGID {
		t.Fatalf("claim socket %s: mode %#o gid %d, want 0660 and socket_group %d", claimSock, sst.Mode&0o7777, sst.Gid, vmSocketGID)
	}
	if g := cdiGIDs(t, spec, cdiID); !slices.Equal(g, []uint32{vmSocketGID}) {
		t.Fatalf("cdi additionalGids %v: want the claim socket's group [%d]", g, vmSocketGID)
	}

	// Outside the pod: in no pod's cgroup, and in another pod's. Refused; the token stays.
	other := podCgroup(t, "0a0b0c0d-0000-4000-8000-000000000099")
	for _, cg := range []string{"", other} {
		f := startChild(t, "foreign", spec, cdiID, cg, nil, nil)
		if l := f.line(t); l != "refused PERMISSION_DENIED" {
			t.Fatalf("claim from outside the pod (cgroup %q): %q, want refused PERMISSION_DENIED", cg, l)
		}
	}

	// In the pod, as the VMM's user but without the spec's group (as a container of the
	// pod that was not given the claim): the socket's mode refuses the connect, and the
	// daemon never hears of it.
	podCG := podCgroup(t, podUID)
	ng := startChild(t, "nogroup", spec, cdiID, podCG, &containerUser{UID: vmmUID, GID: vmmGID}, nil)
	if l := ng.line(t); !strings.HasPrefix(l, "connect-refused EACCES ") {
		t.Fatalf("claim as uid %d without the socket's group: %q, want connect-refused EACCES", vmmUID, l)
	} else {
		t.Logf("uid %d without the spec's group: %s", vmmUID, l)
	}
	// No refusal spent the token.
	if ls := dratest.ClaimLeases(t, c, claim.UID); len(ls) != 1 || ls[0].GetId() != lease.GetId() || ls[0].GetState() != brokerv1.LeaseState_LEASE_STATE_ALLOCATED {
		t.Fatalf("leases after the refused claims: %v, want %s unclaimed", ls, lease.GetId())
	}

	// The pod's container claims it and becomes the lease's holder: its VMM runs as uid
	// 107 with the spec's group, and (for the DMA) its device nodes.
	var nodes []*cdispec.DeviceNode
	if iommufdKernel {
		nodes = vmmDeviceNodes(t, vmEnv(t, "EDU2"))
	}
	vmm := &containerUser{UID: vmmUID, GID: vmmGID, AdditionalGIDs: cdiGIDs(t, spec, cdiID)}
	p := startChild(t, "pod", spec, cdiID, podCG, vmm, nodes)
	claimed := p.line(t)
	if !strings.HasPrefix(claimed, "claimed "+lease.GetId()+" ") {
		t.Fatalf("pod: %q", claimed)
	}
	t.Logf("pod: %s", claimed)
	info := p.ask(t, "info")
	checkCreds(t, p.cmd.Process.Pid, vmm)
	got, err := c.API().GetLease(context.Background(), &brokerv1.GetLeaseRequest{LeaseId: lease.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	l := got.GetLease()
	wantTenant := "cgroup=/kubepods.slice/kubepods-burstable.slice/" + filepath.Base(podCG)
	if l.GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || int(l.GetHolder().GetPid()) != p.cmd.Process.Pid ||
		l.GetHolder().GetUid() != vmmUID || !strings.HasSuffix(l.GetHolder().GetTenant(), wantTenant) ||
		!strings.Contains(info, fmt.Sprintf("inode=%d ", l.GetInode())) {
		t.Fatalf("lease after the pod's claim: %v (holder %v); mmb-holder: %s; want ACTIVE, held by pid %d uid %d of tenant …%s, inode in fd 3",
			l, l.GetHolder(), info, p.cmd.Process.Pid, vmmUID, wantTenant)
	}
	t.Logf("lease %s held by pid %d uid %d, tenant %s", l.GetId(), l.GetHolder().GetPid(), l.GetHolder().GetUid(), l.GetHolder().GetTenant())
	if iommufdKernel {
		for _, cmd := range []string{"map", "edu " + vmEnv(t, "EDU2"), "dma " + vmDMATag + " " + vmDMAOffset} {
			if a := p.ask(t, cmd); !strings.HasPrefix(a, "ok ") {
				t.Fatalf("mmb-holder %s: %s", cmd, a)
			}
		}
	} else {
		t.Log("stock kernel: no iommufd, so no DMA through the fd; the claim and the revocation are checked")
	}

	// A second prepare (kubelet restart) keeps the claimed lease.
	if r2 := k.Prepare(claim); r2.GetError() != "" {
		t.Fatalf("second prepare: %s", r2.GetError())
	}
	if ls := dratest.ClaimLeases(t, c, claim.UID); len(ls) != 1 || ls[0].GetId() != lease.GetId() {
		t.Fatalf("leases after the second prepare: %v", ls)
	}
	// Even without its spec: the lease is claimed (its token spent), so it stays with
	// the running VMM, and the rewritten spec names it without a token.
	if err := os.Remove(dra.CDISpecPath(cdi, claim.UID)); err != nil {
		t.Fatal(err)
	}
	if r3 := k.Prepare(claim); r3.GetError() != "" {
		t.Fatalf("prepare without the spec: %s", r3.GetError())
	}
	if ls := dratest.ClaimLeases(t, c, claim.UID); len(ls) != 1 || ls[0].GetId() != lease.GetId() || ls[0].GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE {
		t.Fatalf("leases after a prepare without the spec: %v, want %s kept", ls, lease.GetId())
	}
	respec := readSpec(t, dra.CDISpecPath(cdi, claim.UID))
	if env := dratest.EnvOf(specDevice(t, respec, cdiID).ContainerEdits.Env); env[dra.EnvLeaseID] != lease.GetId() || env[dra.EnvClaimToken] != "" {
		t.Errorf("rewritten spec of a claimed lease: %v, want its id and no token", env)
	}
	if g := cdiGIDs(t, respec, cdiID); !slices.Equal(g, []uint32{vmSocketGID}) {
		t.Errorf("rewritten spec's additionalGids %v, want [%d]", g, vmSocketGID)
	}

	// Unprepare: the lease ends and its fd dies within R (FD_REVOKED by revoke_due).
	ctx, cancel := context.WithTimeout(context.Background(), vmRevokeWithin+30*time.Second)
	defer cancel()
	events := watchEvents(ctx, t, c)
	if msg := k.Unprepare(claim); msg != "" {
		t.Fatalf("unprepare: %s", msg)
	}
	ended, revoked := waitFDRevoked(ctx, t, events, lease.GetId())
	if ended == nil || ended.GetLease().GetRevokeDue() == nil {
		t.Fatalf("the unprepare's end of the lease: %v", ended)
	}
	due := ended.GetLease().GetRevokeDue().AsTime()
	at := revoked.GetTime().AsTime()
	t.Logf("lease %s: released at %s, fd revoked %v later (R = %v)", lease.GetId(),
		ended.GetTime().AsTime().Format(time.RFC3339Nano), at.Sub(ended.GetTime().AsTime()), vmRevokeWithin)
	if at.After(due) {
		t.Errorf("FD_REVOKED at %s, after the lease's revoke_due %s", at, due)
	}
	if iommufdKernel {
		if a := p.ask(t, "fresh"); !strings.Contains(a, "no such device") {
			t.Errorf("the pod's fd after the unprepare maps into a fresh IOAS: %s, want ENODEV", a)
		}
	}
	if _, err := os.Stat(dra.CDISpecPath(cdi, claim.UID)); !os.IsNotExist(err) {
		t.Errorf("cdi spec after unprepare: %v", err)
	}
	fmt.Fprintln(p.in, "quit")

	// The BAR is free again (the unprepare's end of the lease was buried by the device
	// cycle behind its FD_REVOKED): a second pod's VMM takes a lease of it and crashes.
	t.Run("HolderExited", func(t *testing.T) {
		testHolderExited(t, kube, registry, cdi, c, devName, iommufdKernel)
	})
}

// testHolderExited is the end of a delegated lease that its VMM's exit brings, in the
// crash's form (SIGKILL): a second pod's claim is prepared on the BAR, the pod's container
// claims the lease as the first pod's did and becomes its holder (on the iommufd kernel
// with the fd mapped into its IOAS, as a VMM's is), and is killed. The daemon, which
// pinned the holder by a pidfd at the claim, ends the lease (RELEASED, end reason
// HOLDER_EXITED, ended by the killed pid) and the fd, which it cannot know to be gone with
// the process, dies within R (FD_REVOKED by the lease's revoke_due). The kubelet's
// unprepare after the pod's end then finds nothing left to release: it succeeds, the CDI
// spec goes, and the lease stays as the exit ended it.
func testHolderExited(t *testing.T, kube *dratest.Kube, registry, cdi string, c *client.Client, devName string, iommufdKernel bool) {
	// The subtest's own connection to the plugin (a kubelet restart, to the plugin), so
	// that a failed call fails the subtest.
	k := dratest.RegisterPlugin(t, registry)
	podUID := types.UID("9c4b1e2d-6a7f-4b8c-9d0e-1f2a3b4c5d6e")
	claim := dratest.CreateClaim(t, kube, dratest.NewClaim("vm2-mmio", "3e8f6a21-5b7c-4d9e-8f0a-1b2c3d4e5f60",
		[]dratest.Pod{{Name: "virt-launcher-vm2", UID: podUID}}, []dratest.Alloc{{Request: "bar", Device: devName}}))
	r := k.Prepare(claim)
	if r.GetError() != "" || len(r.GetDevices()) != 1 || len(r.GetDevices()[0].GetCdiDeviceIds()) != 1 {
		t.Fatalf("prepare: %v", r)
	}
	cdiID := r.GetDevices()[0].GetCdiDeviceIds()[0]
	spec := readSpec(t, dra.CDISpecPath(cdi, claim.UID))
	leases := dratest.ClaimLeases(t, c, claim.UID)
	if len(leases) != 1 || leases[0].GetState() != brokerv1.LeaseState_LEASE_STATE_ALLOCATED {
		t.Fatalf("leases of the claim: %v, want one, unclaimed", leases)
	}
	id := leases[0].GetId()

	ctx, cancel := context.WithTimeout(context.Background(), vmRevokeWithin+60*time.Second)
	defer cancel()
	events := watchEvents(ctx, t, c)

	var nodes []*cdispec.DeviceNode
	if iommufdKernel {
		nodes = vmmDeviceNodes(t, vmEnv(t, "EDU2"))
	}
	vmm := &containerUser{UID: vmmUID, GID: vmmGID, AdditionalGIDs: cdiGIDs(t, spec, cdiID)}
	p := startChild(t, "pod", spec, cdiID, podCgroup(t, podUID), vmm, nodes)
	if l := p.line(t); !strings.HasPrefix(l, "claimed "+id+" ") {
		t.Fatalf("pod: %q", l)
	} else {
		t.Logf("pod: %s", l)
	}
	pid := p.cmd.Process.Pid
	checkCreds(t, pid, vmm)
	claimed, _ := waitLeaseEvent(ctx, t, events, id, brokerv1.EventType_EVENT_TYPE_CLAIMED)
	if h := claimed.GetLease().GetHolder(); int(h.GetPid()) != pid || h.GetUid() != vmmUID {
		t.Fatalf("lease %s claimed by %v, want pid %d uid %d", id, h, pid, vmmUID)
	}
	if info := p.ask(t, "info"); !strings.Contains(info, fmt.Sprintf("inode=%d ", claimed.GetLease().GetInode())) {
		t.Fatalf("mmb-holder: %s, want the claimed lease's inode %d in fd 3", info, claimed.GetLease().GetInode())
	}
	if iommufdKernel {
		if a := p.ask(t, "map"); !strings.HasPrefix(a, "ok ") {
			t.Fatalf("mmb-holder map: %s", a)
		}
	}

	// The VMM crashes.
	killed := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill the VMM, pid %d: %v", pid, err)
	}
	err := p.exited(t)
	var ws syscall.WaitStatus
	if ps := p.cmd.ProcessState; ps != nil {
		ws, _ = ps.Sys().(syscall.WaitStatus)
	}
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the VMM, pid %d: %v, want killed by SIGKILL", pid, err)
	}
	t.Logf("VMM pid %d: %v", pid, err)

	// Its exit ends the lease; the fd dies within R.
	ended, revoked := waitFDRevoked(ctx, t, events, id)
	el := ended.GetLease()
	if ended == nil || el.GetEndReason() != brokerv1.EndReason_END_REASON_HOLDER_EXITED || int(el.GetHolder().GetPid()) != pid ||
		el.GetEndedBy() != fmt.Sprintf("pid %d exited", pid) || el.GetRevokeDue() == nil {
		t.Fatalf("the end of lease %s: %v, want RELEASED, end reason HOLDER_EXITED, held and ended by pid %d, revoke_due set", id, ended, pid)
	}
	endAt, due, at := ended.GetTime().AsTime(), el.GetRevokeDue().AsTime(), revoked.GetTime().AsTime()
	t.Logf("lease %s: VMM pid %d killed at %s; RELEASED %v later (%s, ended by %q); FD_REVOKED %v after the end (R = %v, revoke_due %s), caused by %q",
		id, pid, killed.Format(time.RFC3339Nano), endAt.Sub(killed), el.GetEndReason(), el.GetEndedBy(),
		at.Sub(endAt), vmRevokeWithin, due.Format(time.RFC3339Nano), revoked.GetCausedBy())
	if at.After(due) {
		t.Errorf("FD_REVOKED at %s, after the lease's revoke_due %s", at, due)
	}
	if !revoked.GetLease().GetFdDead() {
		t.Errorf("FD_REVOKED of %s: %v, want fd_dead", id, revoked.GetLease())
	}

	// The kubelet unprepares the ended pod's claim: nothing left to release.
	if msg := k.Unprepare(claim); msg != "" {
		t.Fatalf("unprepare after the holder's exit: %s", msg)
	}
	if _, err := os.Stat(dra.CDISpecPath(cdi, claim.UID)); !os.IsNotExist(err) {
		t.Errorf("cdi spec after unprepare: %v", err)
	}
	if ls := dratest.ClaimLeases(t, c, claim.UID); len(ls) != 0 {
		t.Errorf("live leases of the claim after unprepare: %v", ls)
	}
	got, err := c.API().GetLease(context.Background(), &brokerv1.GetLeaseRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	if l := got.GetLease(); l.GetState() != brokerv1.LeaseState_LEASE_STATE_RELEASED || l.GetEndReason() != brokerv1.EndReason_END_REASON_HOLDER_EXITED ||
		l.GetEndedBy() != el.GetEndedBy() || !l.GetFdDead() {
		t.Errorf("lease %s after unprepare: %v, want it as the exit ended it: RELEASED, HOLDER_EXITED, ended by %q, fd dead", id, l, el.GetEndedBy())
	}
	t.Logf("unprepare of %s after the holder's exit: ok; lease %s %s, %s, ended by %q, fd dead %v",
		claim.Name, id, got.GetLease().GetState(), got.GetLease().GetEndReason(), got.GetLease().GetEndedBy(), got.GetLease().GetFdDead())
}

// watchEvents streams the daemon's events (all of them: c is an admin's) from the call on,
// until ctx ends; the channel closes with the stream.
func watchEvents(ctx context.Context, t *testing.T, c *client.Client) <-chan *brokerv1.Event {
	t.Helper()
	stream, err := c.API().WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The response headers come once the daemon has subscribed: every later event reaches
	// the stream.
	if _, err := stream.Header(); err != nil {
		t.Fatal(err)
	}
	events := make(chan *brokerv1.Event, 64)
	go func() {
		defer close(events)
		for {
			r, err := stream.Recv()
			if err != nil {
				return
			}
			select {
			case events <- r.GetEvent():
			case <-ctx.Done():
				return
			}
		}
	}()
	return events
}

// waitLeaseEvent reads events until lease id's first event of type typ and returns it,
// with the lease's events read before it; it fails if the stream or ctx ends first.
func waitLeaseEvent(ctx context.Context, t *testing.T, events <-chan *brokerv1.Event, id string, typ brokerv1.EventType) (*brokerv1.Event, []*brokerv1.Event) {
	t.Helper()
	var before []*brokerv1.Event
	for {
		select {
		case e, ok := <-events:
			if !ok {
				t.Fatalf("event stream ended before %s of %s", typ, id)
			}
			if e.GetLease().GetId() != id {
				continue
			}
			if e.GetType() == typ {
				return e, before
			}
			before = append(before, e)
		case <-ctx.Done():
			t.Fatalf("no %s of %s", typ, id)
		}
	}
}

// waitFDRevoked reads events until lease id's FD_REVOKED and returns it, with the lease's
// last RELEASED before it (nil if none).
func waitFDRevoked(ctx context.Context, t *testing.T, events <-chan *brokerv1.Event, id string) (ended, revoked *brokerv1.Event) {
	t.Helper()
	revoked, before := waitLeaseEvent(ctx, t, events, id, brokerv1.EventType_EVENT_TYPE_FD_REVOKED)
	for _, e := range before {
		if e.GetType() == brokerv1.EventType_EVENT_TYPE_RELEASED {
			ended = e
		}
	}
	return ended, revoked
}
