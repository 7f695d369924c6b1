package tenant

import (
	"path"
	"strings"
)

// DefaultUnits returns the cgroup parents a [Resolver] with nil Units uses:
// /machine.slice, where libvirt (through systemd-machined), systemd-nspawn and machinectl
// put each VM or container in a unit of its own. It returns a new slice on every call.
func DefaultUnits() []string { return []string{"/machine.slice"} }

// Unit returns the tenant unit of cgroup path p, and false if p is in no unit (its tenant
// is then the uid alone).
//
// A unit is a direct child of one of parents, or a Kubernetes pod. For parent
// /machine.slice, both /machine.slice/machine-qemu\x2d1\x2dvm1.scope and
// /machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/emulator are in unit
// /machine.slice/machine-qemu\x2d1\x2dvm1.scope, while /machine.slice itself is in none.
// Pods are recognised without configuration, at the first component of p that is a
// kubepods cgroup:
//
//   - systemd driver: K.slice, where K is "kubepods" or ends in "-kubepods" (with
//     --cgroup-root), followed by K-pod<uid>.slice (guaranteed) or by K-burstable.slice or
//     K-besteffort.slice and then K-<qos>-pod<uid>.slice; the unit ends at the pod slice;
//   - cgroupfs driver: kubepods followed by pod<uid>, or by burstable or besteffort and then
//     pod<uid>; the unit ends at the pod directory.
//
// If p is in several units (a pod below a configured parent, or nested parents) the one
// nearest the root wins. p and each parent must be absolute and clean (as path.Clean
// leaves them: no "." or ".." components, no repeated or trailing slashes); Unit returns
// false for any other p (such as the "/.."-prefixed paths of peers outside the reader's
// cgroup namespace) and ignores any other parent, and also the parent "/", which would
// make every top-level cgroup a tenant.
func Unit(p string, parents []string) (string, bool) {
	if !validPath(p) || p == "/" {
		return "", false
	}
	best := -1 // length of the unit found so far in p; units are prefixes of p
	for _, parent := range parents {
		if !validPath(parent) || parent == "/" {
			continue
		}
		rest, ok := strings.CutPrefix(p, parent+"/")
		if !ok {
			continue
		}
		n := len(parent) + 1 + componentLen(rest)
		if best < 0 || n < best {
			best = n
		}
	}
	if n, ok := kubePod(p); ok && (best < 0 || n < best) {
		best = n
	}
	if best < 0 {
		return "", false
	}
	return p[:best], true
}

// componentLen returns the length of the first component of the relative path s.
func componentLen(s string) int {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return i
	}
	return len(s)
}

// kubePod finds the pod of the first kubepods component of the clean absolute path p and
// returns the length of the pod's path, a prefix of p.
func kubePod(p string) (int, bool) {
	comps := strings.Split(p[1:], "/")
	end := 0 // length of "/" + comps[:i] joined, i.e. p up to and excluding comps[i]
	for i, c := range comps {
		end += 1 + len(c) // now p[:end] ends with comps[i]
		var n int         // components after comps[i] that make up the pod
		switch {
		case c == "kubepods":
			n = cgroupfsPod(comps[i+1:])
		case c == "kubepods.slice" || (strings.HasSuffix(c, "-kubepods.slice") && len(c) > len("-kubepods.slice")):
			n = systemdPod(strings.TrimSuffix(c, ".slice"), comps[i+1:])
		default:
			continue
		}
		if n == 0 {
			return 0, false // only the first kubepods component counts
		}
		for _, d := range comps[i+1 : i+1+n] {
			end += 1 + len(d)
		}
		return end, true
	}
	return 0, false
}

// systemdPod returns how many of comps, which follow kubepods slice k.slice, make up the
// path of a pod slice; 0 if they do not lead to one.
func systemdPod(k string, comps []string) int {
	if len(comps) == 0 {
		return 0
	}
	if isSystemdPod(comps[0], k) {
		return 1
	}
	for _, qos := range [...]string{"-burstable", "-besteffort"} {
		if comps[0] == k+qos+".slice" {
			if len(comps) > 1 && isSystemdPod(comps[1], k+qos) {
				return 2
			}
			return 0
		}
	}
	return 0
}

// isSystemdPod reports whether c is prefix-pod<uid>.slice. The kubelet writes the pod uid
// with '-' replaced by '_'.
func isSystemdPod(c, prefix string) bool {
	uid, ok := strings.CutPrefix(c, prefix+"-pod")
	if !ok {
		return false
	}
	uid, ok = strings.CutSuffix(uid, ".slice")
	return ok && isPodUID(uid, false)
}

// cgroupfsPod returns how many of comps, which follow kubepods, make up the path of a pod
// directory; 0 if they do not lead to one.
func cgroupfsPod(comps []string) int {
	if len(comps) == 0 {
		return 0
	}
	if isCgroupfsPod(comps[0]) {
		return 1
	}
	if (comps[0] == "burstable" || comps[0] == "besteffort") && len(comps) > 1 && isCgroupfsPod(comps[1]) {
		return 2
	}
	return 0
}

func isCgroupfsPod(c string) bool {
	uid, ok := strings.CutPrefix(c, "pod")
	return ok && isPodUID(uid, true)
}

// isPodUID reports whether s looks like a pod uid as the kubelet writes it into cgroup
// names: a UUID (or a static pod's hash) of letters, digits and '_' or '-'.
func isPodUID(s string, dash bool) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		switch c := s[i]; {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_':
		case c == '-' && dash:
		default:
			return false
		}
	}
	return true
}

// validPath reports whether p is an absolute, clean cgroup path that the kernel could
// print: no NUL or newline (cgroup names cannot hold '\n') and at most PATH_MAX-1 bytes.
func validPath(p string) bool {
	return p != "" && p[0] == '/' && len(p) <= maxPath && path.Clean(p) == p &&
		strings.IndexByte(p, 0) < 0 && strings.IndexByte(p, '\n') < 0
}

// validUnit reports whether p can be the unit in an [ID].
func validUnit(p string) bool { return validPath(p) && p != "/" }

// PodUID returns the uid of the Kubernetes pod whose unit unit is (a pod slice of the
// systemd cgroup driver or a pod directory of cgroupfs, as [Unit] recognises them), with
// the '_' the systemd driver writes for '-' turned back: the pod's metadata.uid. It
// reports false if unit is not exactly a pod's unit.
func PodUID(unit string) (string, bool) {
	if !strings.HasPrefix(unit, "/") {
		return "", false
	}
	n, ok := kubePod(unit)
	if !ok || n != len(unit) {
		return "", false
	}
	last := unit[strings.LastIndexByte(unit, '/')+1:]
	if uid, ok := strings.CutSuffix(last, ".slice"); ok {
		i := strings.LastIndex(uid, "-pod")
		return strings.ReplaceAll(uid[i+len("-pod"):], "_", "-"), true
	}
	return strings.TrimPrefix(last, "pod"), true
}

// ValidPodUID reports whether s is a pod uid that [PodUID] can return: letters, digits
// and '-', at most 128 bytes.
func ValidPodUID(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for i := range len(s) {
		switch c := s[i]; {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '-':
		default:
			return false
		}
	}
	return true
}
