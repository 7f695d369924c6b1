package tenant

import (
	"errors"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestIDRoundTrip(t *testing.T) {
	tests := []struct {
		id    ID
		uid   uint32
		unit  string
		label string
	}{
		{ForUID(107), 107, "", ""},
		{ForUID(0), 0, "", ""},
		{ForUID(InvalidUID - 1), InvalidUID - 1, "", ""},
		{forUnit(107, `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`), 107, `/machine.slice/machine-qemu\x2d1\x2dvm1.scope`, ""},
		{forUnit(107, "/a,label=b"), 107, "/a,label=b", ""},
		{forLabel(107, "system_u:system_r:svirt_t:s0:c10,c20"), 107, "", "system_u:system_r:svirt_t:s0:c10,c20"},
		{forLabel(107, "x,cgroup=/y"), 107, "", "x,cgroup=/y"},
		{forLabel(1000, "libvirt-8a3f4c1e-2b7a-4c1e-9a55-0f3e8d2c1b7a (enforce)"), 1000, "", "libvirt-8a3f4c1e-2b7a-4c1e-9a55-0f3e8d2c1b7a (enforce)"},
	}
	for _, tt := range tests {
		parsed, err := ParseID(tt.id.String())
		if err != nil || parsed != tt.id {
			t.Errorf("ParseID(%q) = %q, %v; want it back", tt.id, parsed, err)
		}
		if got := tt.id.UID(); got != tt.uid {
			t.Errorf("%q.UID() = %d; want %d", tt.id, got, tt.uid)
		}
		if got, ok := tt.id.Unit(); got != tt.unit || ok != (tt.unit != "") {
			t.Errorf("%q.Unit() = %q, %v; want %q", tt.id, got, ok, tt.unit)
		}
		if got, ok := tt.id.Label(); got != tt.label || ok != (tt.label != "") {
			t.Errorf("%q.Label() = %q, %v; want %q", tt.id, got, ok, tt.label)
		}
	}
	if got := string(forUnit(107, "/machine.slice/vm.scope")); got != "uid=107,cgroup=/machine.slice/vm.scope" {
		t.Errorf("cgroup ID = %q", got)
	}
	if got := string(forLabel(107, "l")); got != "uid=107,label=l" {
		t.Errorf("label ID = %q", got)
	}
}

func TestParseIDErrors(t *testing.T) {
	for _, bad := range []string{
		"", "107", "uid=", "uid=x", "uid=-1", "uid=+1", "uid=007", "uid=00", "uid=4294967295", "uid=4294967296",
		"uid=99999999999999999999", "UID=1", " uid=1", "uid=1 ", "uid=1,", "uid=1,pid=2", "uid=1,cgroup=",
		"uid=1,cgroup=/", "uid=1,cgroup=relative", "uid=1,cgroup=/a/../b", "uid=1,cgroup=/a/", "uid=1,cgroup=/a\nb",
		"uid=1,label=", "uid=1,label=a\x00b", "uid=1,label=" + strings.Repeat("l", MaxLabel+1),
	} {
		_, err := ParseID(bad)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseID(%q) error = %v; want ErrInvalidArgument", bad, err)
		}
		id := ID(bad)
		if uid := id.UID(); uid != InvalidUID {
			t.Errorf("ID(%q).UID() = %d; want InvalidUID", bad, uid)
		}
		if _, ok := id.Unit(); ok {
			t.Errorf("ID(%q).Unit() reports a unit", bad)
		}
		if _, ok := id.Label(); ok {
			t.Errorf("ID(%q).Label() reports a label", bad)
		}
	}
}

func TestIDDistinct(t *testing.T) {
	// Identities of different kinds or uids never collide, whatever the values hold.
	ids := []ID{
		ForUID(1), ForUID(10), ForUID(107),
		forUnit(1, "/a"), forUnit(10, "/a"), forUnit(1, "/a,label=b"),
		forLabel(1, "/a"), forLabel(1, "b"), forLabel(10, "b"), forLabel(1, "a,cgroup=/a"),
	}
	seen := map[ID]int{}
	for i, id := range ids {
		if j, ok := seen[id]; ok {
			t.Errorf("ids %d and %d are both %q", j, i, id)
		}
		seen[id] = i
	}
}
