package kvm

import (
	"strconv"
	"strings"
)

// KVMIO is the ioctl type ("magic") of KVM (include/uapi/linux/kvm.h:682).
const KVMIO = 0xAE

// KVM_API_VERSION is the only API version KVM has ever reported
// (include/uapi/linux/kvm.h:22); KVM_GET_API_VERSION must return it.
const KVM_API_VERSION = 12

// Request numbers (include/uapi/linux/kvm.h, Linux 7.2). KVM encodes the argument size.
const (
	// KVM_GET_API_VERSION is _IO(KVMIO, 0x00) on /dev/kvm (kvm.h:715).
	KVM_GET_API_VERSION uintptr = 0xae00
	// KVM_CREATE_VM is _IO(KVMIO, 0x01) on /dev/kvm (kvm.h:716); arg = VM type by value,
	// returns a VM fd (O_CLOEXEC).
	KVM_CREATE_VM uintptr = 0xae01
	// KVM_CHECK_EXTENSION is _IO(KVMIO, 0x03) on /dev/kvm or a VM fd (kvm.h:724); arg =
	// capability number by value, returns 0 when absent, else 1 or a cap-specific value.
	KVM_CHECK_EXTENSION uintptr = 0xae03
	// KVM_CREATE_DEVICE is _IOWR(KVMIO, 0xe0, struct kvm_create_device) on a VM fd
	// (kvm.h:1346).
	KVM_CREATE_DEVICE uintptr = 0xc00caee0
)

// Capabilities asked with KVM_CHECK_EXTENSION (include/uapi/linux/kvm.h:981-994).
const (
	// KVM_CAP_USER_MEMORY2 (kvm.h:981): KVM_SET_USER_MEMORY_REGION2 exists (Linux 6.8).
	KVM_CAP_USER_MEMORY2 = 231
	// KVM_CAP_MEMORY_ATTRIBUTES (kvm.h:983) returns the mask of memory attributes
	// KVM_SET_MEMORY_ATTRIBUTES accepts (Linux 6.8; x86).
	KVM_CAP_MEMORY_ATTRIBUTES = 233
	// KVM_CAP_GUEST_MEMFD (kvm.h:984): KVM_CREATE_GUEST_MEMFD exists (Linux 6.8).
	KVM_CAP_GUEST_MEMFD = 234
	// KVM_CAP_VM_TYPES (kvm.h:985) returns the bitmask of supported x86 VM types: bit n
	// set means KVM_CREATE_VM accepts type n (Linux 6.8; x86 only).
	KVM_CAP_VM_TYPES = 235
	// KVM_CAP_GUEST_MEMFD_FLAGS (kvm.h:994) returns the GUEST_MEMFD_FLAG_* bits
	// KVM_CREATE_GUEST_MEMFD accepts (Linux 6.18).
	KVM_CAP_GUEST_MEMFD_FLAGS = 244
)

// Device control (include/uapi/linux/kvm.h:1179-1214).
const (
	// KVM_CREATE_DEVICE_TEST (kvm.h:1179) in kvm_create_device.flags only asks whether the
	// device type exists: nothing is created and no fd is returned.
	KVM_CREATE_DEVICE_TEST = 1
	// KVM_DEV_TYPE_VFIO (kvm.h:1213, the fourth entry of enum kvm_device_type, which
	// starts at 1) is the kvm-vfio pseudo device (virt/kvm/vfio.c).
	KVM_DEV_TYPE_VFIO = 4
)

// VMType is an x86 VM type, the argument of KVM_CREATE_VM
// (arch/x86/include/uapi/asm/kvm.h:970-975, Linux 7.2).
type VMType uint32

// x86 VM types.
const (
	KVM_X86_DEFAULT_VM      VMType = 0 // a plain VM
	KVM_X86_SW_PROTECTED_VM VMType = 1 // private memory without hardware protection (CONFIG_KVM_SW_PROTECTED_VM; testing only)
	KVM_X86_SEV_VM          VMType = 2 // AMD SEV (Linux 6.10)
	KVM_X86_SEV_ES_VM       VMType = 3 // AMD SEV-ES (Linux 6.10)
	KVM_X86_SNP_VM          VMType = 4 // AMD SEV-SNP (Linux 6.11)
	KVM_X86_TDX_VM          VMType = 5 // Intel TDX (Linux 6.16; needs CONFIG_INTEL_TDX_HOST)
)

var vmTypeNames = [...]string{
	KVM_X86_DEFAULT_VM:      "default",
	KVM_X86_SW_PROTECTED_VM: "sw-protected",
	KVM_X86_SEV_VM:          "sev",
	KVM_X86_SEV_ES_VM:       "sev-es",
	KVM_X86_SNP_VM:          "snp",
	KVM_X86_TDX_VM:          "tdx",
}

// String returns the type's short name ("default", "sev-es", "tdx", …), or "type-N" for
// a type this package does not know.
func (t VMType) String() string {
	if int(t) < len(vmTypeNames) {
		return vmTypeNames[t]
	}
	return "type-" + strconv.FormatUint(uint64(t), 10)
}

// vmTypes decodes a KVM_CAP_VM_TYPES bitmask.
func vmTypes(mask uint64) []VMType {
	var ts []VMType
	for n := range 64 {
		if mask&(1<<n) != 0 {
			ts = append(ts, VMType(n))
		}
	}
	return ts
}

// MemoryAttributes is a mask of KVM memory attributes, as KVM_CAP_MEMORY_ATTRIBUTES
// reports and KVM_SET_MEMORY_ATTRIBUTES takes.
type MemoryAttributes uint64

// KVM_MEMORY_ATTRIBUTE_PRIVATE (include/uapi/linux/kvm.h:1652) marks guest pages as
// private (backed by guest_memfd, not by the host mapping). It is the only attribute in
// Linux 7.2.
const KVM_MEMORY_ATTRIBUTE_PRIVATE MemoryAttributes = 1 << 3

// String returns the mask in hex with the names of its known bits, e.g. "0x8 (private)".
func (a MemoryAttributes) String() string {
	return bitString(uint64(a), []bitName{{uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE), "private"}})
}

// GuestMemfdFlags is a mask of KVM_CREATE_GUEST_MEMFD flags, as KVM_CAP_GUEST_MEMFD_FLAGS
// reports.
type GuestMemfdFlags uint64

// guest_memfd creation flags (include/uapi/linux/kvm.h:1655-1656).
const (
	// GUEST_MEMFD_FLAG_MMAP lets the host mmap() the guest_memfd file.
	GUEST_MEMFD_FLAG_MMAP GuestMemfdFlags = 1 << 0
	// GUEST_MEMFD_FLAG_INIT_SHARED creates the file with all of its memory shared
	// (without it the memory starts private).
	GUEST_MEMFD_FLAG_INIT_SHARED GuestMemfdFlags = 1 << 1
)

// String returns the mask in hex with the names of its known bits, e.g.
// "0x3 (mmap, init-shared)".
func (f GuestMemfdFlags) String() string {
	return bitString(uint64(f), []bitName{
		{uint64(GUEST_MEMFD_FLAG_MMAP), "mmap"},
		{uint64(GUEST_MEMFD_FLAG_INIT_SHARED), "init-shared"},
	})
}

type bitName struct {
	bit  uint64
	name string
}

// bitString formats v as "0x…" followed by the names of its known bits and the unknown
// rest in parentheses; "0" for 0.
func bitString(v uint64, names []bitName) string {
	if v == 0 {
		return "0"
	}
	var parts []string
	rest := v
	for _, n := range names {
		if v&n.bit != 0 {
			parts = append(parts, n.name)
			rest &^= n.bit
		}
	}
	if rest != 0 {
		parts = append(parts, "0x"+strconv.FormatUint(rest, 16))
	}
	return "0x" + strconv.FormatUint(v, 16) + " (" + strings.Join(parts, ", ") + ")"
}
