package kvm

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/ioctl"
)

// kernelConsts maps every constant and request number this package mirrors to its Go
// value; TestUAPI compares them with test/uapi/linux-7.2.txt, which test/uapi prints from
// the Linux 7.2 headers.
var kernelConsts = map[string]uint64{
	"KVMIO":                        KVMIO,
	"KVM_API_VERSION":              KVM_API_VERSION,
	"KVM_GET_API_VERSION":          uint64(KVM_GET_API_VERSION),
	"KVM_CREATE_VM":                uint64(KVM_CREATE_VM),
	"KVM_CHECK_EXTENSION":          uint64(KVM_CHECK_EXTENSION),
	"KVM_CREATE_DEVICE":            uint64(KVM_CREATE_DEVICE),
	"KVM_CAP_USER_MEMORY2":         KVM_CAP_USER_MEMORY2,
	"KVM_CAP_MEMORY_ATTRIBUTES":    KVM_CAP_MEMORY_ATTRIBUTES,
	"KVM_CAP_GUEST_MEMFD":          KVM_CAP_GUEST_MEMFD,
	"KVM_CAP_VM_TYPES":             KVM_CAP_VM_TYPES,
	"KVM_CAP_GUEST_MEMFD_FLAGS":    KVM_CAP_GUEST_MEMFD_FLAGS,
	"KVM_CREATE_DEVICE_TEST":       KVM_CREATE_DEVICE_TEST,
	"KVM_DEV_TYPE_VFIO":            KVM_DEV_TYPE_VFIO,
	"KVM_MEMORY_ATTRIBUTE_PRIVATE": uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE),
	"GUEST_MEMFD_FLAG_MMAP":        uint64(GUEST_MEMFD_FLAG_MMAP),
	"GUEST_MEMFD_FLAG_INIT_SHARED": uint64(GUEST_MEMFD_FLAG_INIT_SHARED),
	"KVM_X86_DEFAULT_VM":           uint64(KVM_X86_DEFAULT_VM),
	"KVM_X86_SW_PROTECTED_VM":      uint64(KVM_X86_SW_PROTECTED_VM),
	"KVM_X86_SEV_VM":               uint64(KVM_X86_SEV_VM),
	"KVM_X86_SEV_ES_VM":            uint64(KVM_X86_SEV_ES_VM),
	"KVM_X86_SNP_VM":               uint64(KVM_X86_SNP_VM),
	"KVM_X86_TDX_VM":               uint64(KVM_X86_TDX_VM),
}

// The request numbers follow from their _IO/_IOWR definitions in include/uapi/linux/kvm.h
// (lines 715, 716, 724, 1346); KVM_CREATE_DEVICE encodes the size of the Go mirror.
func TestRequestNumbers(t *testing.T) {
	for _, tt := range []struct {
		name         string
		got, derived uintptr
	}{
		{"KVM_GET_API_VERSION", KVM_GET_API_VERSION, ioctl.IO(KVMIO, 0x00)},
		{"KVM_CREATE_VM", KVM_CREATE_VM, ioctl.IO(KVMIO, 0x01)},
		{"KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, ioctl.IO(KVMIO, 0x03)},
		{"KVM_CREATE_DEVICE", KVM_CREATE_DEVICE, ioctl.IOWR(KVMIO, 0xe0, unsafe.Sizeof(createDevice{}))},
	} {
		if tt.got != tt.derived {
			t.Errorf("%s = %#x, its _IO/_IOWR definition gives %#x", tt.name, tt.got, tt.derived)
		}
	}
	if got := ioctl.Size(KVM_CREATE_DEVICE); got != sizeofCreateDevice {
		t.Errorf("KVM_CREATE_DEVICE encodes size %d, struct is %d", got, sizeofCreateDevice)
	}
}

func TestVMTypeString(t *testing.T) {
	for _, tt := range []struct {
		t    VMType
		want string
	}{
		{KVM_X86_DEFAULT_VM, "default"},
		{KVM_X86_SW_PROTECTED_VM, "sw-protected"},
		{KVM_X86_SEV_VM, "sev"},
		{KVM_X86_SEV_ES_VM, "sev-es"},
		{KVM_X86_SNP_VM, "snp"},
		{KVM_X86_TDX_VM, "tdx"},
		{6, "type-6"},
		{1 << 31, "type-2147483648"},
	} {
		if got := tt.t.String(); got != tt.want {
			t.Errorf("VMType(%d).String() = %q, want %q", uint32(tt.t), got, tt.want)
		}
	}
}

func TestMaskStrings(t *testing.T) {
	for _, tt := range []struct {
		got, want string
	}{
		{MemoryAttributes(0).String(), "0"},
		{KVM_MEMORY_ATTRIBUTE_PRIVATE.String(), "0x8 (private)"},
		{MemoryAttributes(0x9).String(), "0x9 (private, 0x1)"},
		{GuestMemfdFlags(0).String(), "0"},
		{(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).String(), "0x3 (mmap, init-shared)"},
		{GuestMemfdFlags(0x6).String(), "0x6 (init-shared, 0x4)"},
		{vmTypesString(0x1), "0x1 (default)"},
		{vmTypesString(0x3d), "0x3d (default, sev, sev-es, snp, tdx)"},
		{vmTypesString(0x41), "0x41 (default, type-6)"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	if got := vmTypes(0); got != nil {
		t.Errorf("vmTypes(0) = %v, want nil", got)
	}
	if got := vmTypes(1 << 63); len(got) != 1 || got[0] != 63 {
		t.Errorf("vmTypes(1<<63) = %v, want [type-63]", got)
	}
}
