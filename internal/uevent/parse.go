package uevent

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// Limits of [Parse]. The kernel sends at most 64 variables in a 2 KiB buffer
// (UEVENT_NUM_ENVP, UEVENT_BUFFER_SIZE in include/linux/kobject.h); these leave room.
const (
	// MaxMessageSize is the largest message Parse accepts, in bytes.
	MaxMessageSize = 64 << 10
	// MaxKeys is the most KEY=VALUE variables Parse accepts in one message.
	MaxKeys = 256
)

var (
	// ErrMalformed matches the errors of [Parse]: the message is not a kernel uevent.
	ErrMalformed = errors.New("malformed uevent")
	// ErrOverflow matches the error of [Listener.Next] when the kernel dropped uevents
	// because the socket's receive buffer was full (ENOBUFS): resynchronise from sysfs.
	ErrOverflow = errors.New("uevent socket overflowed: events were lost")
)

// libudevMagic starts the messages udevd re-broadcasts (netlink group 2).
var libudevMagic = []byte("libudev\x00")

// Event is one kernel uevent.
type Event struct {
	// Action is what happened: "add", "remove", "bind", "unbind", "change", "move",
	// "online" or "offline".
	Action string
	// DevPath is the device's sysfs path below /sys, e.g.
	// "/devices/pci0000:00/0000:00:03.0".
	DevPath string
	// Subsystem is the device's subsystem, e.g. "pci".
	Subsystem string
	// Driver is the DRIVER variable: the driver the device is bound to when the event is
	// sent ("bind", "change", ...); "" when it has none. An "unbind" event has none: the
	// kernel sends it after detaching the driver.
	Driver string
	// PCISlotName is the PCI_SLOT_NAME variable of PCI devices, the BDF
	// ("0000:00:03.0"); "" for other devices.
	PCISlotName string
	// Seqnum is the kernel's sequence number of the event (SEQNUM), increasing by one per
	// event system-wide.
	Seqnum uint64
	// Env holds every KEY=VALUE variable of the message, including the ones above.
	Env map[string]string
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("uevent: %s: %w", fmt.Sprintf(format, args...), ErrMalformed)
}

// Parse parses one kernel uevent message: the header "ACTION@DEVPATH\0" followed by
// KEY=VALUE\0 variables. Every error matches [ErrMalformed]. Parse checks that ACTION,
// DEVPATH, SUBSYSTEM and SEQNUM are present, that ACTION and DEVPATH agree with the
// header and that SEQNUM is a decimal number; it rejects empty variables, keys with
// characters outside printable ASCII, duplicate keys, more than [MaxKeys] variables,
// messages over [MaxMessageSize] bytes and libudev-format messages ("libudev\0" magic,
// sent by udevd, not the kernel).
func Parse(b []byte) (Event, error) {
	switch {
	case len(b) == 0:
		return Event{}, malformed("empty message")
	case len(b) > MaxMessageSize:
		return Event{}, malformed("message of %d bytes exceeds %d", len(b), MaxMessageSize)
	case bytes.HasPrefix(b, libudevMagic):
		return Event{}, malformed("libudev-format message (sent by udevd, not the kernel)")
	}
	header, rest, ok := bytes.Cut(b, []byte{0})
	if !ok {
		return Event{}, malformed("no NUL after the header")
	}
	action, devpath, ok := bytes.Cut(header, []byte{'@'})
	if !ok || len(action) == 0 || len(devpath) == 0 || devpath[0] != '/' {
		return Event{}, malformed("header %q is not ACTION@/DEVPATH", truncate(header))
	}
	// Every variable ends with a NUL; tolerate a missing last one.
	rest = bytes.TrimSuffix(rest, []byte{0})
	if len(rest) == 0 {
		return Event{}, malformed("no variables")
	}
	ev := Event{Env: make(map[string]string)}
	for n := 0; len(rest) > 0; n++ {
		if n == MaxKeys {
			return Event{}, malformed("more than %d variables", MaxKeys)
		}
		var kv []byte
		kv, rest, _ = bytes.Cut(rest, []byte{0})
		k, v, ok := bytes.Cut(kv, []byte{'='})
		if !ok || len(k) == 0 {
			return Event{}, malformed("variable %d %q is not KEY=VALUE", n, truncate(kv))
		}
		for _, c := range k {
			if c <= ' ' || c > '~' {
				return Event{}, malformed("variable %d: key %q has a character outside printable ASCII", n, truncate(k))
			}
		}
		key := string(k)
		if _, dup := ev.Env[key]; dup {
			return Event{}, malformed("variable %s appears twice", key)
		}
		ev.Env[key] = string(v)
	}
	need := func(key string) (string, error) {
		v, ok := ev.Env[key]
		if !ok {
			return "", malformed("no %s variable", key)
		}
		return v, nil
	}
	var err error
	if ev.Action, err = need("ACTION"); err != nil {
		return Event{}, err
	}
	if ev.Action != string(action) {
		return Event{}, malformed("ACTION=%q disagrees with the header's %q", truncate([]byte(ev.Action)), truncate(action))
	}
	if ev.DevPath, err = need("DEVPATH"); err != nil {
		return Event{}, err
	}
	if ev.DevPath != string(devpath) {
		return Event{}, malformed("DEVPATH=%q disagrees with the header's %q", truncate([]byte(ev.DevPath)), truncate(devpath))
	}
	if ev.Subsystem, err = need("SUBSYSTEM"); err != nil {
		return Event{}, err
	}
	seq, err := need("SEQNUM")
	if err != nil {
		return Event{}, err
	}
	if ev.Seqnum, err = strconv.ParseUint(seq, 10, 64); err != nil {
		return Event{}, malformed("SEQNUM=%q is not a decimal number", truncate([]byte(seq)))
	}
	ev.Driver = ev.Env["DRIVER"]
	ev.PCISlotName = ev.Env["PCI_SLOT_NAME"]
	return ev, nil
}

// truncate shortens b for an error message.
func truncate(b []byte) []byte {
	const max = 64
	if len(b) > max {
		return append(b[:max:max], "..."...)
	}
	return b
}
