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
// "foreign" a process outside the pod that tries the same claim.
const (
	childEnv  = "MMB_DRA_CHILD"
	mountsEnv = "MMB_DRA_MOUNTS"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(runChild(mode))
	}
	// klog's flush daemon lives as long as the process.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}

// runChild plays the container runtime and then the VMM. As the runtime, in the mount
// namespace its parent gave it, it applies the CDI spec's mounts (passed in mountsEnv);
// its environment is already exactly the CDI spec's (and PATH). As the VMM it knows
// nothing but that environment: it finds its lease in MMIO_LEASE_ID_<suffix>, claims
// the fd on MMIO_CLAIM_SOCKET and, in mode pod, execs mmb-holder with the fd as fd 3
// (the same process: it stays the lease's holder).
func runChild(mode string) int {
	fail := func(format string, a ...any) int {
		fmt.Printf("child-error "+format+"\n", a...)
		return 2
	}
	var mounts []*cdispec.Mount
	if err := json.Unmarshal([]byte(os.Getenv(mountsEnv)), &mounts); err != nil {
		return fail("mounts: %v", err)
	}
	os.Unsetenv(mountsEnv)
	os.Unsetenv(childEnv)
	for _, m := range mounts {
		if err := applyMount(m); err != nil {
			return fail("mount %s on %s: %v", m.HostPath, m.ContainerPath, err)
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
	f, rep, err := fdpass.Claim(ctx, os.Getenv(dra.EnvClaimSocket), id, token)
	if err != nil {
		var re *fdpass.ReplyError
		if errors.As(err, &re) {
			fmt.Printf("refused %s\n", re.Code)
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
	fmt.Printf("claimed %s generation %d inode %d size %d\n", id, rep.Generation, st.Ino, rep.Size)
	env := append(os.Environ(), "MMIO_LEASE_ID="+id, "MMIO_LEASE_SIZE="+strconv.FormatUint(rep.Size, 10),
		"MMIO_LEASE_GENERATION="+strconv.FormatUint(rep.Generation, 10))
	err = syscall.Exec(holder, []string{"mmb-holder"}, env)
	return fail("exec %s: %v", holder, err)
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
