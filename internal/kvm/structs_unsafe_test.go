package kvm

import (
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestUAPI compares the mirrored struct and every constant with test/uapi/linux-7.2.txt,
// which test/uapi prints from the Linux 7.2 source's own uapi headers and checks in the
// rig. It also fails for a mirror declared in this package but missing here.
func TestUAPI(t *testing.T) {
	testutil.CheckUAPI(t, testutil.UAPISpec{
		Dir:     ".",
		Headers: []string{"linux/kvm.h", "asm/kvm.h"},
		Structs: []testutil.Mirror{
			{C: "kvm_create_device", Go: createDevice{}, Fields: "type fd flags"},
		},
		Consts: kernelConsts,
	})
	if want := testutil.UAPIStruct(t, "kvm_create_device").Size; uint64(sizeofCreateDevice) != want {
		t.Errorf("sizeofCreateDevice = %d, want %d", sizeofCreateDevice, want)
	}
}

func TestNewCreateDeviceTest(t *testing.T) {
	got := newCreateDeviceTest(KVM_DEV_TYPE_VFIO)
	if got.Type != 4 || got.Flags != 1 || got.FD != 0 {
		t.Errorf("newCreateDeviceTest(VFIO) = %+v, want {Type:4 FD:0 Flags:1}", got)
	}
}
