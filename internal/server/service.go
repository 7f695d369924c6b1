package server

import (
	"context"
	"fmt"
	"strconv"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/holders"
)

// service implements brokerv1.BrokerServer on a broker. Every handler runs behind the
// server's interceptors, which put the caller's Identity into the context.
type service struct {
	brokerv1.UnimplementedBrokerServer

	b           *broker.Broker
	adminGroups []uint32
	claimSocket string
	// stopping is closed when the server stops; it ends WatchEvents streams.
	stopping <-chan struct{}
	host     HostFunc         // GetHost's source; nil: Unimplemented
	holders  *holders.Checker // ScanHolders' and GetLease's holder scans; nil: not supported

	watchMu sync.Mutex
	watches map[string]int // open WatchEvents streams of non-admin tenants; guarded by watchMu

	shared eventCache // events converted once for every stream that may see them
}

// eventCache converts each event once for all the WatchEvents streams that deliver it: the
// message is the same for every watcher allowed to see the event, except a REISSUED
// event's claim token, which only its holder's process gets (tokenFor). It keeps the last
// len(ring) events' messages; a stream far behind converts its own.
type eventCache struct {
	mu   sync.Mutex
	ring [256]*brokerv1.WatchEventsResponse // by Seq % len(ring)
}

// get returns ev's message without a claim token, shared: do not modify it. (gRPC may
// marshal one message on several streams at once: marshaling only reads it.)
func (c *eventCache) get(ev *broker.Event) *brokerv1.WatchEventsResponse {
	c.mu.Lock()
	defer c.mu.Unlock()
	slot := &c.ring[ev.Seq%uint64(len(c.ring))]
	if r := *slot; r != nil && r.GetEvent().GetSeq() == ev.Seq {
		return r
	}
	r := &brokerv1.WatchEventsResponse{Event: eventProto(ev)}
	*slot = r
	return r
}

// MaxWatchesPerTenant bounds the WatchEvents streams one non-admin tenant may have open:
// each holds a subscription buffer in the daemon.
const MaxWatchesPerTenant = 16

// watchSlot takes one of tenant's WatchEvents slots; the returned func gives it back.
func (s *service) watchSlot(tenant string, admin bool) (func(), error) {
	if admin {
		return func() {}, nil
	}
	s.watchMu.Lock()
	defer s.watchMu.Unlock()
	if s.watches == nil {
		s.watches = map[string]int{}
	}
	if s.watches[tenant] >= MaxWatchesPerTenant {
		return nil, fmt.Errorf("tenant %s has %d event streams open, the limit: %w", tenant, MaxWatchesPerTenant, errdefs.ErrResourceExhausted)
	}
	s.watches[tenant]++
	return func() {
		s.watchMu.Lock()
		defer s.watchMu.Unlock()
		if s.watches[tenant]--; s.watches[tenant] <= 0 {
			delete(s.watches, tenant)
		}
	}, nil
}

var _ brokerv1.BrokerServer = (*service)(nil)

// caller returns the RPC's caller and whether it is an admin.
func (s *service) caller(ctx context.Context) (Identity, bool, error) {
	id, err := identityFrom(ctx)
	if err != nil {
		return Identity{}, false, err
	}
	return id, isAdmin(id, s.adminGroups), nil
}

// ListDevices implements brokerv1.BrokerServer.
func (s *service) ListDevices(ctx context.Context, _ *brokerv1.ListDevicesRequest) (*brokerv1.ListDevicesResponse, error) {
	if _, _, err := s.caller(ctx); err != nil {
		return nil, err
	}
	if err := s.b.Available(); err != nil { // stopping: every device would read as closed
		return nil, err
	}
	devs := s.b.Devices()
	resp := &brokerv1.ListDevicesResponse{Devices: make([]*brokerv1.Device, len(devs))}
	for i, d := range devs {
		resp.Devices[i] = deviceToProto(d)
	}
	return resp, nil
}

// GetDevice implements brokerv1.BrokerServer.
func (s *service) GetDevice(ctx context.Context, req *brokerv1.GetDeviceRequest) (*brokerv1.GetDeviceResponse, error) {
	if _, _, err := s.caller(ctx); err != nil {
		return nil, err
	}
	bdf, err := parseBDF(req.GetBdf())
	if err != nil {
		return nil, err
	}
	if err := s.b.Available(); err != nil {
		return nil, err
	}
	st, err := s.b.Device(bdf)
	if err != nil {
		return nil, err
	}
	return &brokerv1.GetDeviceResponse{Device: deviceToProto(st)}, nil
}

// AllocateLease implements brokerv1.BrokerServer.
func (s *service) AllocateLease(ctx context.Context, req *brokerv1.AllocateLeaseRequest) (*brokerv1.AllocateLeaseResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	r, err := allocateRequest(req)
	if err != nil {
		return nil, err
	}
	if id.Pin == nil {
		return nil, fmt.Errorf("device %s: cannot pin the calling process (%s) with a pidfd, so it cannot hold a lease: %w",
			r.BDF, id, errdefs.ErrFailedPrecondition)
	}
	proc, err := id.Pin()
	if err != nil {
		return nil, fmt.Errorf("device %s: pin the calling process (%s): %w: %w", r.BDF, id, err, errdefs.ErrUnavailable)
	}
	var stamp uint64
	if st, ok := proc.(interface{ Stamp() (uint64, error) }); ok {
		if stamp, err = st.Stamp(); err != nil {
			proc.Close()
			return nil, fmt.Errorf("device %s: identify the calling process (%s) for restarts: %w: %w", r.BDF, id, err, errdefs.ErrUnavailable)
		}
	}
	r.Holder = broker.Holder{UID: id.UID, GID: id.GID, Groups: id.Groups, PID: id.PID, Start: stamp, Proc: proc, Tenant: id.tenant()}
	r.Admin = admin
	l, token, err := s.b.Allocate(r) // owns proc from here on, even on error
	if err != nil {
		return nil, err
	}
	return &brokerv1.AllocateLeaseResponse{
		Lease:         leaseToProto(l),
		ClaimToken:    token,
		ClaimSocket:   s.claimSocket,
		ClaimDeadline: timestamp(l.ClaimDeadline),
	}, nil
}

// GetLease implements brokerv1.BrokerServer.
func (s *service) GetLease(ctx context.Context, req *brokerv1.GetLeaseRequest) (*brokerv1.GetLeaseResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	leaseID, err := parseLeaseID(req.GetLeaseId())
	if err != nil {
		return nil, err
	}
	l, err := s.b.GetAs(leaseID, actor(id, admin))
	if err != nil {
		return nil, err
	}
	resp := &brokerv1.GetLeaseResponse{Lease: leaseToProto(l)}
	if req.GetIncludeHolders() {
		r, err := s.scanHolders(leaseID, actor(id, admin))
		if err != nil {
			return nil, err
		}
		for _, lh := range r.Leases {
			resp.Lease = leaseToProto(lh.Lease) // as of the scan
			resp.Holders, resp.Outlasting = fdHoldersToProto(lh.Holders), lh.Outlasting
		}
	}
	return resp, nil
}

// ListLeases implements brokerv1.BrokerServer.
func (s *service) ListLeases(ctx context.Context, req *brokerv1.ListLeasesRequest) (*brokerv1.ListLeasesResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	f := broker.Filter{Live: req.GetLiveOnly()}
	if req.GetBdf() != "" {
		if f.BDF, err = parseBDF(req.GetBdf()); err != nil {
			return nil, err
		}
	}
	if req.HolderUid != nil {
		uid := req.GetHolderUid()
		f.UID = &uid
	}
	f.Tenant = req.GetTenant()
	if f.Labels, err = parseLabels(req.GetLabels()); err != nil {
		return nil, err
	}
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := parsePageToken(req.GetPageToken(), f)
	if err != nil {
		return nil, err
	}
	ls, more, err := s.b.ListPageAs(f, actor(id, admin), after, size)
	if err != nil {
		return nil, err
	}
	resp := &brokerv1.ListLeasesResponse{Leases: leasesToProto(ls)}
	if more {
		last := ls[len(ls)-1]
		resp.NextPageToken = pageToken(broker.Cursor{Created: last.Created, ID: last.ID}, f)
	}
	return resp, nil
}

// RevokeLease implements brokerv1.BrokerServer.
func (s *service) RevokeLease(ctx context.Context, req *brokerv1.RevokeLeaseRequest) (*brokerv1.RevokeLeaseResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	leaseID, err := parseLeaseID(req.GetLeaseId())
	if err != nil {
		return nil, err
	}
	grace, err := durationFromProto("grace_period", req.GetGracePeriod(), maxGrace)
	if err != nil {
		return nil, fmt.Errorf("revoke lease %s: %w", leaseID, err)
	}
	var l broker.Lease
	reissued := 0
	if grace > 0 {
		l, err = s.b.Revoke(leaseID, actor(id, admin), grace)
	} else {
		l, reissued, err = s.b.RevokeNow(leaseID, actor(id, admin))
	}
	if err != nil {
		return nil, err
	}
	return &brokerv1.RevokeLeaseResponse{Lease: leaseToProto(l), ReissuedLeases: uint32(reissued)}, nil
}

// RenewLease implements brokerv1.BrokerServer.
func (s *service) RenewLease(ctx context.Context, req *brokerv1.RenewLeaseRequest) (*brokerv1.RenewLeaseResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	leaseID, err := parseLeaseID(req.GetLeaseId())
	if err != nil {
		return nil, err
	}
	ttl, err := durationFromProto("ttl", req.GetTtl(), maxTTL)
	if err != nil {
		return nil, fmt.Errorf("renew lease %s: %w", leaseID, err)
	}
	l, err := s.b.Renew(leaseID, actor(id, admin), ttl)
	if err != nil {
		return nil, err
	}
	return &brokerv1.RenewLeaseResponse{Lease: leaseToProto(l)}, nil
}

// SuspendDevice implements brokerv1.BrokerServer.
func (s *service) SuspendDevice(ctx context.Context, req *brokerv1.SuspendDeviceRequest) (*brokerv1.SuspendDeviceResponse, error) {
	st, err := s.suspendResume(ctx, req.GetBdf(), s.b.SuspendDevice)
	if err != nil {
		return nil, err
	}
	return &brokerv1.SuspendDeviceResponse{Device: st}, nil
}

// ResumeDevice implements brokerv1.BrokerServer.
func (s *service) ResumeDevice(ctx context.Context, req *brokerv1.ResumeDeviceRequest) (*brokerv1.ResumeDeviceResponse, error) {
	st, err := s.suspendResume(ctx, req.GetBdf(), s.b.ResumeDevice)
	if err != nil {
		return nil, err
	}
	return &brokerv1.ResumeDeviceResponse{Device: st}, nil
}

// suspendResume runs op (the broker's SuspendDevice or ResumeDevice; it checks that the
// caller is an admin) on device bdf.
func (s *service) suspendResume(ctx context.Context, bdf string, op func(string, broker.Actor) (broker.DeviceStatus, error)) (*brokerv1.Device, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	bdf, err = parseBDF(bdf)
	if err != nil {
		return nil, err
	}
	st, err := op(bdf, actor(id, admin))
	if err != nil {
		return nil, err
	}
	return deviceToProto(st), nil
}

// ReleaseLease implements brokerv1.BrokerServer.
func (s *service) ReleaseLease(ctx context.Context, req *brokerv1.ReleaseLeaseRequest) (*brokerv1.ReleaseLeaseResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	leaseID, err := parseLeaseID(req.GetLeaseId())
	if err != nil {
		return nil, err
	}
	l, err := s.b.Release(leaseID, actor(id, admin))
	if err != nil {
		return nil, err
	}
	return &brokerv1.ReleaseLeaseResponse{Lease: leaseToProto(l)}, nil
}

// WatchEvents implements brokerv1.BrokerServer.
func (s *service) WatchEvents(req *brokerv1.WatchEventsRequest, stream grpc.ServerStreamingServer[brokerv1.WatchEventsResponse]) error {
	ctx := stream.Context()
	id, admin, err := s.caller(ctx)
	if err != nil {
		return err
	}
	done, err := s.watchSlot(id.tenant(), admin)
	if err != nil {
		return err
	}
	defer done()
	who := actor(id, admin)
	devices := req.GetDeviceEvents()
	visible := func(ev *broker.Event) bool {
		if ev.Type == broker.EventDeviceChanged {
			return devices // about a device, which anyone may list
		}
		return broker.MayView(who, ev.Lease)
	}
	sub, err := s.b.SubscribeFiltered(req.GetAfterSeq(), visible)
	if err != nil {
		return err
	}
	defer sub.Close()
	// The response headers tell the client that the subscription is in place: every event
	// from now on will be delivered. They carry the sequence number of the last event
	// before it, the cursor to resume from if the stream ends before any event arrives.
	if err := stream.SendHeader(metadata.Pairs(LastSeqHeader, strconv.FormatUint(sub.Last(), 10))); err != nil {
		return err
	}
	// Every event comes through visible (the subscription's filter): only a REISSUED
	// event's claim token differs between streams.
	send := func(ev *broker.Event) error {
		if token := tokenFor(ev, id); token != "" {
			e := eventProto(ev)
			e.ClaimToken = token
			return stream.Send(&brokerv1.WatchEventsResponse{Event: e})
		}
		return stream.Send(s.shared.get(ev))
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.stopping:
			// The daemon stops the broker before the server, so the last events (the
			// leases a shutdown ended) may be queued here: deliver them first. A select
			// with both channels ready picks either.
			for {
				select {
				case ev, ok := <-sub.Events():
					if !ok {
						return subscriptionEnded(sub.Err())
					}
					if err := send(ev); err != nil {
						return err
					}
				default:
					return fmt.Errorf("event stream: the server is shutting down: %w", errdefs.ErrUnavailable)
				}
			}
		case ev, ok := <-sub.Events():
			if !ok {
				return subscriptionEnded(sub.Err())
			}
			if err := send(ev); err != nil {
				return err
			}
		}
	}
}

// LastSeqHeader is the WatchEvents response header that carries the sequence number of
// the last event before the subscription (docs/api.md).
const LastSeqHeader = "mmiobroker-last-seq"

// subscriptionEnded classifies why the broker ended a subscription. Lagging behind comes
// classified (ResourceExhausted); an unclassified end means the broker is going away.
func subscriptionEnded(err error) error {
	switch {
	case err == nil:
		return fmt.Errorf("event stream ended: %w", errdefs.ErrUnavailable)
	case code(err) == codes.Internal: // unclassified
		return fmt.Errorf("event stream ended: %w: %w", err, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("event stream ended: %w", err)
}

// eventProto converts ev for any watcher, without a claim token.
func eventProto(ev *broker.Event) *brokerv1.Event {
	e := &brokerv1.Event{
		Seq:      ev.Seq,
		Time:     timestamp(ev.Time),
		Type:     eventTypeToProto(ev.Type),
		CausedBy: ev.CausedBy,
		Bdf:      ev.Lease.BDF,
	}
	if ev.Type != broker.EventDeviceChanged { // about a device, not a lease
		e.Lease = leaseToProto(ev.Lease)
	}
	return e
}

// tokenFor returns the claim token of ev that the watcher id may see: a REISSUED event's,
// on its holder process's own streams; "" otherwise.
func tokenFor(ev *broker.Event, id Identity) string {
	if h := ev.Lease.Holder; ev.Type == broker.EventReissued && h.UID == id.UID && h.PID == id.PID {
		return ev.Token
	}
	return ""
}

// Drain implements brokerv1.BrokerServer.
func (s *service) Drain(ctx context.Context, _ *brokerv1.DrainRequest) (*brokerv1.DrainResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	ended, cycled, err := s.b.Drain(actor(id, admin))
	if err != nil {
		return nil, err
	}
	return &brokerv1.DrainResponse{EndedLeases: uint32(ended), CycledDevices: uint32(cycled)}, nil
}

// CycleDevice implements brokerv1.BrokerServer.
func (s *service) CycleDevice(ctx context.Context, req *brokerv1.CycleDeviceRequest) (*brokerv1.CycleDeviceResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	bdf, err := parseBDF(req.GetBdf())
	if err != nil {
		return nil, err
	}
	reissued, buried, err := s.b.CycleDevice(bdf, actor(id, admin))
	if err != nil {
		return nil, err
	}
	return &brokerv1.CycleDeviceResponse{ReissuedLeases: uint32(reissued), FdRevokedLeases: uint32(buried)}, nil
}
