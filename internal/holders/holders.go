// Package holders compares the kernel's view of who holds the daemon's dma-bufs with the
// lease table: which processes have each lease's dma-buf open (/proc/*/fdinfo, see
// [dmabuf.ScanProcesses]), whether a tenant still holds the fd of a lease that has ended
// (it outlasts its lease until the device cycles), and which dma-bufs of the daemon's
// devices no lease accounts for.
//
// A dma-buf is attributed to a lease by its inode (the current generation's st_ino, which
// the broker records) or, for older generations, by its name: the daemon names every
// dma-buf it exports "mmb-<lease id>" (DMA_BUF_SET_NAME). Only buffers the vfio-pci
// exporter made (exp_name "vfio_pci_core") are considered. A vfio-pci dma-buf is
// "unaccounted" when the daemon itself holds it but no lease has its inode (a daemon leak),
// or when it carries an mmb- name of no lease the daemon knows. Dma-bufs that other
// programs on the host export from devices the daemon does not own carry no such name and
// are not reported.
//
// A holder may rename its dma-buf (any process with the fd may call DMA_BUF_SET_NAME), so
// an older generation renamed by its holder is not attributed; its fd is dead anyway (the
// cycle that reissued the lease revoked it). The current generation is found by inode,
// which no process can change.
package holders

import (
	"slices"
	"strings"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

// ExporterName is the exp_name of dma-bufs exported by vfio-pci (vfio_pci_core).
const ExporterName = "vfio_pci_core"

// NamePrefix starts the name the daemon gives each lease's dma-buf: "mmb-" + lease id.
const NamePrefix = "mmb-"

// Role says why a process has a lease's dma-buf open.
type Role string

// Roles.
const (
	// RoleHolder is the lease's holder: the process that claimed it.
	RoleHolder Role = "holder"
	// RolePassedOn is any other process: the holder (or someone it gave the fd to) passed
	// the descriptor on, by fork or SCM_RIGHTS.
	RolePassedOn Role = "passed_on"
	// RoleDaemon is the daemon itself, which keeps a lease's dma-buf until its claim is
	// delivered (for good on kernels that revoke dma-bufs one by one).
	RoleDaemon Role = "daemon"
	// RoleFDStore is PID 1: systemd's fd store keeps the daemon's copies across restarts.
	RoleFDStore Role = "fd_store"
)

// Holder is one descriptor of a lease's dma-buf in one process.
type Holder struct {
	dmabuf.Process
	FD    int
	Inode uint64
	Role  Role
	// Current is set when the descriptor is the lease's current generation; an older
	// generation's fd is dead (revoked by the cycle that reissued the lease).
	Current bool
}

// Lease is a lease with every process that holds its dma-buf.
type Lease struct {
	Lease   broker.Lease
	Holders []Holder
	// Outlasting is set when the lease has ended but its fd still works (its device has
	// not cycled yet) and a process other than the daemon and the fd store still has it
	// open: its tenant outlasts the lease until the cycle, at the latest Lease.RevokeDue.
	Outlasting bool
}

// Unaccounted is a vfio-pci dma-buf descriptor that no lease accounts for.
type Unaccounted struct {
	dmabuf.Process
	FD   int
	Info dmabuf.FDInfo
}

// Counts are the report's totals, for metrics. Descriptors held by the daemon and the fd
// store are not counted except in Unaccounted.
type Counts struct {
	// Holder counts live leases' current fds in their holders.
	Holder int
	// PassedOn counts live leases' current fds in other processes.
	PassedOn int
	// EndedLive counts fds of ended leases that still work (the device has not cycled).
	EndedLive int
	// Dead counts fds that no longer work but are still open: older generations, and ended
	// leases whose device cycled.
	Dead int
	// Unaccounted counts vfio-pci dma-buf fds no lease accounts for.
	Unaccounted int
	// Outlasting counts ended leases whose working fd is still open in some process.
	Outlasting int
}

// Report is the result of [Join]: the leases with their holders, oldest lease first.
type Report struct {
	// Time is when the scan started; Duration how long it took.
	Time     time.Time
	Duration time.Duration
	// Scanned and Inaccessible count the processes read and those that could not be
	// (their dma-bufs are missing from the report); Truncated is set if the scan hit its
	// bound.
	Scanned, Inaccessible int
	Truncated             bool
	// Leases are the leases given to Join that are live, ended but live, or held by some
	// process.
	Leases      []Lease
	Unaccounted []Unaccounted
	Counts      Counts
}

// Join attributes a scan's references to leases. self is the daemon's PID; leases are the
// leases the caller may see, and unaccounted selects whether dma-bufs no lease accounts
// for are reported (only to callers who may see every lease).
func Join(s dmabuf.Scan, leases []broker.Lease, self int, unaccounted bool) Report {
	r := Report{Scanned: s.Scanned, Inaccessible: s.Inaccessible, Truncated: s.Truncated}
	byInode := make(map[uint64]int, len(leases))
	byID := make(map[string]int, len(leases))
	out := make([]Lease, len(leases))
	for i, l := range leases {
		out[i].Lease = l
		if l.Inode != 0 {
			byInode[l.Inode] = i
		}
		byID[l.ID] = i
	}
	for _, ref := range s.Refs {
		if ref.Info.ExpName != ExporterName {
			continue
		}
		proc := s.Processes[ref.PID]
		proc.PID = ref.PID
		i, current := byInode[ref.Info.Inode]
		if !current {
			id, named := strings.CutPrefix(ref.Info.Name, NamePrefix)
			var known bool
			if named {
				i, known = byID[id]
				// The daemon's own dma-buf that is not a lease's current generation is
				// one it should have closed.
				known = known && ref.PID != self
			}
			if !known {
				if named || ref.PID == self {
					r.Counts.Unaccounted++
					if unaccounted {
						r.Unaccounted = append(r.Unaccounted, Unaccounted{Process: proc, FD: ref.FD, Info: ref.Info})
					}
				}
				continue
			}
		}
		l := &out[i]
		h := Holder{Process: proc, FD: ref.FD, Inode: ref.Info.Inode, Current: current}
		switch {
		case ref.PID == self:
			h.Role = RoleDaemon
		case ref.PID == 1:
			h.Role = RoleFDStore
		case int32(ref.PID) == l.Lease.Holder.PID:
			h.Role = RoleHolder
		default:
			h.Role = RolePassedOn
		}
		l.Holders = append(l.Holders, h)
		if h.Role == RoleDaemon || h.Role == RoleFDStore {
			continue
		}
		switch live := l.Lease.Live(); {
		case current && live && h.Role == RoleHolder:
			r.Counts.Holder++
		case current && live:
			r.Counts.PassedOn++
		case current && !l.Lease.Dead:
			r.Counts.EndedLive++
			l.Outlasting = true
		default:
			r.Counts.Dead++
		}
	}
	for _, l := range out {
		if l.Outlasting {
			r.Counts.Outlasting++
		}
		if l.Lease.Live() || !l.Lease.Dead || len(l.Holders) > 0 {
			r.Leases = append(r.Leases, l)
		}
	}
	for i := range r.Leases {
		slices.SortFunc(r.Leases[i].Holders, func(a, b Holder) int {
			if a.PID != b.PID {
				return a.PID - b.PID
			}
			return a.FD - b.FD
		})
	}
	return r
}
