package server

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// TestGrpcurl runs the grpcurl examples of docs/api.md against a server, if grpcurl is
// installed: reflection must be enough to list, describe and call every method.
func TestGrpcurl(t *testing.T) {
	bin, err := exec.LookPath("grpcurl")
	if err != nil {
		t.Skip("grpcurl not installed; make test-unit installs it in .bin (or: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4)")
	}
	e := newEnv(t)
	run := func(wantOK bool, args ...string) string {
		t.Helper()
		args = append([]string{"-plaintext", "-unix"}, args...)
		out, err := exec.CommandContext(t.Context(), bin, args...).CombinedOutput()
		if (err == nil) != wantOK {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	call := func(method, data string) map[string]any {
		t.Helper()
		args := []string{}
		if data != "" {
			args = append(args, "-d", data)
		}
		out := run(true, append(args, e.socket, "mmiobroker.v1.Broker/"+method)...)
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%s: %v\n%s", method, err, out)
		}
		return m
	}

	if out := run(true, e.socket, "list"); !strings.Contains(out, "mmiobroker.v1.Broker\n") || !strings.Contains(out, "grpc.health.v1.Health") {
		t.Errorf("list:\n%s", out)
	}
	if out := run(true, e.socket, "describe", "mmiobroker.v1.Broker"); !strings.Contains(out, "rpc WatchEvents") {
		t.Errorf("describe:\n%s", out)
	}
	if out := run(true, e.socket, "describe", "mmiobroker.v1.AllocateLeaseRequest"); !strings.Contains(out, "repeated .mmiobroker.v1.Range ranges = 3;") {
		t.Errorf("describe AllocateLeaseRequest:\n%s", out)
	}
	if out := run(true, "-d", `{"service":"mmiobroker.v1.Broker"}`, e.socket, "grpc.health.v1.Health/Check"); !strings.Contains(out, "SERVING") {
		t.Errorf("health:\n%s", out)
	}
	if devs := call("ListDevices", "")["devices"].([]any); len(devs) != 4 {
		t.Errorf("ListDevices: %v", devs)
	}
	if d := call("GetDevice", `{"bdf":"0000:00:03.0"}`)["device"].(map[string]any); d["bdf"] != bdfA {
		t.Errorf("GetDevice: %v", d)
	}
	// A lease lives as long as the process that allocated it: grpcurl exits at once, so
	// the daemon releases its lease (HOLDER_EXITED). Watch for that from this process.
	watch := e.watch(root.ctx(t), root, 0)
	alloc := call("AllocateLease", `{"bdf":"0000:00:03.0","bar":0,"ranges":[{"offset":"0","length":"4096"}],"kind":"LEASE_KIND_SHARED","vm_name":"demo"}`)
	id := alloc["lease"].(map[string]any)["id"].(string)
	if alloc["claimToken"] == "" || alloc["lease"].(map[string]any)["state"] != "LEASE_STATE_ALLOCATED" {
		t.Errorf("AllocateLease: %v", alloc)
	}
	for {
		resp, err := watch.Recv()
		if err != nil {
			t.Fatalf("waiting for grpcurl's lease to end: %v", err)
		}
		if ev := resp.GetEvent(); ev.GetLease().GetId() == id && ev.GetType() == brokerv1.EventType_EVENT_TYPE_RELEASED {
			break
		}
	}
	if l := call("GetLease", `{"lease_id":"`+id+`"}`)["lease"].(map[string]any); l["vmName"] != "demo" || l["endReason"] != "END_REASON_HOLDER_EXITED" {
		t.Errorf("GetLease of the lease grpcurl allocated: %v, want ended HOLDER_EXITED", l)
	}
	// Leases held by this test process, managed through grpcurl as root (an admin).
	held := e.allocate(holder, oneRange(bdfA, 0, page(1), page(1))).GetLease().GetId()
	if ls := call("ListLeases", `{"bdf":"0000:00:03.0","live_only":true}`)["leases"].([]any); len(ls) != 1 {
		t.Errorf("ListLeases: %v", ls)
	}
	if l := call("ReleaseLease", `{"lease_id":"`+held+`"}`)["lease"].(map[string]any); l["state"] != "LEASE_STATE_RELEASED" {
		t.Errorf("ReleaseLease: %v", l)
	}
	held2 := e.allocate(holder, oneRange(bdfA, 0, page(2), page(1))).GetLease().GetId()
	if l := call("RevokeLease", `{"lease_id":"`+held2+`"}`)["lease"].(map[string]any); l["endReason"] != "END_REASON_REVOKED" {
		t.Errorf("RevokeLease: %v", l)
	}
	// The stream replays the events after seq 1 and then waits for more until -max-time
	// cuts it off.
	out := run(false, "-max-time", "3", "-d", `{"after_seq":"1"}`, e.socket, "mmiobroker.v1.Broker/WatchEvents")
	for _, want := range []string{`"seq": "2"`, "END_REASON_HOLDER_EXITED", "EVENT_TYPE_RELEASED", "EVENT_TYPE_REVOKED", "DeadlineExceeded"} {
		if !strings.Contains(out, want) {
			t.Errorf("WatchEvents output lacks %q:\n%s", want, out)
		}
	}
	out = run(false, "-d", `{"bdf":"0000:00:03.0","bar":7,"ranges":[{"length":"4096"}]}`, e.socket, "mmiobroker.v1.Broker/AllocateLease")
	if !strings.Contains(out, "Code: InvalidArgument") || !strings.Contains(out, "device 0000:00:03.0: bar 7: a PCI device has BARs 0-5 only") {
		t.Errorf("bad AllocateLease:\n%s", out)
	}
}
