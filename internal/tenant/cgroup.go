package tenant

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// maxCgroupFile bounds what ReadCgroup reads and ParseCgroupFile accepts. A line holds at
// most PATH_MAX bytes of path; a hybrid host has about a dozen v1 hierarchies.
const maxCgroupFile = 64 << 10

// deleted is what the kernel appends to the v2 path of a cgroup that has been removed.
const deleted = " (deleted)"

// ReadCgroup returns the cgroup v2 path of process pid, the "0::" line of
// <procRoot>/<pid>/cgroup (procRoot "" means /proc). The path is relative to the
// caller's cgroup namespace, as the kernel prints it.
//
// Errors name the pid and keep the errno: a process that is gone yields an error matching
// unix.ENOENT (or unix.ESRCH, if it exits while the file is read) and
// errdefs.ErrNotFound; a host without the v2 hierarchy yields errdefs.ErrNotSupported.
// The pid may be reused once its process has been reaped: see the package documentation
// for how a caller makes sure the path read is its peer's.
func ReadCgroup(procRoot string, pid int32) (string, error) {
	if pid <= 0 {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, errdefs.ErrInvalidArgument)
	}
	if procRoot == "" {
		procRoot = "/proc"
	}
	b, err := readBounded(filepath.Join(procRoot, strconv.Itoa(int(pid)), "cgroup"))
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
			return "", fmt.Errorf("cgroup of pid %d: %w: %w", pid, err, errdefs.ErrNotFound)
		}
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	p, err := ParseCgroupFile(b)
	if err != nil {
		return "", fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	return p, nil
}

// readBounded reads file name, failing if it is larger than maxCgroupFile.
func readBounded(name string) ([]byte, error) {
	f, err := os.Open(name) // O_RDONLY|O_CLOEXEC
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCgroupFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxCgroupFile {
		return nil, fmt.Errorf("%s is larger than %d bytes: %w", name, maxCgroupFile, errdefs.ErrInvalidArgument)
	}
	return b, nil
}

// ParseCgroupFile returns the cgroup v2 path in b, the contents of a /proc/<pid>/cgroup
// file (cgroups(7)): lines "hierarchy-ID:controller-list:cgroup-path", where the unified
// hierarchy is the one line with ID 0 and no controllers. It accepts pure v2 files and
// hybrid ones (v1 lines and a "0::" line) and returns the path as printed (it may end in
// " (deleted)" for an exited process, or begin with "/.." outside the reader's cgroup
// namespace).
//
// A file without a "0::" line (a v1-only host) yields an error wrapping
// errdefs.ErrNotSupported; an empty, oversized or malformed file (a line that is not
// three colon-separated fields with a decimal ID, two "0::" lines, a path that is not
// absolute or longer than PATH_MAX-1 bytes (plus " (deleted)") or holds a NUL) one wrapping
// errdefs.ErrInvalidArgument.
func ParseCgroupFile(b []byte) (string, error) {
	switch {
	case len(b) == 0:
		return "", fmt.Errorf("empty cgroup file: %w", errdefs.ErrInvalidArgument)
	case len(b) > maxCgroupFile:
		return "", fmt.Errorf("cgroup file of %d bytes exceeds %d: %w", len(b), maxCgroupFile, errdefs.ErrInvalidArgument)
	}
	var (
		v2    []byte
		found bool
	)
	for n := 1; len(b) > 0; n++ {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		id, rest, ok1 := bytes.Cut(line, []byte{':'})
		ctrl, p, ok2 := bytes.Cut(rest, []byte{':'})
		if !ok1 || !ok2 || !decimal(id) {
			return "", fmt.Errorf("malformed cgroup file line %d %q: want ID:controllers:path: %w", n, truncate(string(line)), errdefs.ErrInvalidArgument)
		}
		if string(id) != "0" {
			continue // a v1 hierarchy
		}
		if len(ctrl) != 0 {
			return "", fmt.Errorf("malformed cgroup file line %d %q: hierarchy 0 with controllers: %w", n, truncate(string(line)), errdefs.ErrInvalidArgument)
		}
		if found {
			return "", fmt.Errorf("malformed cgroup file: second 0:: line at line %d: %w", n, errdefs.ErrInvalidArgument)
		}
		v2, found = p, true
	}
	switch {
	case !found:
		return "", fmt.Errorf("cgroup file has no 0:: line: the host mounts only cgroup v1 hierarchies, and tenants by cgroup need the unified (v2) hierarchy: %w", errdefs.ErrNotSupported)
	case len(v2) == 0 || v2[0] != '/':
		return "", fmt.Errorf("cgroup v2 path %q is not absolute: %w", truncate(string(v2)), errdefs.ErrInvalidArgument)
	case len(v2) > maxPath+len(deleted):
		return "", fmt.Errorf("cgroup v2 path of %d bytes exceeds %d: %w", len(v2), maxPath, errdefs.ErrInvalidArgument)
	case bytes.IndexByte(v2, 0) >= 0:
		return "", fmt.Errorf("cgroup v2 path %q holds a NUL byte: %w", truncate(string(v2)), errdefs.ErrInvalidArgument)
	}
	return string(v2), nil
}

// decimal reports whether b is a non-empty string of ASCII digits.
func decimal(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
