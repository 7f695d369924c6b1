//go:build vmtest

package dravm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	"github.com/mmiobroker/mmiobroker/internal/dra"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// childEnv selects what a re-executed test binary does: "pod" is a container of the
// pod (claim the lease from the CDI spec's env and mounts, then become mmb-holder),
// "foreign" a process outside the pod that tries the same claim, "nogroup" a process of
// the pod without the spec's group, whose connect the claim socket's mode refuses.
// runtimeEnv holds what the runtime applies before it runs the VMM (runtimeSpec, JSON).
const (
	childEnv   = "MMB_DRA_CHILD"
	runtimeEnv = "MMB_DRA_RUNTIME"
)

// runtimeSpec is the part of a container's OCI spec that runChild applies as the
// runtime: the CDI spec's mounts, the device nodes the pod's device plugins add, and the
// container's user.
type runtimeSpec struct {
	Mounts      []*cdispec.Mount      `json:"mounts"`
	DeviceNodes []*cdispec.DeviceNode `json:"deviceNodes,omitempty"`
	// User is the container's process.user; nil keeps root.
	User *containerUser `json:"user,omitempty"`
}

// containerUser is an OCI process.user: the VMM's uid and gid, and its supplementary
// groups (those the pod asks for plus the CDI devices' additionalGids).
type containerUser struct {
	UID            uint32   `json:"uid"`
	GID            uint32   `json:"gid"`
	AdditionalGIDs []uint32 `json:"additionalGids,omitempty"`
}

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(runChild(mode))
	}
	// klog's flush daemon lives as long as the process.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}

// runChild plays the container runtime and then the VMM. As the runtime, root in the
// mount namespace its parent gave it, it applies runtimeEnv: the CDI spec's mounts, the
// device nodes, and then the container's user (setgroups, setgid, setuid: process-wide
// in Go, and a uid other than 0 drops every capability), as runc's init does before it
// execs the container's process; its environment is already exactly the CDI spec's (and
// PATH). As the VMM it knows nothing but that environment: it finds its lease in
// MMIO_LEASE_ID_<suffix>, claims the fd on MMIO_CLAIM_SOCKET and, in mode pod, execs
// mmb-holder with the fd as fd 3 (the same process: it stays the lease's holder).
func runChild(mode string) int {
	fail := func(format string, a ...any) int {
		fmt.Printf("child-error "+format+"\n", a...)
		return 2
	}
	var rt runtimeSpec
	if err := json.Unmarshal([]byte(os.Getenv(runtimeEnv)), &rt); err != nil {
		return fail("runtime spec: %v", err)
	}
	os.Unsetenv(runtimeEnv)
	os.Unsetenv(childEnv)
	for _, m := range rt.Mounts {
		if err := applyMount(m); err != nil {
			return fail("mount %s on %s: %v", m.HostPath, m.ContainerPath, err)
		}
	}
	if err := applyDeviceNodes(rt.DeviceNodes); err != nil {
		return fail("device nodes: %v", err)
	}
	if u := rt.User; u != nil {
		gids := make([]int, len(u.AdditionalGIDs))
		for i, g := range u.AdditionalGIDs {
			gids[i] = int(g)
		}
		if err := syscall.Setgroups(gids); err != nil {
			return fail("setgroups %v: %v", gids, err)
		}
		if err := syscall.Setgid(int(u.GID)); err != nil {
			return fail("setgid %d: %v", u.GID, err)
		}
		if err := syscall.Setuid(int(u.UID)); err != nil {
			return fail("setuid %d: %v", u.UID, err)
		}
	}

	// The VMM: only the environment from here on.
	var id, token string
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if sfx, ok := strings.CutPrefix(k, dra.EnvLeaseID+"_"); ok {
			if id != "" {
				return fail("more than one lease in the environment")
			}
			id, token = v, os.Getenv(dra.EnvClaimToken+"_"+sfx)
		}
	}
	if id == "" || token == "" || id != os.Getenv(dra.EnvLeaseID) || token != os.Getenv(dra.EnvClaimToken) {
		return fail("no lease in the environment: %q", os.Environ())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := os.Getenv(dra.EnvClaimSocket)
	f, rep, err := fdpass.Claim(ctx, sock, id, token)
	if err != nil {
		var re *fdpass.ReplyError
		if errors.As(err, &re) {
			fmt.Printf("refused %s\n", re.Code)
			return 3
		}
		if errors.Is(err, syscall.EACCES) {
			// The socket's mode, not the path: the socket is there for this process to
			// see (stat needs only search permission on its directories).
			var st unix.Stat_t
			if serr := unix.Stat(sock, &st); serr != nil {
				return fail("claim: %v; stat %s: %v", err, sock, serr)
			}
			fmt.Printf("connect-refused EACCES %s mode %#o uid %d gid %d; I am %s: %v\n",
				sock, st.Mode&0o7777, st.Uid, st.Gid, creds(), err)
			return 3
		}
		return fail("claim: %v", err)
	}
	if mode != "pod" {
		fmt.Printf("child-error a %s process claimed lease %s\n", mode, id)
		return 2
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fail("fstat: %v", err)
	}
	if err := unix.Dup3(int(f.Fd()), 3, 0); err != nil {
		return fail("dup3: %v", err)
	}
	holder, err := exec.LookPath("mmb-holder")
	if err != nil {
		return fail("%v", err)
	}
	fmt.Printf("claimed %s generation %d inode %d size %d as %s\n", id, rep.Generation, st.Ino, rep.Size, creds())
	env := append(os.Environ(), "MMIO_LEASE_ID="+id, "MMIO_LEASE_SIZE="+strconv.FormatUint(rep.Size, 10),
		"MMIO_LEASE_GENERATION="+strconv.FormatUint(rep.Generation, 10))
	err = syscall.Exec(holder, []string{"mmb-holder"}, env)
	return fail("exec %s: %v", holder, err)
}

// creds describes this process's credentials: uid, gid and supplementary groups.
func creds() string {
	groups, err := unix.Getgroups()
	if err != nil {
		return fmt.Sprintf("uid %d gid %d groups ? (%v)", unix.Getuid(), unix.Getgid(), err)
	}
	return fmt.Sprintf("uid %d gid %d groups %v", unix.Getuid(), unix.Getgid(), groups)
}

// applyMount does what a runtime does with a CDI mount of a file: a tmpfs over the
// target's directory (so that nothing outside this mount namespace changes), an empty
// file as the mount point, the bind mount, and a remount with the options' flags.
func applyMount(m *cdispec.Mount) error {
	dir := filepath.Dir(m.ContainerPath)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs on %s: %w", dir, err)
	}
	if err := os.WriteFile(m.ContainerPath, nil, 0o600); err != nil {
		return err
	}
	flags := uintptr(unix.MS_BIND)
	var remount uintptr
	for _, o := range m.Options {
		switch o {
		case "bind", "rbind":
		case "ro":
			remount |= unix.MS_RDONLY
		case "nosuid":
			remount |= unix.MS_NOSUID
		case "nodev":
			remount |= unix.MS_NODEV
		case "noexec":
			remount |= unix.MS_NOEXEC
		default:
			return fmt.Errorf("mount option %q: not known to this test runtime", o)
		}
	}
	if err := unix.Mount(m.HostPath, m.ContainerPath, "", flags, ""); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	if remount != 0 {
		if err := unix.Mount("", m.ContainerPath, "", unix.MS_BIND|unix.MS_REMOUNT|remount, ""); err != nil {
			return fmt.Errorf("remount: %w", err)
		}
	}
	return nil
}

// applyDeviceNodes gives the container its device nodes as a runtime does: a node of the
// same device at each path, with the owner and mode the spec gives. It makes each node in
// a tmpfs of this mount namespace and bind-mounts it over the path, so that the host's
// node (the devtmpfs inode every namespace shares) keeps its owner and mode.
func applyDeviceNodes(nodes []*cdispec.DeviceNode) error {
	if len(nodes) == 0 {
		return nil
	}
	stage, err := os.MkdirTemp("", "mmb-dra-dev")
	if err != nil {
		return err
	}
	defer os.Remove(stage)
	// Not nodev: the bind mounts below inherit this mount's flags.
	if err := unix.Mount("tmpfs", stage, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=0700"); err != nil {
		return fmt.Errorf("tmpfs on %s: %w", stage, err)
	}
	// The bind mounts outlive the staging mount: they are mounts of their own.
	defer unix.Unmount(stage, unix.MNT_DETACH)
	for i, n := range nodes {
		if n.Type != "c" || n.FileMode == nil || n.UID == nil || n.GID == nil {
			return fmt.Errorf("device node %s: want a character device with mode, uid and gid: %+v", n.Path, n)
		}
		src := filepath.Join(stage, strconv.Itoa(i))
		perm := uint32(n.FileMode.Perm())
		if err := unix.Mknod(src, unix.S_IFCHR|perm, int(unix.Mkdev(uint32(n.Major), uint32(n.Minor)))); err != nil {
			return fmt.Errorf("mknod %s (%d:%d): %w", n.Path, n.Major, n.Minor, err)
		}
		if err := unix.Chown(src, int(*n.UID), int(*n.GID)); err != nil {
			return err
		}
		if err := unix.Chmod(src, perm); err != nil { // not the umask's
			return err
		}
		if err := unix.Mount(src, n.Path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", n.Path, err)
		}
	}
	return nil
}
