// Package mirrors is a fake kernel-facing package for the tests of CheckUAPI.
package mirrors

import "structs"

type item struct {
	_   structs.HostLayout
	Off uint64
}

type list struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	Count uint32
	ID    int32
}

type listOne struct {
	_     structs.HostLayout
	Head  list
	First item
}

// Request numbers.
const (
	DEMO_GET uintptr = 0x3b01
	DEMO_SET uintptr = 0x3b02
)

// KVMIO-style: kernel spelling without an underscore.
const DEMOIO = 0xAE

// FlagWide (DEMO_FLAG_WIDE) is Go-cased; its doc comment names the kernel's.
const FlagWide = 1 << 0

// DEMO_FUTURE is not in the headers yet.
const DEMO_FUTURE = 9

// NotKernel is an ordinary Go constant.
const NotKernel = 3
