package dra

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// TestSpecRoundTrip: the tokens a spec carries are read back from its file; a claimed
// lease's device has no token; a spec of another kind gives none.
func TestSpecRoundTrip(t *testing.T) {
	devs := []preparedDevice{
		{Request: "a", Target: target{Name: "0000-3b-00-0-bar0", BDF: "0000:3b:00.0", Length: 4096}, LeaseID: "l1", Token: "0123456789abcdef0123456789abcdef"},
		{Request: "b", Target: target{Name: "0000-3b-00-0-bar4", BDF: "0000:3b:00.0", BAR: 4, Length: 8192}, LeaseID: "l2"},
	}
	spec, err := buildSpec("uid-1", "ns/c", "pod-1", devs, claimSockets{Host: "/run/mmiobroker/fd.sock", Container: "/mmio/fd.sock", GID: 7})
	if err != nil {
		t.Fatal(err)
	}
	if err := cdispec.ValidateVersion(spec); err != nil || spec.Version != "0.7.0" {
		t.Errorf("spec version %q: %v (additionalGids need 0.7.0)", spec.Version, err)
	}
	path := filepath.Join(t.TempDir(), "spec.json")
	if err := writeSpec(path, spec); err != nil {
		t.Fatal(err)
	}
	back, err := readSpec(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(spec, back); diff != "" {
		t.Errorf("spec read back (-wrote +read):\n%s", diff)
	}
	if diff := cmp.Diff(map[string]string{"l1": devs[0].Token}, specTokens(back)); diff != "" {
		t.Errorf("tokens (-want +got):\n%s", diff)
	}
	if env := dratest.EnvOf(back.Devices[1].ContainerEdits.Env); env[EnvClaimToken+"_0000_3B_00_0_BAR4"] != "" || env[EnvLeaseID+"_0000_3B_00_0_BAR4"] != "l2" {
		t.Errorf("claimed lease's env: %v", env)
	}
	back.Kind = "example.com/other"
	if got := specTokens(back); len(got) != 0 {
		t.Errorf("tokens of another kind's spec: %v", got)
	}
	// A file that is no spec of ours is an error (and a prepare then allocates anew).
	if err := os.WriteFile(path, []byte(`{"cdiVersion":"0.7.0","kind":"x","devices":[],"extra":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readSpec(path); err == nil {
		t.Error("readSpec accepted an unknown field")
	}
	if s, err := readSpec(filepath.Join(t.TempDir(), "none.json")); s != nil || err != nil {
		t.Errorf("readSpec of a missing file: %v, %v", s, err)
	}
	if err := removeSpec(path); err != nil {
		t.Fatal(err)
	}
	if err := removeSpec(path); err != nil {
		t.Errorf("removeSpec of a missing file: %v", err)
	}
}
