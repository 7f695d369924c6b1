//go:build vmsystemd

package systemd

import (
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// TestHostUnderUnit: `mmiobrokerctl host` against the daemon as the shipped unit runs it
// (private /dev, device cgroup filter, no network) sees the real KVM of the guest —
// nested SVM under TCG — through the /dev/kvm the unit binds in and allows, not a
// "missing from this process's /dev" reason: what lets an orchestrator read a host's VM
// types from the daemon on a production host.
func TestHostUnderUnit(t *testing.T) {
	requireDaemon(t)
	daemonRunning(t)
	out, err := ctl("-json", "host")
	if err != nil {
		t.Fatalf("mmiobrokerctl -json host: %v\n%s", err, out)
	}
	var resp brokerv1.GetHostResponse // -json prints the response as protojson
	if err := protojson.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("mmiobrokerctl -json host is not a GetHostResponse: %v\n%s", err, out)
	}
	ok := map[string]bool{}
	for _, p := range resp.GetHost().GetProbes() {
		ok[p.GetName()] = p.GetOk()
		if !p.GetOk() {
			t.Logf("probe %s absent: %s", p.GetName(), p.GetReason())
		}
	}
	for _, name := range []string{"vfio", "dma_buf_export", "kvm", "kvm.api_version", "kvm.vm_types", "kvm.vfio_device"} {
		if !ok[name] {
			t.Errorf("probe %s is not OK under the unit", name)
		}
	}
	var types []string
	for _, vt := range resp.GetHost().GetVmTypes() {
		types = append(types, vt.GetName())
	}
	if !slices.Contains(types, "default") {
		t.Errorf("KVM's VM types under the unit: %v, want default among them", types)
	}
}
