package kvm

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/ioctl"
)

// Request numbers printed by a C program from the Linux 7.2.13 headers, and their derivation
// from the definitions in include/uapi/linux/kvm.h (lines 715, 716, 724, 1346).
func TestRequestNumbers(t *testing.T) {
	for _, tt := range []struct {
		name    string
		got     uintptr
		derived uintptr
		want    uintptr
	}{
		{"KVM_GET_API_VERSION", KVM_GET_API_VERSION, ioctl.IO(KVMIO, 0x00), 0xae00},
		{"KVM_CREATE_VM", KVM_CREATE_VM, ioctl.IO(KVMIO, 0x01), 0xae01},
		{"KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, ioctl.IO(KVMIO, 0x03), 0xae03},
		{"KVM_CREATE_DEVICE", KVM_CREATE_DEVICE, ioctl.IOWR(KVMIO, 0xe0, unsafe.Sizeof(createDevice{})), 0xc00caee0},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
		if tt.derived != tt.want {
			t.Errorf("%s from its _IO/_IOWR definition = %#x, want %#x", tt.name, tt.derived, tt.want)
		}
	}
	if got := ioctl.Size(KVM_CREATE_DEVICE); got != sizeofCreateDevice {
		t.Errorf("KVM_CREATE_DEVICE encodes size %d, struct is %d", got, sizeofCreateDevice)
	}
}

// Values from include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h of 7.2.13.
func TestConstants(t *testing.T) {
	for _, tt := range []struct {
		name      string
		got, want uint64
	}{
		{"KVM_API_VERSION", KVM_API_VERSION, 12},
		{"KVMIO", KVMIO, 0xae},
		{"KVM_CAP_USER_MEMORY2", KVM_CAP_USER_MEMORY2, 231},
		{"KVM_CAP_MEMORY_ATTRIBUTES", KVM_CAP_MEMORY_ATTRIBUTES, 233},
		{"KVM_CAP_GUEST_MEMFD", KVM_CAP_GUEST_MEMFD, 234},
		{"KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES, 235},
		{"KVM_CAP_GUEST_MEMFD_FLAGS", KVM_CAP_GUEST_MEMFD_FLAGS, 244},
		{"KVM_CREATE_DEVICE_TEST", KVM_CREATE_DEVICE_TEST, 1},
		{"KVM_DEV_TYPE_VFIO", KVM_DEV_TYPE_VFIO, 4},
		{"KVM_MEMORY_ATTRIBUTE_PRIVATE", uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE), 1 << 3},
		{"GUEST_MEMFD_FLAG_MMAP", uint64(GUEST_MEMFD_FLAG_MMAP), 1 << 0},
		{"GUEST_MEMFD_FLAG_INIT_SHARED", uint64(GUEST_MEMFD_FLAG_INIT_SHARED), 1 << 1},
		{"KVM_X86_DEFAULT_VM", uint64(KVM_X86_DEFAULT_VM), 0},
		{"KVM_X86_SW_PROTECTED_VM", uint64(KVM_X86_SW_PROTECTED_VM), 1},
		{"KVM_X86_SEV_VM", uint64(KVM_X86_SEV_VM), 2},
		{"KVM_X86_SEV_ES_VM", uint64(KVM_X86_SEV_ES_VM), 3},
		{"KVM_X86_SNP_VM", uint64(KVM_X86_SNP_VM), 4},
		{"KVM_X86_TDX_VM", uint64(KVM_X86_TDX_VM), 5},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %d, want %d", tt.name, tt.got, tt.want)
		}
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
