package kvm

import (
	"testing"
	"unsafe"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// Size and offsets printed by a C sizeof/offsetof program from include/uapi/linux/kvm.h of
// Linux 7.2.13 (struct kvm_create_device: 12 bytes, type@0, fd@4, flags@8).
func TestLayout(t *testing.T) {
	var cd createDevice
	testutil.CheckLayout(t, "kvm_create_device", unsafe.Sizeof(cd), 12,
		testutil.Offset("type", unsafe.Offsetof(cd.Type), 0),
		testutil.Offset("fd", unsafe.Offsetof(cd.FD), 4),
		testutil.Offset("flags", unsafe.Offsetof(cd.Flags), 8))
	if sizeofCreateDevice != 12 {
		t.Errorf("sizeofCreateDevice = %d, want 12", sizeofCreateDevice)
	}
}

func TestNewCreateDeviceTest(t *testing.T) {
	got := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
	if got.Type != 4 || got.Flags != 1 || got.FD != 0 {
		t.Errorf("newCreateDeviceTest(VFIO) = %+v, want {Type:4 FD:0 Flags:1}", got)
	}
}
