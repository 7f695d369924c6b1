package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/ioctl"
	"golang.org/x/sys/unix"
)

// DefaultPath is KVM's device node.
const DefaultPath = "/dev/kvm"

// Names of the checks [Probe] makes, in its order. They are stable: the daemon reports
// them as they are.
const (
	CheckOpen             = "open"              // open the device node read-write
	CheckAPIVersion       = "api_version"       // KVM_GET_API_VERSION is 12
	CheckVMTypes          = "vm_types"          // KVM_CAP_VM_TYPES
	CheckUserMemory2      = "user_memory2"      // KVM_CAP_USER_MEMORY2
	CheckGuestMemfd       = "guest_memfd"       // KVM_CAP_GUEST_MEMFD
	CheckGuestMemfdFlags  = "guest_memfd_flags" // KVM_CAP_GUEST_MEMFD_FLAGS
	CheckMemoryAttributes = "memory_attributes" // KVM_CAP_MEMORY_ATTRIBUTES
	CheckVFIODevice       = "vfio_device"       // KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO, TEST) in a new default VM
)

// Facts is what a host's KVM offers, as [Probe] found it. The capability answers are
// system-wide (KVM_CHECK_EXTENSION on /dev/kvm): the most KVM supports for any VM type.
// A VM of one type may support less; a VMM asks its own VM fd for that.
type Facts struct {
	// Path is the device node probed, e.g. "/dev/kvm".
	Path string
	// APIVersion is KVM_GET_API_VERSION's answer; 0 if it was not asked.
	APIVersion int
	// VMTypes are the VM types KVM_CREATE_VM accepts (KVM_CAP_VM_TYPES), ascending; nil if
	// the kernel does not report them (before Linux 6.8, or not x86).
	VMTypes []VMType
	// UserMemory2 reports KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2).
	UserMemory2 bool
	// GuestMemfd reports KVM_CREATE_GUEST_MEMFD (KVM_CAP_GUEST_MEMFD).
	GuestMemfd bool
	// GuestMemfdFlags are the flags KVM_CREATE_GUEST_MEMFD accepts
	// (KVM_CAP_GUEST_MEMFD_FLAGS).
	GuestMemfdFlags GuestMemfdFlags
	// MemoryAttributes are the attributes KVM_SET_MEMORY_ATTRIBUTES accepts
	// (KVM_CAP_MEMORY_ATTRIBUTES).
	MemoryAttributes MemoryAttributes
	// VFIODevice reports that a VM can have the kvm-vfio pseudo device
	// (KVM_DEV_TYPE_VFIO), through which a VMM tells KVM about its VFIO files.
	VFIODevice bool
	// Checks holds every check made, in order, each with its result, and the reason
	// when the feature is absent or the check failed.
	Checks []Check
}

// Check is the result of one probe.
type Check struct {
	// Name is one of the Check* constants, e.g. [CheckVMTypes].
	Name string
	// OK is true when the feature is present.
	OK bool
	// Value is the kernel's answer in readable form: "12", "0x3 (default, sw-protected)",
	// "0x8 (private)", "0"; empty when there was none.
	Value string
	// Reason says why OK is false, in a sentence an operator can act on; empty when OK.
	Reason string
	// Err is the error behind Reason when the check itself failed (an *[Error] keeping
	// the errno), nil when the kernel simply answered "absent".
	Err error
}

// Lookup returns the check called name.
func (f Facts) Lookup(name string) (Check, bool) {
	for _, c := range f.Checks {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

func (f *Facts) add(c Check) { f.Checks = append(f.Checks, c) }

// Probe reads the KVM facts of this host through the device node at path: a full path
// such as "/dev/kvm", a directory holding a "kvm" node (a dev root), or "" for
// [DefaultPath]. It opens the node, checks KVM_GET_API_VERSION, asks KVM_CHECK_EXTENSION
// about VM types, guest_memfd and memory attributes, and creates one default VM to ask
// whether a kvm-vfio device can be created (KVM_CREATE_DEVICE with
// KVM_CREATE_DEVICE_TEST), closing everything before it returns.
//
// A feature that is absent is not an error: its [Check] in Facts.Checks says why. Probe
// fails only when path is not a usable KVM device: the node is missing (an *[Error]
// matching errdefs.ErrNotSupported and keeping ENOENT), may not be opened
// (errdefs.ErrPermissionDenied, EACCES or EPERM), is not KVM (ENOTTY from
// KVM_GET_API_VERSION, errdefs.ErrNotSupported), or reports an API version other than 12
// (errdefs.ErrNotSupported). The Facts returned with an error hold the checks made up to
// the failing one, so the failure can be reported like any other check.
//
// Probe holds no state and is safe for concurrent use; a daemon probes once (e.g. with
// sync.OnceValues) since the answers do not change while the kernel runs.
func Probe(path string) (Facts, error) {
	path = resolvePath(path)
	facts := Facts{Path: path}
	f, err := os.OpenFile(path, os.O_RDWR, 0) // os opens with O_CLOEXEC
	if err != nil {
		e := openError(path, err)
		facts.add(Check{Name: CheckOpen, Reason: e.Err.Error(), Err: e})
		return facts, e
	}
	defer f.Close()
	facts.add(Check{Name: CheckOpen, OK: true, Value: path})
	return facts, probe(system{f}, &facts)
}

// resolvePath turns Probe's argument into the path of the device node.
func resolvePath(path string) string {
	if path == "" {
		return DefaultPath
	}
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return filepath.Join(path, "kvm")
	}
	return path
}

// openError explains a failed open of the KVM device node.
func openError(path string, err error) *Error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &Error{Op: "open", Path: path, Class: errdefs.ErrNotSupported, Err: fmt.Errorf(
			"%w: no KVM on this host (is kvm_intel or kvm_amd loaded? is virtualization enabled in the firmware, or nested virtualization for a VM?)", err)}
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV):
		return &Error{Op: "open", Path: path, Class: errdefs.ErrNotSupported, Err: fmt.Errorf(
			"%w: the node has no KVM driver behind it (is kvm_intel or kvm_amd loaded?)", err)}
	case errors.Is(err, fs.ErrPermission):
		return &Error{Op: "open", Path: path, Class: errdefs.ErrPermissionDenied, Err: fmt.Errorf(
			"%w: this process may not use KVM (run it in the kvm group, or allow the device: DeviceAllow=%s rw)", err, path)}
	}
	return &Error{Op: "open", Path: path, Err: err}
}

// kernel is the part of /dev/kvm that probe uses; tests replace it.
type kernel interface {
	// apiVersion issues KVM_GET_API_VERSION.
	apiVersion() (uintptr, error)
	// checkExtension issues KVM_CHECK_EXTENSION for capability nr, called name.
	checkExtension(name string, nr uintptr) (uintptr, error)
	// createVM issues KVM_CREATE_VM; the caller closes the VM.
	createVM(t VMType) (vm, error)
}

// vm is a VM fd as probe uses it.
type vm interface {
	// createDevice issues KVM_CREATE_DEVICE.
	createDevice(arg *createDevice) error
	Close() error
}

// probe makes the checks after open on k and records them in f. It returns an error only
// when k is not KVM or speaks another API version.
func probe(k kernel, f *Facts) error {
	v, err := k.apiVersion()
	if err != nil {
		if errors.Is(err, unix.ENOTTY) {
			err = fmt.Errorf("%w (not a KVM device)", err)
		}
		e := &Error{Op: "get-api-version", Path: f.Path, Err: err}
		f.add(Check{Name: CheckAPIVersion, Reason: err.Error(), Err: e})
		return e
	}
	f.APIVersion = int(v)
	if v != KVM_API_VERSION {
		e := &Error{Op: "get-api-version", Path: f.Path, Class: errdefs.ErrNotSupported,
			Err: fmt.Errorf("KVM API version %d, want %d", v, KVM_API_VERSION)}
		f.add(Check{Name: CheckAPIVersion, Value: strconv.FormatUint(uint64(v), 10), Reason: e.Err.Error(), Err: e})
		return e
	}
	f.add(Check{Name: CheckAPIVersion, OK: true, Value: strconv.Itoa(KVM_API_VERSION)})

	if m := f.extension(k, CheckVMTypes, "KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES, vmTypesString,
		"the kernel does not report VM types (KVM_CAP_VM_TYPES is Linux 6.8+ and x86 only); only the default VM type can be assumed"); m != 0 {
		f.VMTypes = vmTypes(uint64(m))
	}
	f.UserMemory2 = f.extension(k, CheckUserMemory2, "KVM_CAP_USER_MEMORY2", KVM_CAP_USER_MEMORY2, decimal,
		"no KVM_SET_USER_MEMORY_REGION2 (Linux 6.8+)") != 0
	f.GuestMemfd = f.extension(k, CheckGuestMemfd, "KVM_CAP_GUEST_MEMFD", KVM_CAP_GUEST_MEMFD, decimal,
		"no guest_memfd (Linux 6.8+ with CONFIG_KVM_GUEST_MEMFD, which x86_64 KVM selects)") != 0
	f.GuestMemfdFlags = GuestMemfdFlags(f.extension(k, CheckGuestMemfdFlags, "KVM_CAP_GUEST_MEMFD_FLAGS", KVM_CAP_GUEST_MEMFD_FLAGS,
		func(r uintptr) string { return GuestMemfdFlags(r).String() },
		"no guest_memfd creation flags such as mmap (Linux 6.18+ with guest_memfd)"))
	f.MemoryAttributes = MemoryAttributes(f.extension(k, CheckMemoryAttributes, "KVM_CAP_MEMORY_ATTRIBUTES", KVM_CAP_MEMORY_ATTRIBUTES,
		func(r uintptr) string { return MemoryAttributes(r).String() },
		"no private/shared memory attributes (Linux 6.8+ with CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, which AMD SEV, Intel TDX or KVM_SW_PROTECTED_VM support selects)"))

	f.probeVFIODevice(k)
	return nil
}

// extension asks KVM_CHECK_EXTENSION about capability nr (called capName) and records the
// answer as check name: present when non-zero, with the value formatted by format;
// absent with reason absent when zero. It returns the answer, 0 when the ioctl failed.
func (f *Facts) extension(k kernel, name, capName string, nr uintptr, format func(uintptr) string, absent string) uintptr {
	r, err := k.checkExtension(capName, nr)
	switch {
	case err != nil:
		e := &Error{Op: "check-extension " + capName, Path: f.Path, Err: err}
		f.add(Check{Name: name, Reason: err.Error(), Err: e})
		return 0
	case r == 0:
		f.add(Check{Name: name, Value: "0", Reason: capName + " is 0: " + absent})
		return 0
	}
	f.add(Check{Name: name, OK: true, Value: format(r)})
	return r
}

// probeVFIODevice creates a default VM and asks it whether a kvm-vfio device can be
// created, without creating one.
func (f *Facts) probeVFIODevice(k kernel) {
	v, err := k.createVM(KVM_X86_DEFAULT_VM)
	if err != nil {
		e := &Error{Op: "create-vm", Path: f.Path, Err: err}
		f.add(Check{Name: CheckVFIODevice, Reason: "cannot create a VM to ask: " + err.Error(), Err: e})
		return
	}
	defer v.Close() // destroys the VM; nothing else refers to it
	arg := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
	switch err := v.createDevice(&arg); {
	case err == nil:
		f.VFIODevice = true
		f.add(Check{Name: CheckVFIODevice, OK: true, Value: "kvm-vfio"})
	case errors.Is(err, unix.ENODEV):
		// kvm_ioctl_create_device: no ops registered for the type.
		f.add(Check{Name: CheckVFIODevice, Reason: "the kernel has no kvm-vfio device (built without CONFIG_KVM_VFIO): " + err.Error()})
	default:
		e := &Error{Op: "create-device kvm-vfio", Path: f.Path, Err: err}
		f.add(Check{Name: CheckVFIODevice, Reason: err.Error(), Err: e})
	}
}

func decimal(r uintptr) string { return strconv.FormatUint(uint64(r), 10) }

// vmTypesString formats a KVM_CAP_VM_TYPES mask: "0x13 (default, sw-protected, snp)".
func vmTypesString(m uintptr) string {
	ts := vmTypes(uint64(m))
	names := make([]string, len(ts))
	for i, t := range ts {
		names[i] = t.String()
	}
	return "0x" + strconv.FormatUint(uint64(m), 16) + " (" + strings.Join(names, ", ") + ")"
}

// system is the real /dev/kvm.
type system struct{ f *os.File }

func (s system) apiVersion() (uintptr, error) {
	return ioctl.Value(s.f, "KVM_GET_API_VERSION", KVM_GET_API_VERSION, 0)
}

func (s system) checkExtension(name string, nr uintptr) (uintptr, error) {
	return ioctl.Value(s.f, "KVM_CHECK_EXTENSION "+name, KVM_CHECK_EXTENSION, nr)
}

func (s system) createVM(t VMType) (vm, error) {
	fd, err := ioctl.Value(s.f, "KVM_CREATE_VM", KVM_CREATE_VM, uintptr(t))
	if err != nil {
		return nil, err
	}
	// The kernel opened the VM fd with O_CLOEXEC (kvm_dev_ioctl_create_vm).
	return vmFile{os.NewFile(fd, "kvm-vm")}, nil
}

// vmFile is a real VM fd.
type vmFile struct{ f *os.File }

func (v vmFile) createDevice(arg *createDevice) error {
	_, err := ioctl.Ioctl(v.f, "KVM_CREATE_DEVICE", KVM_CREATE_DEVICE, arg)
	return err
}

func (v vmFile) Close() error { return v.f.Close() }
