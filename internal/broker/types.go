package broker

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/tenant"
)

// Range is a byte range of a BAR: Offset and Length are page aligned, Length is non-zero.
type Range struct {
	Offset uint64
	Length uint64
}

// End returns the first byte after r.
func (r Range) End() uint64 { return r.Offset + r.Length }

func (r Range) String() string { return fmt.Sprintf("[%#x,+%#x)", r.Offset, r.Length) }

// Buffer is an exported dma-buf held by the broker.
type Buffer interface {
	// Inode is the dma-buf's unique per-boot identity (st_ino).
	Inode() uint64
	// Size is the dma-buf's size in bytes (the sum of its ranges).
	Size() uint64
	// Dup returns a new close-on-exec fd of the same dma-buf for delivery; the caller owns it.
	Dup() (*os.File, error)
	// Close closes the broker's copy. It revokes nothing.
	Close() error
}

// Device is one opened VFIO device as the broker sees it.
type Device interface {
	// Info returns a fresh snapshot of the device (TSM state re-read).
	Info() DeviceInfo
	// Export exports ranges of BAR bar as a dma-buf named name (at most 31 bytes).
	Export(bar int, ranges []Range, name string) (Buffer, error)
	// Revoke makes every dma-buf exported so far dead for good: memory decode off, device
	// fd closed and reopened, memory decode on. Buffers exported afterwards are live.
	Revoke() error
	// Close closes the device; every dma-buf exported from it is revoked for good.
	Close() error
}

// BufferRevoker is implemented by devices whose kernel can revoke one dma-buf without
// touching the others (the proposed VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE). The broker then
// revokes leases one by one and leaves the device's other leases untouched.
type BufferRevoker interface {
	// CanRevokeBuffers reports whether per-buffer revoke is available.
	CanRevokeBuffers() bool
	// RevokeBuffer makes buf dead for good.
	RevokeBuffer(buf Buffer) error
}

// Suspender is implemented by devices that can pause every dma-buf without ending them
// (memory decode off) for maintenance, and resume them.
type Suspender interface {
	Suspend() error
	Resume() error
}

// NoticeKind is the kind of a [Notice].
type NoticeKind int

// Notice kinds.
const (
	// NoticeRelease: the kernel asks for the device back (driver unbind or hot-unplug
	// pending; VFIO_PCI_REQ_IRQ_INDEX). The broker ends the device's leases and closes it.
	NoticeRelease NoticeKind = iota + 1
	// NoticeError: the device reported an error (AER; VFIO_PCI_ERR_IRQ_INDEX).
	NoticeError
)

func (k NoticeKind) String() string {
	switch k {
	case NoticeRelease:
		return "release-request"
	case NoticeError:
		return "error"
	}
	return fmt.Sprintf("notice(%d)", int(k))
}

// Notice is something a device reports by itself.
type Notice struct {
	Kind NoticeKind
	Time time.Time
	// Count is how many times the kernel signalled since the previous notice of this
	// kind, at least 1.
	Count uint64
}

// Restorer is implemented by devices that can come back from a previous run of the
// broker's process (the systemd fd store keeps their fds across a restart).
type Restorer interface {
	// Restored reports whether the device was kept open across the restart: the dma-bufs
	// the previous run exported are live.
	Restored() bool
	// AdoptBuffer takes back the broker's copy of the dma-buf with inode ino, exported by
	// the previous run.
	AdoptBuffer(ino uint64) (Buffer, error)
}

// Detacher is implemented by devices that can be let go without revoking: the device
// stays open outside the process (the fd store) for its next run.
type Detacher interface {
	Detach() error
}

// Notifier is implemented by devices that report notices. The channel is closed when the
// device is closed.
type Notifier interface {
	Notices() <-chan Notice
}

// Opener opens the device at PCI address bdf.
type Opener func(bdf string) (Device, error)

// DeviceInfo describes a device: identity, access path, BARs and TSM state.
type DeviceInfo struct {
	BDF        string
	Vendor     uint16
	DeviceID   uint16
	Class      uint32
	Driver     string
	IOMMUGroup int
	// Mode is the VFIO access path: "group" (group + type1 container) or "cdev"
	// (device cdev + iommufd).
	Mode string
	// BARs lists the implemented BARs (size > 0).
	BARs []BAR
	TSM  TSMState
	// DMABuf is nil if the device can export dma-bufs, else the reason it cannot.
	DMABuf error
}

// BAR describes one implemented base address register.
type BAR struct {
	Index    int
	Size     uint64
	Mem      bool // a memory BAR (false: I/O port BAR)
	Prefetch bool
	Is64     bool
}

// TSMState is a device's TEE Security Manager state from sysfs.
type TSMState struct {
	// Present reports whether the device has a tsm/ directory.
	Present bool
	// Connect is the TSM the device is connected to (SPDM/IDE up), or "".
	Connect string
	// Bound is the TSM the device's TDI is bound to (LOCKED/RUN), or "".
	Bound string
}

// Process is a client process pinned by a pidfd, so that PID reuse cannot impersonate it.
type Process interface {
	PID() int32
	// Alive reports whether the pinned process is still running.
	Alive() bool
	// Wait returns nil when the process exits, or an error when ctx ends or the Process
	// is closed first.
	Wait(ctx context.Context) error
	Close() error
}

// Holder identifies the client a lease is granted to.
type Holder struct {
	UID    uint32
	GID    uint32
	Groups []uint32
	PID    int32
	// Start stamps the holder process (peercred.Process.Stamp: its pidfs inode, or its
	// start time), so that a restarted broker can tell it from a later process with the
	// same pid; 0 if unknown.
	Start uint64
	// Proc pins the holder process; may be nil only in tests.
	Proc Process
	// Tenant is the holder's tenant identity (internal/tenant: "uid=N", or the uid with
	// the VM's cgroup unit or LSM label). Empty means "uid=<UID>".
	Tenant string
}

// Peer identifies who connected to the claim socket.
type Peer struct {
	UID uint32
	PID int32
	// Delegate identifies the peer for a delegated lease, which it would hold (called
	// only for those, under the broker's lock). Nil: this peer cannot take delegated
	// leases.
	Delegate func() (Claimer, error)
}

// Claimer is a claiming process as a delegated lease needs it: its tenant identity
// (internal/tenant), its cgroup unit ("" if it runs in none), which decides the claim, and
// a pinned process handle the broker owns from then on, with its start stamp.
type Claimer struct {
	Tenant, Unit string
	Proc         Process
	Start        uint64
}

// Claimant names who may claim a delegated lease: processes of a Kubernetes pod (by the
// pod's uid) or of a cgroup unit. Exactly one field is set on a delegated lease; the zero
// Claimant marks an ordinary lease, which only its allocating process may claim.
type Claimant struct {
	PodUID string
	Unit   string
}

// IsZero reports whether c names nobody (an ordinary lease).
func (c Claimant) IsZero() bool { return c == Claimant{} }

func (c Claimant) String() string {
	if c.PodUID != "" {
		return "pod=" + c.PodUID
	}
	return "unit=" + c.Unit
}

// ClaimantTenant is the holder tenant of a delegated lease until its claim: it never
// equals a caller's tenant (so only admins see the lease), two leases of one claimant
// share it (shared ranges, the per-tenant lease limit), and it names the claimant.
func ClaimantTenant(c Claimant) string { return "claimant:" + c.String() }

// Matches reports whether a process in cgroup unit unit (as tenants by cgroup resolve it;
// "" if the process is in no unit) may claim a lease delegated to c.
func (c Claimant) Matches(unit string) bool {
	switch {
	case unit == "":
		return false
	case c.PodUID != "":
		uid, ok := tenant.PodUID(unit)
		return ok && uid == c.PodUID
	}
	return unit == c.Unit
}

// Actor identifies the caller of a management operation.
type Actor struct {
	UID   uint32
	PID   int32
	Admin bool
	// Tenant is the caller's tenant identity (see [Holder.Tenant]); empty means "uid=<UID>".
	Tenant string
}

// tenant returns a's tenant identity.
func (a Actor) tenant() string { return TenantOf(a.UID, a.Tenant) }

// TenantOf returns tenant, or the uid-only tenant identity "uid=<uid>" if tenant is empty.
func TenantOf(uid uint32, tenant string) string {
	if tenant != "" {
		return tenant
	}
	return fmt.Sprintf("uid=%d", uid)
}

func (a Actor) String() string {
	if a.Admin {
		return fmt.Sprintf("uid %d (admin) pid %d", a.UID, a.PID)
	}
	return fmt.Sprintf("uid %d pid %d", a.UID, a.PID)
}

// Kind is the kind of a lease.
type Kind int

// Lease kinds.
const (
	// KindShared ranges may overlap other shared leases of the same holder uid.
	KindShared Kind = iota + 1
	// KindPrivate ranges overlap no other lease on the device and need the device TSM-bound
	// (private MMIO of a confidential VM's TDISP device).
	KindPrivate
)

func (k Kind) String() string {
	switch k {
	case KindShared:
		return "shared"
	case KindPrivate:
		return "private"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// ParseKind parses "shared" or "private".
func ParseKind(s string) (Kind, error) {
	switch s {
	case "shared":
		return KindShared, nil
	case "private":
		return KindPrivate, nil
	}
	return 0, fmt.Errorf("unknown lease kind %q (want shared or private)", s)
}

// State is a lease's state.
type State int

// Lease states.
const (
	// StateAllocated: exported, waiting for its holder to claim the fd.
	StateAllocated State = iota + 1
	// StateActive: the holder claimed the fd.
	StateActive
	// StateRevoked: ended by revocation; its dma-buf is dead.
	StateRevoked
	// StateReleased: ended by its holder (or an unclaimed token expired).
	StateReleased
)

func (s State) String() string {
	switch s {
	case StateAllocated:
		return "allocated"
	case StateActive:
		return "active"
	case StateRevoked:
		return "revoked"
	case StateReleased:
		return "released"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// ParseState parses a [State]'s String form.
func ParseState(s string) (State, error) {
	for st := StateAllocated; st <= StateReleased; st++ {
		if st.String() == s {
			return st, nil
		}
	}
	return 0, fmt.Errorf("unknown lease state %q", s)
}

// Ended reports whether s is a final state.
func (s State) Ended() bool { return s == StateRevoked || s == StateReleased }

// Reason says why a lease ended.
type Reason string

// End reasons.
const (
	ReasonReleased      Reason = "released"       // its holder released it
	ReasonRevoked       Reason = "revoked"        // an admin revoked it
	ReasonHolderExited  Reason = "holder_exited"  // the allocating process exited
	ReasonExpired       Reason = "expired"        // its time to live ran out
	ReasonClaimExpired  Reason = "claim_expired"  // the claim token expired unclaimed
	ReasonDeviceLost    Reason = "device_lost"    // the device failed or went away
	ReasonReissueFailed Reason = "reissue_failed" // re-export after a device revoke failed
	ReasonShutdown      Reason = "broker_shutdown"
	// ReasonJournalFailed: the lease could not be recorded, so it was never granted.
	ReasonJournalFailed Reason = "journal_failed"
	// ReasonTSMUnbound: a private lease's device left the TSM-bound (TDISP LOCKED/RUN)
	// state.
	ReasonTSMUnbound Reason = "tsm_unbound"
	// ReasonRestoreFailed: after a restart the broker could not take the lease back (its
	// device did not reopen); it ended instead.
	ReasonRestoreFailed Reason = "restore_failed"
)

// Lease is a snapshot of one lease.
type Lease struct {
	ID     string
	BDF    string
	BAR    int
	Ranges []Range
	Kind   Kind
	State  State
	// Generation counts the dma-bufs exported for this lease; it grows on every reissue.
	Generation uint64
	Size       uint64
	// Inode identifies the current generation's dma-buf (st_ino).
	Inode  uint64
	Holder struct {
		UID uint32
		PID int32
		// Tenant is the holder's tenant identity: who may see, release and renew the
		// lease, and whose limits it counts against.
		Tenant string
	}
	VMName string
	// Unattested marks a private lease granted without TSM binding because the device's
	// policy allows it (test rigs only).
	Unattested bool
	Created    time.Time
	Claimed    time.Time // zero until the current generation is claimed
	// ClaimDeadline is when an unclaimed lease's token expires (the lease is then
	// released); zero once claimed, and for reissued tokens of active leases, which stay
	// valid while the lease lives.
	ClaimDeadline time.Time
	// TTL is the lease's time to live (0: none); Expires is when it ends unless renewed.
	TTL     time.Duration
	Expires time.Time
	// RevokeDeadline is set while a cooperative revoke is pending: the holder should
	// release the lease before it; the broker revokes it then.
	RevokeDeadline time.Time
	Ended          time.Time // zero while live
	EndReason      Reason
	EndedBy        string
	// Dead is set on an ended lease once its dma-buf is dead in every process: it never
	// left the broker, or its device cycled or closed since. An ended lease that is not
	// Dead ("ended but live") still works for whoever holds its fd until the device's
	// next cycle, which comes at the latest at RevokeDue.
	Dead bool
	// RevokeDue is set on an ended-but-live lease: its device cycles, and its fd dies, at
	// the latest then (the lease's end + Config.RevokeWithin). Zero otherwise.
	RevokeDue time.Time
	// Labels are the labels given at allocation (nil if none); never modified.
	Labels map[string]string
	// Claimant is set on a delegated lease: who may claim it. Until its first claim the
	// lease has no holder (Holder.PID 0, uid 0; only admins see it); the claiming process
	// becomes the holder.
	Claimant Claimant
}

// Delegated reports whether the lease was allocated on behalf of a claimant and has no
// holder yet: nobody is pinned, its Holder.Tenant is [ClaimantTenant], and only a process
// of the claimant may claim it.
func (l Lease) Delegated() bool { return !l.Claimant.IsZero() && l.Holder.PID == 0 }

// Live reports whether the lease has not ended.
func (l Lease) Live() bool { return !l.State.Ended() }

// DeviceStatus is a configured device with its policy and state.
type DeviceStatus struct {
	Info   DeviceInfo
	Policy DeviceConfig
	// Err is nil if the device is open and usable, else why it is not.
	Err error
	// LiveLeases counts the device's allocated and active leases.
	LiveLeases int
	// Suspended is true while the device is paused for maintenance (memory decode off).
	Suspended bool
	// Errors counts the errors (AER) the device reported since it was opened.
	Errors uint64
	// EndedLive counts the device's ended-but-live leases.
	EndedLive int
	// CycleAt is when the device's scheduled cycle runs; zero if none is scheduled.
	CycleAt time.Time
	// LastTenantCycle is when a tenant last caused the device to cycle; zero if never.
	LastTenantCycle time.Time
}

// EventType is the kind of a lease transition.
type EventType string

// Event types.
const (
	EventAllocated  EventType = "allocated"
	EventClaimed    EventType = "claimed"
	EventRevoked    EventType = "revoked"
	EventReleased   EventType = "released"
	EventReissued   EventType = "reissued"
	EventExpired    EventType = "expired"
	EventDeviceLost EventType = "device_lost"
	// EventRevokeRequested: a cooperative revoke is pending; Lease.RevokeDeadline says
	// when the broker enforces it.
	EventRevokeRequested EventType = "revoke_requested"
	// EventRenewed: the lease's time to live was extended (Lease.Expires).
	EventRenewed EventType = "renewed"
	// EventSuspended: the lease's device was paused; its dma-buf is inaccessible until
	// EventResumed.
	EventSuspended EventType = "suspended"
	// EventResumed: the device is back; importers that unmapped on the suspend (iommufd)
	// must map the fd again.
	EventResumed EventType = "resumed"
	// EventFdRevoked: an ended-but-live lease's dma-buf is dead now (its device cycled or
	// closed); Event.CausedBy says who caused the cycle.
	EventFdRevoked EventType = "fd_revoked"
	// EventDeviceChanged: a configured device changed state (lost or unusable, opened
	// again, suspended or resumed, its TSM state, its first error since it opened). It is
	// about no lease: its Lease carries only the device's BDF.
	EventDeviceChanged EventType = "device_changed"
)

// Event is one lease transition.
type Event struct {
	// Seq numbers events from 1, without gaps, for the life of the broker.
	Seq  uint64
	Time time.Time
	Type EventType
	// Lease is the lease after the transition; for an [EventDeviceChanged], only its
	// BDF is set (the device's).
	Lease Lease
	// Token is the new claim token of a reissued lease; empty otherwise. Only the lease's
	// holder may be shown it.
	Token string
	// CausedBy names who caused the device cycle behind a reissued, fd_revoked or revoked
	// event: a tenant identity, an admin ("uid 0 (admin) pid P"), or "broker"; empty for
	// other events.
	CausedBy string
}

// Filter selects leases in [Broker.List]. Zero fields match everything.
type Filter struct {
	// UID, if set, matches leases held by that uid.
	UID *uint32
	// Tenant, if set, matches leases held by that tenant.
	Tenant string
	BDF    string
	// Live matches only allocated and active leases.
	Live bool
	// Labels, if set, matches leases that have every one of these labels.
	Labels map[string]string
}

// AllocateRequest asks for a lease.
type AllocateRequest struct {
	BDF    string
	BAR    int
	Ranges []Range
	Kind   Kind
	VMName string
	// Holder is the caller; [Broker.Allocate] takes ownership of Holder.Proc.
	Holder Holder
	// Admin callers may lease any configured device.
	Admin bool
	// TTL, if positive, ends the lease (reason expired) that long after allocation
	// unless renewed.
	TTL time.Duration
	// Claimant, if set, makes a delegated lease (admins only): see [Claimant].
	Claimant Claimant
	// Labels are kept with the lease (see [Filter.Labels]).
	Labels map[string]string
}
