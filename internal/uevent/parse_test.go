package uevent

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// msg builds a uevent message: the header, then each variable, NUL-terminated.
func msg(header string, vars ...string) []byte {
	var b bytes.Buffer
	b.WriteString(header)
	b.WriteByte(0)
	for _, v := range vars {
		b.WriteString(v)
		b.WriteByte(0)
	}
	return b.Bytes()
}

const eduPath = "/devices/pci0000:00/0000:00:03.0"

// pciVars are the variables the kernel sends for the rig's first edu device.
func pciVars(action string, seq string, extra ...string) []string {
	v := []string{"ACTION=" + action, "DEVPATH=" + eduPath, "SUBSYSTEM=pci"}
	v = append(v, extra...)
	v = append(v, "PCI_CLASS=FF0000", "PCI_ID=1234:11E8", "PCI_SUBSYS_ID=1AF4:1100",
		"PCI_SLOT_NAME=0000:00:03.0", "MODALIAS=pci:v00001234d000011E8sv00001AF4sd00001100bcFFsc00i00",
		"SEQNUM="+seq)
	return v
}

func TestParse(t *testing.T) {
	env := func(action, seq string, extra ...string) map[string]string {
		m := map[string]string{}
		for _, kv := range pciVars(action, seq, extra...) {
			k, v, _ := strings.Cut(kv, "=")
			m[k] = v
		}
		return m
	}
	for _, tt := range []struct {
		name string
		in   []byte
		want Event
	}{
		{"pci-remove", msg("remove@"+eduPath, pciVars("remove", "1234")...), Event{
			Action: "remove", DevPath: eduPath, Subsystem: "pci", PCISlotName: "0000:00:03.0",
			Seqnum: 1234, Env: env("remove", "1234")}},
		{"pci-unbind", msg("unbind@"+eduPath, pciVars("unbind", "1235")...), Event{
			Action: "unbind", DevPath: eduPath, Subsystem: "pci", PCISlotName: "0000:00:03.0",
			Seqnum: 1235, Env: env("unbind", "1235")}},
		{"pci-bind", msg("bind@"+eduPath, pciVars("bind", "1236", "DRIVER=vfio-pci")...), Event{
			Action: "bind", DevPath: eduPath, Subsystem: "pci", Driver: "vfio-pci", PCISlotName: "0000:00:03.0",
			Seqnum: 1236, Env: env("bind", "1236", "DRIVER=vfio-pci")}},
		{"no-final-nul", bytes.TrimSuffix(msg("bind@"+eduPath, pciVars("bind", "7", "DRIVER=vfio-pci")...), []byte{0}), Event{
			Action: "bind", DevPath: eduPath, Subsystem: "pci", Driver: "vfio-pci", PCISlotName: "0000:00:03.0",
			Seqnum: 7, Env: env("bind", "7", "DRIVER=vfio-pci")}},
		{"synthetic-change", msg("change@/devices/virtual/mem/null", "ACTION=change", "DEVPATH=/devices/virtual/mem/null",
			"SUBSYSTEM=mem", "SYNTH_UUID=2f5e2b3c-1111-4222-8333-444455556666", "SYNTH_ARG_FOO=bar", "MAJOR=1", "MINOR=3",
			"DEVNAME=null", "DEVMODE=0666", "SEQNUM=820"), Event{
			Action: "change", DevPath: "/devices/virtual/mem/null", Subsystem: "mem", Seqnum: 820,
			Env: map[string]string{"ACTION": "change", "DEVPATH": "/devices/virtual/mem/null", "SUBSYSTEM": "mem",
				"SYNTH_UUID": "2f5e2b3c-1111-4222-8333-444455556666", "SYNTH_ARG_FOO": "bar", "MAJOR": "1",
				"MINOR": "3", "DEVNAME": "null", "DEVMODE": "0666", "SEQNUM": "820"}}},
		{"empty-value", msg("add@/module/vfio", "ACTION=add", "DEVPATH=/module/vfio", "SUBSYSTEM=module", "X=", "SEQNUM=0"), Event{
			Action: "add", DevPath: "/module/vfio", Subsystem: "module", Seqnum: 0,
			Env: map[string]string{"ACTION": "add", "DEVPATH": "/module/vfio", "SUBSYSTEM": "module", "X": "", "SEQNUM": "0"}}},
		{"value-with-equals", msg("change@/devices/x", "ACTION=change", "DEVPATH=/devices/x", "SUBSYSTEM=drm", "A=b=c", "SEQNUM=18446744073709551615"), Event{
			Action: "change", DevPath: "/devices/x", Subsystem: "drm", Seqnum: 1<<64 - 1,
			Env: map[string]string{"ACTION": "change", "DEVPATH": "/devices/x", "SUBSYSTEM": "drm", "A": "b=c", "SEQNUM": "18446744073709551615"}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Parse (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	good := pciVars("remove", "1")
	without := func(key string) []string {
		return slices.DeleteFunc(slices.Clone(good), func(kv string) bool { return strings.HasPrefix(kv, key+"=") })
	}
	many := []string{"ACTION=change", "DEVPATH=/devices/x", "SUBSYSTEM=x", "SEQNUM=1"}
	for i := range MaxKeys {
		many = append(many, "K"+strings.Repeat("X", i%7)+string(rune('A'+i%26))+string(rune('A'+i/26))+"=v")
	}
	for _, tt := range []struct {
		name string
		in   []byte
		why  string
	}{
		{"empty", nil, "empty message"},
		{"too-large", append(msg("change@/devices/x", "ACTION=change", "DEVPATH=/devices/x", "SUBSYSTEM=x", "SEQNUM=1"),
			bytes.Repeat([]byte("A"), MaxMessageSize)...), "exceeds"},
		{"libudev", append([]byte("libudev\x00\xfe\xed\xca\xfe"), msg("add@/devices/x", "ACTION=add")...), "libudev"},
		{"no-nul", []byte("add@/devices/x"), "no NUL"},
		{"no-at", msg("add/devices/x", good...), "not ACTION@/DEVPATH"},
		{"empty-action", msg("@"+eduPath, good...), "not ACTION@/DEVPATH"},
		{"relative-devpath", msg("remove@devices/x", good...), "not ACTION@/DEVPATH"},
		{"no-variables", msg("remove@" + eduPath), "no variables"},
		{"empty-variable", msg("remove@"+eduPath, append([]string{""}, good...)...), "is not KEY=VALUE"},
		{"no-equals", msg("remove@"+eduPath, append([]string{"JUNK"}, good...)...), "is not KEY=VALUE"},
		{"empty-key", msg("remove@"+eduPath, append([]string{"=v"}, good...)...), "is not KEY=VALUE"},
		{"key-with-space", msg("remove@"+eduPath, append([]string{"A B=v"}, good...)...), "printable ASCII"},
		{"key-non-ascii", msg("remove@"+eduPath, append([]string{"\xffK=v"}, good...)...), "printable ASCII"},
		{"duplicate", msg("remove@"+eduPath, append(good, "PCI_SLOT_NAME=0000:00:04.0")...), "appears twice"},
		{"no-action", msg("remove@"+eduPath, without("ACTION")...), "no ACTION"},
		{"no-devpath", msg("remove@"+eduPath, without("DEVPATH")...), "no DEVPATH"},
		{"no-subsystem", msg("remove@"+eduPath, without("SUBSYSTEM")...), "no SUBSYSTEM"},
		{"no-seqnum", msg("remove@"+eduPath, without("SEQNUM")...), "no SEQNUM"},
		{"action-mismatch", msg("add@"+eduPath, good...), "disagrees"},
		{"devpath-mismatch", msg("remove@/devices/other", good...), "disagrees"},
		{"bad-seqnum", msg("remove@"+eduPath, append(without("SEQNUM"), "SEQNUM=-1")...), "not a decimal"},
		{"seqnum-overflow", msg("remove@"+eduPath, append(without("SEQNUM"), "SEQNUM=18446744073709551616")...), "not a decimal"},
		{"too-many-keys", msg("change@/devices/x", many...), "more than"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ev, err := Parse(tt.in)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Parse = %+v, %v; want ErrMalformed", ev, err)
			}
			if !strings.Contains(err.Error(), tt.why) {
				t.Errorf("error %q does not say %q", err, tt.why)
			}
			if !strings.HasPrefix(err.Error(), "uevent: ") {
				t.Errorf("error %q does not name the package", err)
			}
		})
	}
}

// encode writes ev back in the kernel's format (the variables sorted).
func encode(ev Event) []byte {
	keys := make([]string, 0, len(ev.Env))
	for k := range ev.Env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	vars := make([]string, len(keys))
	for i, k := range keys {
		vars[i] = k + "=" + ev.Env[k]
	}
	return msg(ev.Action+"@"+ev.DevPath, vars...)
}

func FuzzParse(f *testing.F) {
	f.Add(msg("remove@"+eduPath, pciVars("remove", "1234")...))
	f.Add(msg("bind@"+eduPath, pciVars("bind", "1236", "DRIVER=vfio-pci")...))
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not match ErrMalformed", err)
			}
			return
		}
		// What parses is consistent, bounded, and survives a round trip.
		if ev.Env["ACTION"] != ev.Action || ev.Env["DEVPATH"] != ev.DevPath || ev.Env["SUBSYSTEM"] != ev.Subsystem ||
			ev.Env["DRIVER"] != ev.Driver || ev.Env["PCI_SLOT_NAME"] != ev.PCISlotName {
			t.Fatalf("fields disagree with Env: %+v", ev)
		}
		if len(ev.Env) > MaxKeys || len(b) > MaxMessageSize || bytes.HasPrefix(b, libudevMagic) {
			t.Fatalf("accepted beyond the limits: %d keys, %d bytes", len(ev.Env), len(b))
		}
		enc := encode(ev)
		if len(enc) > MaxMessageSize {
			return // only the restored final NUL made it too long
		}
		again, err := Parse(enc)
		if err != nil {
			t.Fatalf("re-encoded event does not parse: %v", err)
		}
		if diff := cmp.Diff(ev, again); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}

// The committed seeds are real-looking messages: the kernel's must parse, libudev's and
// the broken ones must not.
func TestSeedCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParse")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	accept := map[string]bool{
		"pci-remove": true, "pci-remove-rootport": true, "pci-unbind": true, "pci-bind-vfio": true,
		"pci-bind-other": true, "pci-add": true, "pci-change-aer": true, "vfio-dev-add": true,
		"synthetic-change": true, "module-add": true,
	}
	// Seeds the fuzzer adds (hash names) are only run by FuzzParse.
	reject := map[string]bool{"header-only": true, "mismatch-action": true, "duplicate-key": true, "nul-run": true}
	seen := 0
	for _, e := range ents {
		text, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lit, ok := strings.CutPrefix(string(text), "go test fuzz v1\n[]byte(")
		lit, ok2 := strings.CutSuffix(lit, ")\n")
		if !ok || !ok2 {
			t.Errorf("%s: not a []byte fuzz seed", e.Name())
			continue
		}
		b, err := strconv.Unquote(lit)
		if err != nil {
			t.Errorf("%s: %v", e.Name(), err)
			continue
		}
		ev, err := Parse([]byte(b))
		switch {
		case accept[e.Name()]:
			seen++
			if err != nil {
				t.Errorf("%s: %v", e.Name(), err)
			} else if strings.HasPrefix(e.Name(), "pci-") && (ev.Subsystem != "pci" || ev.PCISlotName == "") {
				t.Errorf("%s: %+v, want a pci event with a slot name", e.Name(), ev)
			}
		case strings.HasPrefix(e.Name(), "libudev") || reject[e.Name()]:
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("%s: Parse = %+v, %v; want ErrMalformed", e.Name(), ev, err)
			}
		}
	}
	if seen != len(accept) {
		t.Errorf("found %d of the %d kernel-format seeds", seen, len(accept))
	}
}
