package tenant

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// FuzzParseCgroupFile checks that no input makes the parser panic, that every error is
// classified, and that a path it returns is absolute, bounded, NUL- and newline-free and
// is the one "0::" line of the input.
func FuzzParseCgroupFile(f *testing.F) {
	for _, s := range []string{
		v2File, hybridFile, v1File, "", "\n", "0::/\n", "0::/a:b\n", "0::/a (deleted)\n",
		"0::/../x\n", "0::/a\n0::/b\n", "0:cpu:/a\n", "x::/a\n", "1:cpu\n", "0::\n", "0::/a\x00b",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseCgroupFile(b)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) && !errors.Is(err, errdefs.ErrNotSupported) {
				t.Fatalf("error %q is neither ErrInvalidArgument nor ErrNotSupported", err)
			}
			if len(err.Error()) > 1024 {
				t.Fatalf("error of %d bytes", len(err.Error()))
			}
			return
		}
		if p == "" || p[0] != '/' || len(p) > maxPath+len(deleted) || strings.ContainsAny(p, "\x00\n") {
			t.Fatalf("ParseCgroupFile(%q) = %q: not an absolute, bounded, single-line path", b, p)
		}
		v2Lines := 0
		for _, line := range bytes.Split(b, []byte{'\n'}) {
			if bytes.HasPrefix(line, []byte("0::")) {
				v2Lines++
				if string(line[3:]) != p {
					t.Fatalf("ParseCgroupFile(%q) = %q, not the path of its 0:: line", b, p)
				}
			}
		}
		if v2Lines != 1 {
			t.Fatalf("ParseCgroupFile(%q) = %q from %d 0:: lines", b, p, v2Lines)
		}
	})
}

// FuzzUnit checks that Unit never panics and that a unit it returns is a clean, absolute
// prefix of p ending at a component boundary, below a parent or a kubepods cgroup, and is
// its own unit.
func FuzzUnit(f *testing.F) {
	for _, s := range []struct{ p, parents string }{
		{vm1 + "/libvirt/emulator", "/machine.slice"},
		{pod + "/cri-containerd-1.scope", ""},
		{"/kubepods/burstable/pod1-2/c", "/machine.slice"},
		{"/a/kubelet-kubepods.slice/kubelet-kubepods-pod1.slice/x", ""},
		{"/system.slice/x.service", "/system.slice\n/machine.slice"},
		{"/user.slice/user-1000.slice/session-3.scope", "/machine.slice"},
		{"/../machine.slice/x", "/machine.slice"},
		{"/", "/"},
		{"", ""},
	} {
		f.Add(s.p, s.parents)
	}
	f.Fuzz(func(t *testing.T, p, parentList string) {
		var parents []string
		if parentList != "" {
			parents = strings.Split(parentList, "\n")
		}
		u, ok := Unit(p, parents)
		if !ok {
			if u != "" {
				t.Fatalf("Unit(%q, %q) = %q, false", p, parents, u)
			}
			return
		}
		if !validUnit(u) || !validPath(p) {
			t.Fatalf("Unit(%q, %q) = %q: unit or path not clean and absolute", p, parents, u)
		}
		if u != p && !strings.HasPrefix(p, u+"/") {
			t.Fatalf("Unit(%q, %q) = %q: not a component prefix of the path", p, parents, u)
		}
		parent := u[:strings.LastIndexByte(u, '/')]
		if parent == "" {
			parent = "/"
		}
		if n, pod := kubePod(p); !(pod && n == len(u)) && !slices.Contains(parents, parent) {
			t.Fatalf("Unit(%q, %q) = %q: neither a pod nor a direct child of a parent", p, parents, u)
		}
		if again, ok := Unit(u, parents); !ok || again != u {
			t.Fatalf("Unit(%q, %q) = %q, %v; want the unit itself", u, parents, again, ok)
		}
		if _, err := ParseID(string(forUnit(107, u))); err != nil {
			t.Fatalf("unit %q makes a malformed ID: %v", u, err)
		}
	})
}

// FuzzParseID checks that ParseID never panics, that what it accepts round-trips through
// the accessors and the constructors, and that the accessors agree with it.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{
		"uid=107", "uid=0", "uid=4294967294", "uid=4294967295", "uid=007",
		"uid=107,cgroup=" + vm1, "uid=107,cgroup=/", "uid=107,cgroup=/a/../b",
		"uid=107,label=system_u:system_r:svirt_t:s0:c10,c20", "uid=107,label=", "uid=1,label=x,cgroup=/y",
		"uid=1,pid=2", "", "uid=",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		uid := ID(s).UID()
		unit, isUnit := ID(s).Unit()
		label, isLabel := ID(s).Label()
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ParseID(%q) error %q is not ErrInvalidArgument", s, err)
			}
			if uid != InvalidUID || isUnit || isLabel {
				t.Fatalf("malformed ID %q: UID %d, unit %v, label %v", s, uid, isUnit, isLabel)
			}
			return
		}
		if string(id) != s || uid == InvalidUID || (isUnit && isLabel) {
			t.Fatalf("ParseID(%q) = %q: uid %d, unit %v, label %v", s, id, uid, isUnit, isLabel)
		}
		var rebuilt ID
		switch {
		case isUnit:
			rebuilt = forUnit(uid, unit)
		case isLabel:
			rebuilt = forLabel(uid, label)
		default:
			rebuilt = ForUID(uid)
		}
		if rebuilt != id {
			t.Fatalf("ID %q rebuilt from its parts is %q", id, rebuilt)
		}
	})
}
