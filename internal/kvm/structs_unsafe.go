package kvm

import (
	"structs"
	"unsafe"
)

// createDevice mirrors struct kvm_create_device (include/uapi/linux/kvm.h:1181, Linux 3.10;
// unchanged in 7.2), the argument of KVM_CREATE_DEVICE.
type createDevice struct {
	_     structs.HostLayout
	Type  uint32 // in: KVM_DEV_TYPE_*
	FD    uint32 // out: the device fd (not written with KVM_CREATE_DEVICE_TEST)
	Flags uint32 // in: KVM_CREATE_DEVICE_TEST or 0
}

// sizeofCreateDevice is the size KVM_CREATE_DEVICE encodes (12 bytes).
const sizeofCreateDevice = unsafe.Sizeof(createDevice{})

// newCreateDeviceTest returns the argument that asks whether device type typ exists
// without creating one.
func newCreateDeviceTest(typ uint32) createDevice {
	return createDevice{Type: typ, Flags: KVM_CREATE_DEVICE_TEST}
}
