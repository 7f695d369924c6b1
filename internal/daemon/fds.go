package daemon

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

// Fds the daemon can need at most, by what holds them. A device cycle closes and reopens
// the device fd, and a reopen that fails for lack of an fd (EMFILE) loses the device and
// every lease on it; so the daemon refuses to start unless its limits fit RLIMIT_NOFILE
// with the reserve below left over.
const (
	fdsPerControlConn = 2      // the socket and the pinned caller's pidfd
	fdsPerClaimConn   = 3      // the socket, the peer's pidfd, the dma-buf being sent
	claimConns        = 2 * 64 // fdpass's claim slots plus its reject slots (fdpass.Options defaults)
	fdsPerLease       = 3      // the broker's dma-buf copy, and (if it is the process's only lease) the holder's pidfd and its waiter's dup
	fdsPerDevice      = 6      // device, group and container (or iommufd), two notifier eventfds, a reopen
	fdReserve         = 64     // listeners, uevent socket, journal, sd_notify sockets, runtime, stdio, logs
)

// fdBudget returns how many fds the configuration can need at most, and the parts.
func fdBudget(res *config.Resolved) (int, string) {
	control := (res.MaxConnections + peercred.RootConnsReserve) * fdsPerControlConn
	claim := claimConns * fdsPerClaimConn
	maxLeases := res.Broker.WithDefaults().Limits.MaxLeases
	leases := maxLeases * fdsPerLease
	devices := len(res.Devices) * fdsPerDevice
	need := control + claim + leases + devices + fdReserve
	return need, fmt.Sprintf("%d for %d control connections, %d for claims, %d for %d leases, %d for %d devices, %d reserved",
		control, res.MaxConnections+peercred.RootConnsReserve, claim, leases, maxLeases, devices, len(res.Devices), fdReserve)
}

// checkFDs fails unless the configuration's worst case fits limit (RLIMIT_NOFILE). With
// limit 0 it uses the process's own, raising it to what is needed if it is lower and the
// process may (CAP_SYS_RESOURCE for the hard limit; the Go runtime already raised the soft
// limit to the hard one).
func checkFDs(res *config.Resolved, limit uint64) (uint64, error) {
	need, parts := fdBudget(res)
	if limit == 0 {
		var rl unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
			return 0, fmt.Errorf("RLIMIT_NOFILE: %w", err)
		}
		if rl.Cur < uint64(need) {
			want := unix.Rlimit{Cur: uint64(need), Max: max(rl.Max, uint64(need))}
			if unix.Setrlimit(unix.RLIMIT_NOFILE, &want) == nil {
				rl = want
			}
		}
		limit = rl.Cur
	}
	if uint64(need) > limit {
		return limit, fmt.Errorf("the configuration can need %d file descriptors (%s), but RLIMIT_NOFILE is %d: raise LimitNOFILE= or lower [limits] max_leases: %w",
			need, parts, limit, errdefs.ErrInvalidArgument)
	}
	return limit, nil
}
