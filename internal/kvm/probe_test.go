package kvm

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestProbeMissing(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := filepath.Join(t.TempDir(), "kvm")
	facts, err := Probe(path)
	if !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOENT) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Probe(missing) = %v, want ErrNotSupported with ENOENT", err)
	}
	if errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Probe(missing) = %v also matches ErrNotFound", err)
	}
	var ke *Error
	if !errors.As(err, &ke) || ke.Op != "open" || ke.Path != path {
		t.Errorf("error %v is not an *Error{Op: open, Path: %s}", err, path)
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "no such file or directory") {
		t.Errorf("message %q lacks the path or the errno", msg)
	}
	if facts.Path != path || len(facts.Checks) != 1 {
		t.Fatalf("facts = %+v, want Path %s and the open check", facts, path)
	}
	c := facts.Checks[0]
	if c.Name != CheckOpen || c.OK || !strings.Contains(c.Reason, "no KVM on this host") || !errors.Is(c.Err, unix.ENOENT) {
		t.Errorf("open check = %+v", c)
	}
}

// A directory is a dev root: Probe looks for its "kvm" node.
func TestProbeDevRoot(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := t.TempDir()
	facts, err := Probe(dir)
	if !errors.Is(err, errdefs.ErrNotSupported) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("Probe(empty dev root) = %v, want ErrNotSupported with ENOENT", err)
	}
	if want := filepath.Join(dir, "kvm"); facts.Path != want {
		t.Errorf("Path = %q, want %q", facts.Path, want)
	}
	if got := resolvePath(""); got != DefaultPath {
		t.Errorf("resolvePath(\"\") = %q, want %q", got, DefaultPath)
	}
}

// /dev/null opens read-write but answers every ioctl with ENOTTY.
func TestProbeNotKVM(t *testing.T) {
	testutil.FDLeakCheck(t)
	facts, err := Probe(os.DevNull)
	if !errors.Is(err, unix.ENOTTY) || !errors.Is(err, errdefs.ErrNotSupported) {
		t.Fatalf("Probe(/dev/null) = %v, want ENOTTY (ErrNotSupported)", err)
	}
	want := "kvm /dev/null: get-api-version: ioctl KVM_GET_API_VERSION: inappropriate ioctl for device (not a KVM device)"
	if err.Error() != want {
		t.Errorf("error = %q\nwant    %q", err, want)
	}
	if got := names(facts.Checks); !cmp.Equal(got, []string{CheckOpen, CheckAPIVersion}) {
		t.Errorf("checks = %v, want open and api_version", got)
	}
	if c, _ := facts.Lookup(CheckAPIVersion); c.OK || !errors.Is(c.Err, unix.ENOTTY) {
		t.Errorf("api_version check = %+v", c)
	}
}

// A regular file answers ENOTTY too; a file without permissions fails to open with
// EACCES (unless the test runs as root, which bypasses file modes).
func TestProbePermission(t *testing.T) {
	testutil.FDLeakCheck(t)
	if os.Geteuid() == 0 {
		t.Skip("root ignores file modes; EACCES is covered by TestOpenError")
	}
	path := filepath.Join(t.TempDir(), "kvm")
	if err := os.WriteFile(path, nil, 0); err != nil {
		t.Fatal(err)
	}
	_, err := Probe(path)
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !errors.Is(err, unix.EACCES) {
		t.Fatalf("Probe(mode 000) = %v, want ErrPermissionDenied with EACCES", err)
	}
	if !strings.Contains(err.Error(), path) {
		t.Errorf("message %q lacks the path", err)
	}
}

// fakeKernel answers probe's requests from its fields.
type fakeKernel struct {
	version    uintptr
	versionErr error
	caps       map[uintptr]uintptr
	capErrs    map[uintptr]error
	vmErr      error
	deviceErr  error

	vms     []VMType       // created
	devices []createDevice // KVM_CREATE_DEVICE arguments
	closes  int            // VMs closed
}

func (k *fakeKernel) apiVersion() (uintptr, error) { return k.version, k.versionErr }

func (k *fakeKernel) checkExtension(name string, nr uintptr) (uintptr, error) {
	if err := k.capErrs[nr]; err != nil {
		return 0, os.NewSyscallError("ioctl KVM_CHECK_EXTENSION "+name, err)
	}
	return k.caps[nr], nil
}

func (k *fakeKernel) createVM(t VMType) (vm, error) {
	if k.vmErr != nil {
		return nil, os.NewSyscallError("ioctl KVM_CREATE_VM", k.vmErr)
	}
	k.vms = append(k.vms, t)
	return fakeVM{k}, nil
}

type fakeVM struct{ k *fakeKernel }

func (v fakeVM) createDevice(arg *createDevice) error {
	v.k.devices = append(v.k.devices, *arg)
	if v.k.deviceErr != nil {
		return os.NewSyscallError("ioctl KVM_CREATE_DEVICE", v.k.deviceErr)
	}
	return nil
}

func (v fakeVM) Close() error { v.k.closes++; return nil }

// linux72 answers like a Linux 7.2 x86 host with SEV-SNP and guest_memfd.
func linux72() *fakeKernel {
	return &fakeKernel{version: 12, caps: map[uintptr]uintptr{
		KVM_CAP_VM_TYPES:          1<<0 | 1<<2 | 1<<3 | 1<<4,
		KVM_CAP_USER_MEMORY2:      1,
		KVM_CAP_GUEST_MEMFD:       1,
		KVM_CAP_GUEST_MEMFD_FLAGS: 3,
		KVM_CAP_MEMORY_ATTRIBUTES: 8,
	}}
}

var ignoreErrs = cmpopts.IgnoreFields(Check{}, "Err")

func TestProbeAllPresent(t *testing.T) {
	k := linux72()
	facts := Facts{Path: "/dev/kvm"}
	if err := probe(k, &facts); err != nil {
		t.Fatal(err)
	}
	want := Facts{
		Path:             "/dev/kvm",
		APIVersion:       12,
		VMTypes:          []VMType{KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM},
		UserMemory2:      true,
		GuestMemfd:       true,
		GuestMemfdFlags:  GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
		MemoryAttributes: KVM_MEMORY_ATTRIBUTE_PRIVATE,
		VFIODevice:       true,
		Checks: []Check{
			{Name: CheckAPIVersion, OK: true, Value: "12"},
			{Name: CheckVMTypes, OK: true, Value: "0x1d (default, sev, sev-es, snp)"},
			{Name: CheckUserMemory2, OK: true, Value: "1"},
			{Name: CheckGuestMemfd, OK: true, Value: "1"},
			{Name: CheckGuestMemfdFlags, OK: true, Value: "0x3 (mmap, init-shared)"},
			{Name: CheckMemoryAttributes, OK: true, Value: "0x8 (private)"},
			{Name: CheckVFIODevice, OK: true, Value: "kvm-vfio"},
		},
	}
	if diff := cmp.Diff(want, facts, cmpopts.EquateErrors()); diff != "" {
		t.Errorf("facts (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]createDevice{{Type: KVM_DEV_TYPE_VFIO, Flags: KVM_CREATE_DEVICE_TEST}}, k.devices,
		cmpopts.IgnoreUnexported(createDevice{})); diff != "" {
		t.Errorf("KVM_CREATE_DEVICE arguments (-want +got):\n%s", diff)
	}
	if !cmp.Equal(k.vms, []VMType{KVM_X86_DEFAULT_VM}) || k.closes != 1 {
		t.Errorf("VMs created %v, closed %d; want one default VM, closed", k.vms, k.closes)
	}
}

// An old kernel (Linux 6.1: no VM types, memslot v2, guest_memfd or attributes) is no
// error; every absent feature says why.
func TestProbeAllAbsent(t *testing.T) {
	k := &fakeKernel{version: 12, deviceErr: unix.ENODEV}
	facts := Facts{Path: "/dev/kvm"}
	if err := probe(k, &facts); err != nil {
		t.Fatal(err)
	}
	if facts.VMTypes != nil || facts.UserMemory2 || facts.GuestMemfd || facts.GuestMemfdFlags != 0 ||
		facts.MemoryAttributes != 0 || facts.VFIODevice {
		t.Errorf("facts = %+v, want nothing present", facts)
	}
	for _, tt := range []struct{ name, reason string }{
		{CheckVMTypes, "KVM_CAP_VM_TYPES is 0: the kernel does not report VM types"},
		{CheckUserMemory2, "KVM_CAP_USER_MEMORY2 is 0: no KVM_SET_USER_MEMORY_REGION2"},
		{CheckGuestMemfd, "KVM_CAP_GUEST_MEMFD is 0: no guest_memfd"},
		{CheckGuestMemfdFlags, "KVM_CAP_GUEST_MEMFD_FLAGS is 0"},
		{CheckMemoryAttributes, "KVM_CAP_MEMORY_ATTRIBUTES is 0"},
		{CheckVFIODevice, "no kvm-vfio device (built without CONFIG_KVM_VFIO)"},
	} {
		c, ok := facts.Lookup(tt.name)
		if !ok {
			t.Errorf("no %s check", tt.name)
			continue
		}
		if c.OK || c.Err != nil || !strings.Contains(c.Reason, tt.reason) {
			t.Errorf("%s = %+v, want absent with a reason containing %q and no error", tt.name, c, tt.reason)
		}
	}
	if k.closes != 1 {
		t.Errorf("VM closed %d times, want 1", k.closes)
	}
}

func TestProbeAPIVersion(t *testing.T) {
	k := linux72()
	k.version = 11
	facts := Facts{Path: "/dev/kvm"}
	err := probe(k, &facts)
	if !errors.Is(err, errdefs.ErrNotSupported) || err.Error() != "kvm /dev/kvm: get-api-version: KVM API version 11, want 12" {
		t.Fatalf("probe(version 11) = %v", err)
	}
	want := []Check{{Name: CheckAPIVersion, Value: "11", Reason: "KVM API version 11, want 12"}}
	if diff := cmp.Diff(want, facts.Checks, ignoreErrs); diff != "" {
		t.Errorf("checks (-want +got):\n%s", diff)
	}
	if facts.APIVersion != 11 || len(k.vms) != 0 {
		t.Errorf("APIVersion %d, VMs %v: want 11 and no VM", facts.APIVersion, k.vms)
	}
}

// Failed ioctls after the version check are recorded with their errno, not returned.
func TestProbeIoctlFailures(t *testing.T) {
	k := linux72()
	k.capErrs = map[uintptr]error{KVM_CAP_GUEST_MEMFD_FLAGS: unix.EFAULT}
	k.vmErr = unix.ENOMEM
	facts := Facts{Path: "/dev/kvm"}
	if err := probe(k, &facts); err != nil {
		t.Fatal(err)
	}
	c, _ := facts.Lookup(CheckGuestMemfdFlags)
	if c.OK || !errors.Is(c.Err, unix.EFAULT) || c.Reason != "ioctl KVM_CHECK_EXTENSION KVM_CAP_GUEST_MEMFD_FLAGS: bad address" {
		t.Errorf("guest_memfd_flags = %+v", c)
	}
	var ke *Error
	if !errors.As(c.Err, &ke) || ke.Op != "check-extension KVM_CAP_GUEST_MEMFD_FLAGS" {
		t.Errorf("guest_memfd_flags error %v is not an *Error naming the capability", c.Err)
	}
	if !facts.GuestMemfd || facts.GuestMemfdFlags != 0 {
		t.Errorf("GuestMemfd %v, flags %v: want true and 0", facts.GuestMemfd, facts.GuestMemfdFlags)
	}
	c, _ = facts.Lookup(CheckVFIODevice)
	if c.OK || !errors.Is(c.Err, unix.ENOMEM) || !errors.Is(c.Err, errdefs.ErrResourceExhausted) ||
		c.Reason != "cannot create a VM to ask: ioctl KVM_CREATE_VM: cannot allocate memory" {
		t.Errorf("vfio_device = %+v", c)
	}
	if k.closes != 0 {
		t.Errorf("closed %d VMs that were never created", k.closes)
	}

	k = linux72()
	k.deviceErr = unix.EINVAL
	facts = Facts{Path: "/dev/kvm"}
	if err := probe(k, &facts); err != nil {
		t.Fatal(err)
	}
	c, _ = facts.Lookup(CheckVFIODevice)
	if c.OK || !errors.Is(c.Err, unix.EINVAL) || facts.VFIODevice || k.closes != 1 {
		t.Errorf("vfio_device = %+v, VFIODevice %v, closes %d", c, facts.VFIODevice, k.closes)
	}
}

func names(cs []Check) []string {
	var ns []string
	for _, c := range cs {
		ns = append(ns, c.Name)
	}
	return ns
}

// The real ioctl wrappers keep the errno and name the request; /dev/null stands in for
// /dev/kvm and for a VM fd.
func TestSystemWrappers(t *testing.T) {
	testutil.FDLeakCheck(t)
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := system{f}
	if _, err := s.checkExtension("KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES); !errors.Is(err, unix.ENOTTY) ||
		!strings.Contains(err.Error(), "ioctl KVM_CHECK_EXTENSION KVM_CAP_VM_TYPES") {
		t.Errorf("checkExtension = %v, want ENOTTY naming the capability", err)
	}
	if v, err := s.createVM(KVM_X86_DEFAULT_VM); !errors.Is(err, unix.ENOTTY) || v != nil {
		t.Errorf("createVM = %v, %v; want nil, ENOTTY", v, err)
	}
	g, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	v := vmFile{g}
	arg := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
	if err := v.createDevice(&arg); !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "ioctl KVM_CREATE_DEVICE") {
		t.Errorf("createDevice = %v, want ENOTTY", err)
	}
	if err := v.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
}
