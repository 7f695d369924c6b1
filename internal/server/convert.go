package server

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/pci"
)

// Shape limits of requests. Domain limits (the configured ranges per lease, BAR sizes,
// alignment) are the broker's; these only bound what the server converts.
const (
	// maxBAR is the highest BAR index of a PCI device.
	maxBAR = 5
	// maxRanges is the most ranges one dma-buf export can carry (the broker's hard limit).
	maxRanges = broker.DefaultMaxRangesPerLease
	// maxVMName bounds AllocateLeaseRequest.vm_name, in bytes.
	maxVMName = 64
	// maxLeaseID bounds a lease id in a request, in bytes; real ids are 24 bytes.
	maxLeaseID = 64
	// maxTTL bounds a lease's time to live (AllocateLeaseRequest.ttl, RenewLeaseRequest.ttl):
	// a lease meant to outlive a year should have none.
	maxTTL = 366 * 24 * time.Hour
	// maxGrace bounds the grace period of a cooperative revoke: the holder gets a moment to
	// finish, not a second lease term.
	maxGrace = time.Hour
)

// invalid returns an errdefs.ErrInvalidArgument error.
func invalid(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

// parseBDF checks that bdf is a PCI address and returns its canonical form.
func parseBDF(bdf string) (string, error) {
	if bdf == "" {
		return "", invalid("bdf is required (a PCI address such as 0000:00:03.0)")
	}
	a, err := pci.ParseAddress(bdf)
	if err != nil {
		return "", err
	}
	return a.String(), nil
}

// parseLeaseID checks the shape of a lease id.
func parseLeaseID(id string) (string, error) {
	switch {
	case id == "":
		return "", invalid("lease_id is required")
	case len(id) > maxLeaseID:
		return "", invalid("lease_id is %d bytes long, at most %d allowed", len(id), maxLeaseID)
	}
	return id, nil
}

// allocateRequest converts an AllocateLeaseRequest into a broker request, checking its
// shape: bdf a PCI address, bar 0-5, 1-16 ranges, a known kind, a short printable vm_name.
// Whether the BAR, ranges and kind are acceptable for the device is for the broker to
// decide. The Holder and Admin fields are left for the caller to fill in.
func allocateRequest(req *brokerv1.AllocateLeaseRequest) (broker.AllocateRequest, error) {
	bdf, err := parseBDF(req.GetBdf())
	if err != nil {
		return broker.AllocateRequest{}, err
	}
	bar := req.GetBar()
	if bar > maxBAR {
		return broker.AllocateRequest{}, invalid("device %s: bar %d: a PCI device has BARs 0-%d only", bdf, bar, maxBAR)
	}
	pr := req.GetRanges()
	switch {
	case len(pr) == 0:
		return broker.AllocateRequest{}, invalid("device %s: bar %d: no ranges (1-%d required)", bdf, bar, maxRanges)
	case len(pr) > maxRanges:
		return broker.AllocateRequest{}, invalid("device %s: bar %d: %d ranges, at most %d allowed", bdf, bar, len(pr), maxRanges)
	}
	ranges := make([]broker.Range, len(pr))
	for i, r := range pr {
		ranges[i] = broker.Range{Offset: r.GetOffset(), Length: r.GetLength()}
	}
	kind, err := kindFromProto(req.GetKind())
	if err != nil {
		return broker.AllocateRequest{}, fmt.Errorf("device %s: bar %d: %w", bdf, bar, err)
	}
	vm := req.GetVmName()
	if err := checkVMName(vm); err != nil {
		return broker.AllocateRequest{}, fmt.Errorf("device %s: %w", bdf, err)
	}
	ttl, err := durationFromProto("ttl", req.GetTtl(), maxTTL)
	if err != nil {
		return broker.AllocateRequest{}, fmt.Errorf("device %s: %w", bdf, err)
	}
	labels, err := parseLabels(req.GetLabels())
	if err != nil {
		return broker.AllocateRequest{}, fmt.Errorf("device %s: %w", bdf, err)
	}
	var claimant broker.Claimant
	if c := req.GetClaimant(); c != nil {
		claimant = broker.Claimant{PodUID: c.GetPodUid(), Unit: c.GetUnit()}
		if claimant.IsZero() {
			return broker.AllocateRequest{}, invalid("device %s: claimant: set pod_uid or unit", bdf)
		}
	}
	return broker.AllocateRequest{BDF: bdf, BAR: int(bar), Ranges: ranges, Kind: kind, VMName: vm, TTL: ttl,
		Claimant: claimant, Labels: labels}, nil
}

// Label limits (AllocateLeaseRequest.labels, ListLeasesRequest.labels).
const (
	maxLabels          = 16
	maxLabelKeyBytes   = 63
	maxLabelValueBytes = 256
)

// parseLabels checks labels: at most maxLabels; keys of [A-Za-z0-9._/-]; values of
// printable ASCII. Nil or empty gives nil.
func parseLabels(m map[string]string) (map[string]string, error) {
	if len(m) == 0 {
		return nil, nil
	}
	if len(m) > maxLabels {
		return nil, invalid("%d labels, at most %d allowed", len(m), maxLabels)
	}
	for k, v := range m {
		if k == "" || len(k) > maxLabelKeyBytes || strings.IndexFunc(k, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '/' || r == '-')
		}) >= 0 {
			return nil, invalid("label key %q: want 1-%d bytes of letters, digits and ._/-", clip(k), maxLabelKeyBytes)
		}
		if len(v) > maxLabelValueBytes || strings.IndexFunc(v, func(r rune) bool { return r < 0x20 || r > 0x7e }) >= 0 {
			return nil, invalid("label %s: value %q: want at most %d bytes of printable ASCII", k, clip(v), maxLabelValueBytes)
		}
	}
	return maps.Clone(m), nil
}

// durationFromProto converts the optional duration field name, which must be well formed
// and within [0, limit]. Unset is 0.
func durationFromProto(name string, d *durationpb.Duration, limit time.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, invalid("%s is not a valid duration (%v)", name, err)
	}
	v := d.AsDuration() // saturates beyond ±292 years: still out of bounds below
	switch {
	case v < 0:
		return 0, invalid("%s %v is negative", name, v)
	case v > limit:
		return 0, invalid("%s %v is longer than the %v allowed", name, v, limit)
	}
	return v, nil
}

// duration converts d, leaving 0 unset.
func duration(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}

// checkVMName bounds a VM name and keeps control characters out of logs.
func checkVMName(s string) error {
	if len(s) > maxVMName {
		return invalid("vm_name is %d bytes long, at most %d allowed", len(s), maxVMName)
	}
	if !utf8.ValidString(s) {
		return invalid("vm_name is not valid UTF-8")
	}
	for i, r := range s {
		if !unicode.IsPrint(r) {
			return invalid("vm_name has the unprintable character %U at byte %d", r, i)
		}
	}
	return nil
}

func kindFromProto(k brokerv1.LeaseKind) (broker.Kind, error) {
	switch k {
	case brokerv1.LeaseKind_LEASE_KIND_UNSPECIFIED, brokerv1.LeaseKind_LEASE_KIND_SHARED:
		return broker.KindShared, nil
	case brokerv1.LeaseKind_LEASE_KIND_PRIVATE:
		return broker.KindPrivate, nil
	}
	return 0, invalid("unknown lease kind %d (want LEASE_KIND_SHARED or LEASE_KIND_PRIVATE)", int32(k))
}

func kindToProto(k broker.Kind) brokerv1.LeaseKind {
	switch k {
	case broker.KindShared:
		return brokerv1.LeaseKind_LEASE_KIND_SHARED
	case broker.KindPrivate:
		return brokerv1.LeaseKind_LEASE_KIND_PRIVATE
	}
	return brokerv1.LeaseKind_LEASE_KIND_UNSPECIFIED
}

func stateToProto(s broker.State) brokerv1.LeaseState {
	switch s {
	case broker.StateAllocated:
		return brokerv1.LeaseState_LEASE_STATE_ALLOCATED
	case broker.StateActive:
		return brokerv1.LeaseState_LEASE_STATE_ACTIVE
	case broker.StateRevoked:
		return brokerv1.LeaseState_LEASE_STATE_REVOKED
	case broker.StateReleased:
		return brokerv1.LeaseState_LEASE_STATE_RELEASED
	}
	return brokerv1.LeaseState_LEASE_STATE_UNSPECIFIED
}

func reasonToProto(r broker.Reason) brokerv1.EndReason {
	switch r {
	case broker.ReasonReleased:
		return brokerv1.EndReason_END_REASON_RELEASED
	case broker.ReasonRevoked:
		return brokerv1.EndReason_END_REASON_REVOKED
	case broker.ReasonClaimExpired:
		return brokerv1.EndReason_END_REASON_CLAIM_EXPIRED
	case broker.ReasonDeviceLost:
		return brokerv1.EndReason_END_REASON_DEVICE_LOST
	case broker.ReasonReissueFailed:
		return brokerv1.EndReason_END_REASON_REISSUE_FAILED
	case broker.ReasonShutdown:
		return brokerv1.EndReason_END_REASON_BROKER_SHUTDOWN
	case broker.ReasonHolderExited:
		return brokerv1.EndReason_END_REASON_HOLDER_EXITED
	case broker.ReasonExpired:
		return brokerv1.EndReason_END_REASON_EXPIRED
	case broker.ReasonJournalFailed:
		return brokerv1.EndReason_END_REASON_JOURNAL_FAILED
	case broker.ReasonRestoreFailed:
		return brokerv1.EndReason_END_REASON_RESTORE_FAILED
	case broker.ReasonTSMUnbound:
		return brokerv1.EndReason_END_REASON_TSM_UNBOUND
	}
	return brokerv1.EndReason_END_REASON_UNSPECIFIED
}

func eventTypeToProto(t broker.EventType) brokerv1.EventType {
	switch t {
	case broker.EventAllocated:
		return brokerv1.EventType_EVENT_TYPE_ALLOCATED
	case broker.EventClaimed:
		return brokerv1.EventType_EVENT_TYPE_CLAIMED
	case broker.EventRevoked:
		return brokerv1.EventType_EVENT_TYPE_REVOKED
	case broker.EventReleased:
		return brokerv1.EventType_EVENT_TYPE_RELEASED
	case broker.EventReissued:
		return brokerv1.EventType_EVENT_TYPE_REISSUED
	case broker.EventExpired:
		return brokerv1.EventType_EVENT_TYPE_EXPIRED
	case broker.EventDeviceLost:
		return brokerv1.EventType_EVENT_TYPE_DEVICE_LOST
	case broker.EventRevokeRequested:
		return brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED
	case broker.EventRenewed:
		return brokerv1.EventType_EVENT_TYPE_RENEWED
	case broker.EventSuspended:
		return brokerv1.EventType_EVENT_TYPE_SUSPENDED
	case broker.EventResumed:
		return brokerv1.EventType_EVENT_TYPE_RESUMED
	case broker.EventFdRevoked:
		return brokerv1.EventType_EVENT_TYPE_FD_REVOKED
	case broker.EventDeviceChanged:
		return brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED
	}
	return brokerv1.EventType_EVENT_TYPE_UNSPECIFIED
}

func accessModeToProto(mode string) brokerv1.AccessMode {
	switch mode {
	case "group":
		return brokerv1.AccessMode_ACCESS_MODE_GROUP
	case "cdev":
		return brokerv1.AccessMode_ACCESS_MODE_CDEV
	}
	return brokerv1.AccessMode_ACCESS_MODE_UNSPECIFIED
}

// timestamp converts t, leaving the zero time unset.
func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func leaseToProto(l broker.Lease) *brokerv1.Lease {
	ranges := make([]*brokerv1.Range, len(l.Ranges))
	for i, r := range l.Ranges {
		ranges[i] = &brokerv1.Range{Offset: r.Offset, Length: r.Length}
	}
	var expires *timestamppb.Timestamp
	if l.Live() { // an ended lease does not expire any more
		expires = timestamp(l.Expires)
	}
	return &brokerv1.Lease{
		Id:             l.ID,
		Bdf:            l.BDF,
		Bar:            uint32(l.BAR),
		Ranges:         ranges,
		Kind:           kindToProto(l.Kind),
		State:          stateToProto(l.State),
		Generation:     l.Generation,
		Size:           l.Size,
		Inode:          l.Inode,
		Holder:         &brokerv1.Holder{Uid: l.Holder.UID, Pid: l.Holder.PID, Tenant: broker.TenantOf(l.Holder.UID, l.Holder.Tenant)},
		VmName:         l.VMName,
		Unattested:     l.Unattested,
		CreateTime:     timestamp(l.Created),
		ClaimTime:      timestamp(l.Claimed),
		EndTime:        timestamp(l.Ended),
		EndReason:      reasonToProto(l.EndReason),
		EndedBy:        l.EndedBy,
		Ttl:            duration(l.TTL),
		ExpireTime:     expires,
		RevokeDeadline: timestamp(l.RevokeDeadline),
		RevokeDue:      timestamp(l.RevokeDue),
		FdDead:         !l.Live() && l.Dead,
		ClaimDeadline:  timestamp(l.ClaimDeadline),
		Labels:         maps.Clone(l.Labels),
		Claimant:       claimantToProto(l.Claimant),
	}
}

func claimantToProto(c broker.Claimant) *brokerv1.Claimant {
	if c.IsZero() {
		return nil
	}
	return &brokerv1.Claimant{PodUid: c.PodUID, Unit: c.Unit}
}

func leasesToProto(ls []broker.Lease) []*brokerv1.Lease {
	out := make([]*brokerv1.Lease, len(ls))
	for i, l := range ls {
		out[i] = leaseToProto(l)
	}
	return out
}

func deviceToProto(st broker.DeviceStatus) *brokerv1.Device {
	info := st.Info
	usable := st.Err == nil
	d := &brokerv1.Device{
		Bdf:                 info.BDF,
		VendorId:            uint32(info.Vendor),
		DeviceId:            uint32(info.DeviceID),
		ClassCode:           info.Class,
		Driver:              info.Driver,
		IommuGroup:          int32(info.IOMMUGroup),
		Tsm:                 &brokerv1.TsmState{Present: info.TSM.Present, Connect: info.TSM.Connect, Bound: info.TSM.Bound},
		Usable:              usable,
		LiveLeases:          uint32(st.LiveLeases),
		Suspended:           st.Suspended,
		ErrorCount:          st.Errors,
		EndedLiveLeases:     uint32(st.EndedLive),
		CycleTime:           timestamp(st.CycleAt),
		LastTenantCycleTime: timestamp(st.LastTenantCycle),
	}
	if usable {
		d.AccessMode = accessModeToProto(info.Mode)
	} else {
		d.Error = st.Err.Error()
	}
	switch {
	case info.DMABuf != nil:
		d.DmaBufUnsupportedReason = info.DMABuf.Error()
	case !usable:
		d.DmaBufUnsupportedReason = "unknown: the device is not open"
	default:
		d.DmaBufSupported = true
	}
	for _, b := range info.BARs {
		d.Bars = append(d.Bars, &brokerv1.Bar{Index: uint32(b.Index), Size: b.Size, Mem: b.Mem, Prefetch: b.Prefetch, Addr64: b.Is64})
	}
	p := st.Policy
	d.Policy = &brokerv1.DevicePolicy{
		AllowUnattestedPrivate: p.AllowUnattestedPrivate,
		AllowedUids:            slices.Clone(p.UIDs),
		AllowedGids:            slices.Clone(p.GIDs),
	}
	for _, b := range p.BARs {
		d.Policy.AllowedBars = append(d.Policy.AllowedBars, uint32(b))
	}
	for _, k := range p.Kinds {
		d.Policy.AllowedKinds = append(d.Policy.AllowedKinds, kindToProto(k))
	}
	return d
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
