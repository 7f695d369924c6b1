package kvm

import (
	"errors"
	"io/fs"
	"runtime"
	"slices"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// TestHostKVM probes the real /dev/kvm of the machine the test runs on. A development host
// or CI container usually has none, and then the test skips; the VM rig's guest has one,
// where TestVMProbe (kvm_vm_test.go) checks it more strictly.
func TestHostKVM(t *testing.T) {
	testutil.FDLeakCheck(t)
	facts, err := Probe("")
	switch {
	case errors.Is(err, fs.ErrNotExist):
		t.Skip("no /dev/kvm on this host: load kvm_intel or kvm_amd (with virtualization enabled); " +
			"the VM rig probes a real KVM in its guest (TestVMProbe, make test-vm)")
	case errors.Is(err, fs.ErrPermission):
		t.Skipf("cannot open /dev/kvm: %v (run as root or in the kvm group)", err)
	case err != nil:
		t.Fatalf("Probe: %v\nchecks: %+v", err, facts.Checks)
	}
	checkFacts(t, facts)
	if runtime.GOARCH == "amd64" {
		// x86 KVM selects KVM_VFIO, and (from Linux 6.8) reports the default VM type.
		if !facts.VFIODevice {
			t.Error("x86 KVM without the kvm-vfio device")
		}
		if facts.VMTypes != nil && !slices.Contains(facts.VMTypes, KVM_X86_DEFAULT_VM) {
			t.Errorf("VMTypes %v lack the default type", facts.VMTypes)
		}
	}
	// A second probe works as well: the first closed its VM and /dev/kvm.
	if _, err := Probe(""); err != nil {
		t.Errorf("second Probe: %v", err)
	}
}

// checkFacts logs every check of a successful Probe of a real KVM and fails t for a check
// that failed, an absent feature without a reason, or an API version other than 12.
func checkFacts(t *testing.T, facts Facts) {
	t.Helper()
	for _, c := range facts.Checks {
		t.Logf("%-18s ok=%-5v value=%q reason=%q", c.Name, c.OK, c.Value, c.Reason)
		if c.Err != nil {
			t.Errorf("check %s failed: %v", c.Name, c.Err)
		}
		if !c.OK && c.Reason == "" {
			t.Errorf("check %s is absent without a reason", c.Name)
		}
	}
	if facts.APIVersion != KVM_API_VERSION {
		t.Errorf("APIVersion = %d, want %d", facts.APIVersion, KVM_API_VERSION)
	}
}
