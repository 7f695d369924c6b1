package peercred

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// StartTime returns when process pid started, in clock ticks since boot (field 22 of
// /proc/<pid>/stat, proc(5)). A pid and its start time name one process for the life of
// the boot: a later process that reuses the pid starts later. Read it after pinning the
// process with a pidfd and check the pin is still alive afterwards ([Process.Alive]), so
// that the time read is the pinned process's.
func StartTime(pid int32) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("process start time of pid %d: %w", pid, err)
	}
	return parseStartTime(b)
}

// parseStartTime reads field 22 of a /proc/<pid>/stat line. The second field (comm) is in
// parentheses and may hold spaces and ')' itself, so fields are counted after the last ')'.
func parseStartTime(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc stat (no comm): %w", errdefs.ErrInvalidArgument)
	}
	fields := bytes.Fields(stat[i+1:])
	// After comm: field 3 (state) is fields[0], so field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("malformed /proc stat (%d fields after comm): %w", len(fields), errdefs.ErrInvalidArgument)
	}
	v, err := strconv.ParseUint(string(fields[19]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed /proc stat starttime %q: %w", fields[19], errdefs.ErrInvalidArgument)
	}
	return v, nil
}

// Stamp returns a number that tells the pinned process from any other process of this
// boot with the same pid, so that a restarted daemon can pin it again ([Repin]): on pidfs
// (Linux 6.9+) the pidfd's inode, which pidfs never reuses within a boot; on older
// kernels the process start time ([StartTime]), read while the pin is alive. The pidfs
// stamp needs no /proc access, so it works when the daemon cannot see other users'
// processes (ProtectProc=invisible).
func (p *Process) Stamp() (uint64, error) {
	ino, ok, err := pidfsInode(p.f)
	if err != nil {
		return 0, err
	}
	if ok {
		return ino, nil
	}
	start, err := StartTime(p.pid)
	if err != nil {
		return 0, err
	}
	if !p.Alive() {
		return 0, fmt.Errorf("pid %d exited while being stamped: %w", p.pid, errdefs.ErrNotFound)
	}
	return start, nil
}

// Repin pins process pid again after a restart of this process, given the [Process.Stamp]
// recorded when it was first pinned. It fails with errdefs.ErrNotFound if pid is gone or
// now names another process (pid reuse).
func Repin(pid int32, stamp uint64) (*Process, error) {
	p, err := Open(pid)
	if err != nil {
		return nil, err
	}
	got, err := p.Stamp()
	if err == nil && got != stamp {
		err = fmt.Errorf("pid %d is another process than the one pinned before (stamp %d, not %d): %w", pid, got, stamp, errdefs.ErrNotFound)
	}
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}
