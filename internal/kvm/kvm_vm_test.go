//go:build vmtest

package kvm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"golang.org/x/sys/unix"
)

// These tests run as root inside the test/vm guest, against a real /dev/kvm on both of
// its kernels (MMIOBROKER_VM_KERNEL): "stock", Debian's 7.2 build with kvm_amd a module
// the rig loads, and "iommufd", the rig's own 7.2 build with KVM built in. Both run KVM on
// the SVM that QEMU's TCG emulates (nested virtualization).

// otherMMEnv makes the test binary the child of TestVMOtherMM: a process with its own
// address space that inherits a VM fd as fd 3 and the /dev/kvm fd as fd 4.
const otherMMEnv = "MMB_KVM_TEST_OTHER_MM"

// Fds of the child of TestVMOtherMM.
const (
	otherMMVMFD  = 3
	otherMMKVMFD = 4
)

// init runs the child of TestVMOtherMM before any test (TestMain is in probe_test.go).
func init() {
	if os.Getenv(otherMMEnv) == "" {
		return
	}
	os.Exit(otherMMChild())
}

// vmKernel skips t outside the rig's guest and returns the guest kernel's name.
func vmKernel(t *testing.T) string {
	t.Helper()
	kernel := os.Getenv("MMIOBROKER_VM_KERNEL")
	if kernel == "" {
		t.Skip("MMIOBROKER_VM_KERNEL is not set: run inside the VM rig (make test-vm)")
	}
	testutil.SkipUnlessRoot(t)
	return kernel
}

// TestVMProbe probes the guest's /dev/kvm and checks what Linux 7.2's x86 KVM reports on
// both kernels: API version 12; KVM_CAP_VM_TYPES with the default type
// (arch/x86/kvm/x86.c:4567, :9687); KVM_SET_USER_MEMORY_REGION2 (kvm_main.c:4891);
// guest_memfd with the mmap and init-shared flags (x86_64 KVM selects KVM_GUEST_MEMFD,
// arch/x86/kvm/Kconfig:50; kvm_gmem_get_supported_flags(NULL), include/linux/kvm_host.h:735);
// and the kvm-vfio device (KVM_X86 selects KVM_VFIO, arch/x86/kvm/Kconfig:45). Where the
// kernel's config is readable (/proc/config.gz, the iommufd kernel) the answers must also
// agree with it, including the memory attributes, which only some configs have.
func TestVMProbe(t *testing.T) {
	kernel := vmKernel(t)
	testutil.FDLeakCheck(t)
	facts, err := Probe("")
	if err != nil {
		t.Fatalf("Probe on the %s kernel: %v (the rig loads kvm_amd on stock; KVM is built into iommufd)\nchecks: %+v",
			kernel, err, facts.Checks)
	}
	checkFacts(t, facts)
	checks := []string{CheckOpen, CheckAPIVersion, CheckVMTypes, CheckUserMemory2, CheckGuestMemfd,
		CheckGuestMemfdFlags, CheckMemoryAttributes, CheckVFIODevice}
	if got := names(facts.Checks); !slices.Equal(got, checks) {
		t.Errorf("checks %v, want %v", got, checks)
	}
	if facts.Path != DefaultPath {
		t.Errorf("Path = %q, want %q", facts.Path, DefaultPath)
	}
	if !slices.Contains(facts.VMTypes, KVM_X86_DEFAULT_VM) {
		t.Errorf("VMTypes %v lack the default type", facts.VMTypes)
	}
	if !facts.UserMemory2 {
		t.Error("no KVM_CAP_USER_MEMORY2, which 7.2 always reports")
	}

	// The options that decide three of the answers, and the answer each must give.
	options := []string{"CONFIG_KVM_VFIO", "CONFIG_KVM_GUEST_MEMFD", "CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES"}
	want := map[string]bool{}
	cfg, err := kernelConfig()
	switch {
	case err != nil:
		t.Fatalf("kernel config: %v", err)
	case cfg != nil:
		for _, o := range options {
			want[o] = cfg[o] == "y"
		}
	case kernel == "iommufd":
		t.Fatal("no /proc/config.gz on the iommufd kernel, built with CONFIG_IKCONFIG_PROC=y")
	default:
		// x86_64 KVM selects these two; the memory attributes depend on options (SEV,
		// TDX, KVM_SW_PROTECTED_VM) this guest cannot read.
		t.Logf("the %s kernel has no /proc/config.gz: checking what x86_64's Kconfig selects only", kernel)
		want["CONFIG_KVM_VFIO"], want["CONFIG_KVM_GUEST_MEMFD"] = true, true
	}
	for _, tt := range []struct {
		option string
		got    bool
		what   string
	}{
		{options[0], facts.VFIODevice, "the kvm-vfio device"},
		{options[1], facts.GuestMemfd, "guest_memfd"},
		{options[2], facts.MemoryAttributes == KVM_MEMORY_ATTRIBUTE_PRIVATE, "the private memory attribute"},
	} {
		if w, ok := want[tt.option]; ok && tt.got != w {
			t.Errorf("Probe reports %s: %v; want %v (%s=%q)", tt.what, tt.got, w, tt.option, cfg[tt.option])
		}
	}
	if facts.GuestMemfd {
		if want := GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED; facts.GuestMemfdFlags != want {
			t.Errorf("GuestMemfdFlags = %v, want %v", facts.GuestMemfdFlags, want)
		}
	}
	if c, _ := facts.Lookup(CheckVFIODevice); facts.VFIODevice != c.OK {
		t.Errorf("VFIODevice %v, but its check says OK=%v", facts.VFIODevice, c.OK)
	}

	// A second probe works as well: the first closed its VM and /dev/kvm.
	if _, err := Probe(""); err != nil {
		t.Errorf("second Probe: %v", err)
	}
}

// kernelConfig reads the running kernel's configuration from /proc/config.gz: option →
// value ("y", "m", a number, a quoted string). It returns nil when the kernel does not
// offer it (built without CONFIG_IKCONFIG_PROC).
func kernelConfig() (map[string]string, error) {
	f, err := os.Open("/proc/config.gz")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("/proc/config.gz: %w", err)
	}
	cfg := map[string]string{}
	s := bufio.NewScanner(z)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("/proc/config.gz: %w", err)
	}
	return cfg, nil
}

// otherMMOps are the ioctls the child of TestVMOtherMM makes, in order.
var otherMMOps = []string{"vm-check-extension", "vm-create-device", "kvm-get-api-version", "kvm-check-extension"}

// TestVMOtherMM checks the rule package kvm's doc rests on: every ioctl on a VM fd from a
// process whose address space did not create the VM fails with EIO (kvm_vm_ioctl,
// virt/kvm/kvm_main.c:5177), while the system ioctls on /dev/kvm have no such check. The
// test creates a VM and passes its fd and the /dev/kvm fd to a child process (this binary
// again, a new mm after exec): KVM_CHECK_EXTENSION and KVM_CREATE_DEVICE on the VM fd fail
// with EIO there, and succeed here, before and after.
func TestVMOtherMM(t *testing.T) {
	vmKernel(t)
	testutil.FDLeakCheck(t)
	kvm, err := os.OpenFile(DefaultPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer kvm.Close()
	fd, err := ioctl.Value(kvm, "KVM_CREATE_VM", KVM_CREATE_VM, uintptr(KVM_X86_DEFAULT_VM))
	if err != nil {
		t.Fatal(err)
	}
	vm := os.NewFile(fd, "kvm-vm")
	defer vm.Close()

	own := func(when string) {
		t.Helper()
		if r, err := ioctl.Value(vm, "KVM_CHECK_EXTENSION KVM_CAP_USER_MEMORY2", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2); err != nil || r != 1 {
			t.Errorf("%s: KVM_CHECK_EXTENSION on our own VM = %d, %v; want 1", when, r, err)
		}
		arg := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
		if err := (vmFile{vm}).createDevice(&arg); err != nil {
			t.Errorf("%s: KVM_CREATE_DEVICE(kvm-vfio, TEST) on our own VM: %v", when, err)
		}
	}
	own("before the child")

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), otherMMEnv+"=1")
	cmd.ExtraFiles = []*os.File{vm, kvm} // fds 3 and 4
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v\nstdout:\n%s\nstderr:\n%s", err, out, &stderr)
	}
	got, err := parseOtherMM(out)
	if err != nil {
		t.Fatalf("child said %q: %v", out, err)
	}
	for _, op := range otherMMOps {
		t.Logf("child: %s = %d, errno %d (%v)", op, got[op].value, got[op].errno, got[op].errno)
	}
	for _, op := range []string{"vm-check-extension", "vm-create-device"} {
		if r := got[op]; r.errno != unix.EIO {
			t.Errorf("%s on a VM of another mm: value %d, errno %d (%v); want EIO", op, r.value, r.errno, r.errno)
		}
	}
	if r := got["kvm-get-api-version"]; r.errno != 0 || r.value != KVM_API_VERSION {
		t.Errorf("KVM_GET_API_VERSION on the inherited /dev/kvm fd = %d, errno %v; want %d", r.value, r.errno, KVM_API_VERSION)
	}
	if r := got["kvm-check-extension"]; r.errno != 0 || r.value != 1 {
		t.Errorf("KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY2) on the inherited /dev/kvm fd = %d, errno %v; want 1", r.value, r.errno)
	}
	own("after the child") // the child's attempts did not kill the VM
}

// otherMMResult is one ioctl of the child: its return value, or its errno (0: success).
type otherMMResult struct {
	value uint64
	errno unix.Errno
}

// parseOtherMM reads the child's lines "<op> <value> <errno>", one for each of otherMMOps.
func parseOtherMM(out []byte) (map[string]otherMMResult, error) {
	got := map[string]otherMMResult{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("line %q: want <op> <value> <errno>", line)
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, err
		}
		e, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			return nil, err
		}
		got[f[0]] = otherMMResult{value: v, errno: unix.Errno(e)}
	}
	for _, op := range otherMMOps {
		if _, ok := got[op]; !ok {
			return nil, fmt.Errorf("no result for %s", op)
		}
	}
	return got, nil
}

// otherMMChild is the child of TestVMOtherMM: it makes otherMMOps on the inherited VM fd
// and /dev/kvm fd and prints each result for the parent to judge. It returns the exit
// status.
func otherMMChild() int {
	for _, fd := range []uintptr{otherMMVMFD, otherMMKVMFD} {
		if _, err := unix.FcntlInt(fd, unix.F_GETFD, 0); err != nil {
			fmt.Fprintf(os.Stderr, "child: fd %d: %v\n", fd, err)
			return 1
		}
	}
	vm := os.NewFile(otherMMVMFD, "kvm-vm")
	kvm := os.NewFile(otherMMKVMFD, "kvm")
	defer vm.Close()
	defer kvm.Close()
	report := func(w io.Writer, op string, r uintptr, err error) error {
		var errno unix.Errno
		if err != nil {
			if !errors.As(err, &errno) {
				return fmt.Errorf("%s: %w (no errno)", op, err)
			}
			r = 0
		}
		_, werr := fmt.Fprintf(w, "%s %d %d\n", op, r, uint32(errno))
		return werr
	}
	arg := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
	r1, err1 := ioctl.Value(vm, "KVM_CHECK_EXTENSION KVM_CAP_USER_MEMORY2", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2)
	err2 := (vmFile{vm}).createDevice(&arg)
	r3, err3 := ioctl.Value(kvm, "KVM_GET_API_VERSION", KVM_GET_API_VERSION, 0)
	r4, err4 := ioctl.Value(kvm, "KVM_CHECK_EXTENSION KVM_CAP_USER_MEMORY2", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2)
	if err := errors.Join(
		report(os.Stdout, otherMMOps[0], r1, err1),
		report(os.Stdout, otherMMOps[1], 0, err2),
		report(os.Stdout, otherMMOps[2], r3, err3),
		report(os.Stdout, otherMMOps[3], r4, err4),
	); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}
