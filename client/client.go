package client

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// Default socket paths of mmiobrokerd.
const (
	DefaultSocket      = "/run/mmiobroker/control.sock"
	DefaultClaimSocket = "/run/mmiobroker/fd.sock"
)

// Client is a connection to mmiobrokerd's control socket. Its methods are safe for
// concurrent use.
type Client struct {
	conn *grpc.ClientConn
	api  brokerv1.BrokerClient
	// claimSocket overrides the claim socket path the daemon reports; "" uses the daemon's.
	claimSocket string
	// reconnect bounds how long event streams wait for a restarting daemon.
	reconnect time.Duration

	mu       sync.Mutex
	reported string // the claim socket path of the last AllocateLease response; guarded by mu
}

// Option configures [Dial].
type Option func(*Client)

// WithClaimSocket makes the client claim fds on path instead of the claim socket path the
// daemon reports (for a daemon whose sockets are mounted elsewhere, e.g. in a container).
func WithClaimSocket(path string) Option {
	return func(c *Client) { c.claimSocket = path }
}

// WithReconnectTimeout sets how long [Client.Watch] and held leases wait for a daemon
// that ended their event stream to come back (default [ReconnectTimeout]; 0 never waits:
// the stream's end is reported at once).
func WithReconnectTimeout(d time.Duration) Option {
	return func(c *Client) { c.reconnect = max(d, 0) }
}

// Dial returns a client of the daemon listening on the unix socket at socketPath. It does
// not connect yet: the first call does, and fails with codes.Unavailable if nobody
// listens. The connection carries no transport security: the daemon authenticates the
// caller by its peer credentials, and unix socket traffic never leaves the kernel.
func Dial(socketPath string, opts ...Option) (*Client, error) {
	abs, err := filepath.Abs(socketPath)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", socketPath, err)
	}
	conn, err := grpc.NewClient("unix://"+abs, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", socketPath, err)
	}
	c := &Client{conn: conn, api: brokerv1.NewBrokerClient(conn), reconnect: ReconnectTimeout}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Close closes the connection. Leases stay as they are: release them first if they
// should end.
func (c *Client) Close() error { return c.conn.Close() }

// API returns the generated gRPC client, for the calls this package does not wrap
// (ListDevices, GetDevice, GetLease, ListLeases) and for request fields it does not expose.
func (c *Client) API() brokerv1.BrokerClient { return c.api }

// AllocateOptions describe the lease to allocate.
type AllocateOptions struct {
	// BDF is the device's PCI address, canonical form 0000:3b:00.0.
	BDF string
	// BAR is the memory BAR, 0-5.
	BAR int
	// Ranges are the byte ranges of the BAR (page aligned, 1-16). Empty means the whole
	// BAR: Allocate looks its size up with GetDevice.
	Ranges []*brokerv1.Range
	// Kind is shared (the default) or private.
	Kind brokerv1.LeaseKind
	// VMName optionally names the VM the lease is for (at most 64 bytes).
	VMName string
	// TTL, if not zero, is the lease's time to live: the daemon revokes it (end reason
	// EXPIRED) that long after allocation unless it is renewed with [Client.Renew]. At most
	// 366 days.
	TTL time.Duration
}

// Lease is an allocated and claimed lease with its dma-buf fd.
type Lease struct {
	// ID is the lease id.
	ID string
	// Lease is the lease as the daemon reported it when allocating (state ALLOCATED).
	Lease *brokerv1.Lease
	// File is the dma-buf fd of the lease's current generation (close-on-exec). The
	// caller owns it and must close it.
	File *os.File
	// Claim describes File as the claim socket reported it.
	Claim ClaimInfo
}

// ClaimInfo describes a claimed dma-buf fd.
type ClaimInfo struct {
	LeaseID    string
	Generation uint64
	// Size is the dma-buf's size in bytes; Inode its st_ino (checked against the fd).
	Size  uint64
	Inode uint64
	BDF   string
	BAR   int
}

// Allocate allocates a lease and claims its fd. If the claim fails, the lease is released
// again (best effort) and the claim's error is returned.
func (c *Client) Allocate(ctx context.Context, opt AllocateOptions) (*Lease, error) {
	if opt.BAR < 0 || opt.BAR > 5 {
		return nil, status.Errorf(codes.InvalidArgument, "bar %d: only BARs 0-5 exist", opt.BAR)
	}
	ranges := opt.Ranges
	if len(ranges) == 0 {
		size, err := c.barSize(ctx, opt.BDF, opt.BAR)
		if err != nil {
			return nil, err
		}
		ranges = []*brokerv1.Range{{Offset: 0, Length: size}}
	}
	resp, err := c.api.AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{
		Bdf: opt.BDF, Bar: uint32(opt.BAR), Ranges: ranges, Kind: opt.Kind, VmName: opt.VMName,
		Ttl: durationOrNil(opt.TTL),
	})
	if err != nil {
		return nil, err
	}
	l := resp.GetLease()
	if p := resp.GetClaimSocket(); p != "" {
		c.mu.Lock()
		c.reported = p
		c.mu.Unlock()
	}
	f, info, err := c.claim(ctx, c.claimSocketPath(), l.GetId(), resp.GetClaimToken())
	if err != nil {
		// Do not leave the lease waiting for its claim to expire.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if _, rerr := c.Release(rctx, l.GetId()); rerr != nil {
			err = fmt.Errorf("%w (releasing the unclaimed lease failed too: %v)", err, rerr)
		}
		return nil, err
	}
	return &Lease{ID: l.GetId(), Lease: l, File: f, Claim: info}, nil
}

// barSize returns the size of an implemented BAR of the device.
func (c *Client) barSize(ctx context.Context, bdf string, bar int) (uint64, error) {
	resp, err := c.api.GetDevice(ctx, &brokerv1.GetDeviceRequest{Bdf: bdf})
	if err != nil {
		return 0, err
	}
	for _, b := range resp.GetDevice().GetBars() {
		if int(b.GetIndex()) == bar {
			return b.GetSize(), nil
		}
	}
	return 0, status.Errorf(codes.InvalidArgument, "device %s has no BAR %d", bdf, bar)
}

// Claim exchanges a claim token for the lease's dma-buf fd on the claim socket, typically
// the new token of a REISSUED event (see the package doc). The caller owns the returned
// file. The claim socket is the one given with
// [WithClaimSocket], else the one the daemon reported in the last allocation, else
// [DefaultClaimSocket].
func (c *Client) Claim(ctx context.Context, leaseID, token string) (*os.File, ClaimInfo, error) {
	return c.claim(ctx, c.claimSocketPath(), leaseID, token)
}

func (c *Client) claimSocketPath() string {
	if c.claimSocket != "" {
		return c.claimSocket
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reported != "" {
		return c.reported
	}
	return DefaultClaimSocket
}

func (c *Client) claim(ctx context.Context, socket, leaseID, token string) (*os.File, ClaimInfo, error) {
	f, rep, err := fdpass.Claim(ctx, socket, leaseID, token)
	if err != nil {
		var re *fdpass.ReplyError
		if errors.As(err, &re) {
			return nil, ClaimInfo{}, &ClaimError{Code: re.Code.String(), LeaseID: leaseID, Message: re.Message, code: re.Code}
		}
		return nil, ClaimInfo{}, claimIOError(leaseID, socket, err)
	}
	return f, ClaimInfo{LeaseID: rep.LeaseID, Generation: rep.Generation, Size: rep.Size,
		Inode: rep.Inode, BDF: rep.BDF, BAR: int(rep.BAR)}, nil
}

// claimIOError gives a failure to talk to the claim socket a gRPC status.
func claimIOError(leaseID, socket string, err error) error {
	code := codes.Unavailable
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case fdpass.IsProtocolError(err):
		code = codes.Internal
	}
	return &ClaimError{Code: code.String(), LeaseID: leaseID,
		Message: fmt.Sprintf("claim socket %s: %v", socket, err), grpcCode: code, err: err}
}

// ClaimError is a claim the claim socket refused, or could not be asked. Its GRPCStatus
// maps it to a gRPC code, so status.Code works on it as on the control API's errors.
type ClaimError struct {
	// Code is the claim protocol's reply code (docs/claim-protocol.md), e.g. "BAD_TOKEN",
	// or the gRPC code name when the claim socket could not be reached.
	Code    string
	LeaseID string
	Message string

	code     fdpass.Code
	grpcCode codes.Code // set when the failure is not a reply
	err      error
}

func (e *ClaimError) Error() string {
	if e.err != nil {
		return fmt.Sprintf("claim lease %s: %s", e.LeaseID, e.Message)
	}
	return fmt.Sprintf("claim lease %s: %s: %s", e.LeaseID, e.Code, e.Message)
}

// Unwrap returns the underlying I/O error, if any.
func (e *ClaimError) Unwrap() error { return e.err }

// GRPCStatus returns the status equivalent to the claim error.
func (e *ClaimError) GRPCStatus() *status.Status {
	return status.New(e.GRPCCode(), e.Error())
}

// GRPCCode returns the gRPC code equivalent to the claim reply code.
func (e *ClaimError) GRPCCode() codes.Code {
	if e.err != nil {
		return e.grpcCode
	}
	switch e.code {
	case fdpass.CodeInvalidRequest:
		return codes.InvalidArgument
	case fdpass.CodeUnsupportedVersion:
		return codes.Unimplemented
	case fdpass.CodeNotFound:
		return codes.NotFound
	case fdpass.CodeBadToken, fdpass.CodePermissionDenied:
		return codes.PermissionDenied
	case fdpass.CodeExpired:
		return codes.DeadlineExceeded
	case fdpass.CodeFailedPrecondition:
		return codes.FailedPrecondition
	case fdpass.CodeResourceExhausted:
		return codes.ResourceExhausted
	case fdpass.CodeUnavailable:
		return codes.Unavailable
	}
	return codes.Internal
}

// Release ends a lease of the caller (or, for an administrator, any lease). It does not
// revoke the fd: close it.
func (c *Client) Release(ctx context.Context, leaseID string) (*brokerv1.Lease, error) {
	resp, err := c.api.ReleaseLease(ctx, &brokerv1.ReleaseLeaseRequest{LeaseId: leaseID})
	if err != nil {
		return nil, err
	}
	return resp.GetLease(), nil
}

// Revoke ends a lease and kills its fd for good (administrators only). Every other
// dma-buf of the device dies with it; their leases are reissued (see the package doc).
func (c *Client) Revoke(ctx context.Context, leaseID string) (*brokerv1.Lease, error) {
	return c.RevokeWithGrace(ctx, leaseID, 0)
}

// RevokeWithGrace asks the holder of a lease to give it up within grace (administrators
// only; at most 1 hour). The lease stays live, with its RevokeDeadline set; the holder's
// event streams get REVOKE_REQUESTED and the holder may release the lease before the
// deadline, when the daemon revokes it. A pending earlier deadline stands. Grace 0 is
// [Client.Revoke]: the lease is revoked before the call returns.
func (c *Client) RevokeWithGrace(ctx context.Context, leaseID string, grace time.Duration) (*brokerv1.Lease, error) {
	resp, err := c.api.RevokeLease(ctx, &brokerv1.RevokeLeaseRequest{LeaseId: leaseID, GracePeriod: durationOrNil(grace)})
	if err != nil {
		return nil, err
	}
	return resp.GetLease(), nil
}

// Renew extends the time to live of a lease of the caller's uid (administrators: any
// lease): it now expires ttl from now. Zero ttl renews by the lease's own TTL; a lease
// without a TTL gets one.
func (c *Client) Renew(ctx context.Context, leaseID string, ttl time.Duration) (*brokerv1.Lease, error) {
	resp, err := c.api.RenewLease(ctx, &brokerv1.RenewLeaseRequest{LeaseId: leaseID, Ttl: durationOrNil(ttl)})
	if err != nil {
		return nil, err
	}
	return resp.GetLease(), nil
}

// Suspend pauses a device for maintenance (administrators only): its dma-bufs become
// inaccessible, its leases stay live (their holders get SUSPENDED events), and new leases
// of it are refused until [Client.Resume].
func (c *Client) Suspend(ctx context.Context, bdf string) (*brokerv1.Device, error) {
	resp, err := c.api.SuspendDevice(ctx, &brokerv1.SuspendDeviceRequest{Bdf: bdf})
	if err != nil {
		return nil, err
	}
	return resp.GetDevice(), nil
}

// Resume ends a [Client.Suspend] (administrators only). The holders of the device's
// leases get RESUMED events: their fds are unchanged, but importers that dropped their
// mappings (iommufd) must map them again.
func (c *Client) Resume(ctx context.Context, bdf string) (*brokerv1.Device, error) {
	resp, err := c.api.ResumeDevice(ctx, &brokerv1.ResumeDeviceRequest{Bdf: bdf})
	if err != nil {
		return nil, err
	}
	return resp.GetDevice(), nil
}

// durationOrNil converts d, leaving 0 unset.
// Drain ends every lease and revokes their dma-bufs, and makes the daemon refuse new
// leases until it restarts (admins only): what to run before a stop that must leave
// nothing behind. It returns how many leases ended and how many devices cycled.
func (c *Client) Drain(ctx context.Context) (*brokerv1.DrainResponse, error) {
	return c.api.Drain(ctx, &brokerv1.DrainRequest{})
}

// WatchOption changes what [Client.Watch] streams.
type WatchOption func(*watchConfig)

// watchConfig is what the WatchOptions of one [Client.Watch] set.
type watchConfig struct {
	deviceEvents bool
	subscribed   func(lastSeq uint64)
}

// WithDeviceEvents makes [Client.Watch] also stream EVENT_TYPE_DEVICE_CHANGED events: a
// configured device was lost or became unusable, opened again, was suspended or resumed,
// changed TSM state, or reported its first error. They carry Event.bdf and no lease.
func WithDeviceEvents() WatchOption {
	return func(w *watchConfig) { w.deviceEvents = true }
}

// WithSubscribed has [Client.Watch] call f each time the daemon has subscribed the stream
// — at the start and after every resume — with the sequence number of the daemon's last
// event before the subscription: every later event will be yielded. A client that lists
// state (ListDevices, ListLeases) and then follows it lists again from f, so that no change
// falls between its list and its stream. f runs on the goroutine that iterates.
func WithSubscribed(f func(lastSeq uint64)) WatchOption {
	return func(w *watchConfig) { w.subscribed = f }
}

func durationOrNil(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}

// Watch streams lease events (and, with [WithDeviceEvents], device events): with afterSeq
// 0 those that happen from now on, else first the retained events after seq afterSeq; see
// also [WithSubscribed]. It follows the daemon across restarts: when the
// stream ends with codes.Unavailable (a restart, an upgrade, a crash restarted by
// systemd) it subscribes again after the last event it yielded, waiting up to
// [ReconnectTimeout], so no event is missed or repeated. The sequence ends without an
// error when ctx is done; it yields one error and ends when the stream fails otherwise
// (or the daemon does not come back in time).
func (c *Client) Watch(ctx context.Context, afterSeq uint64, opts ...WatchOption) iter.Seq2[*brokerv1.Event, error] {
	return func(yield func(*brokerv1.Event, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		w := &watchConfig{}
		for _, o := range opts {
			o(w)
		}
		es, err := c.openEvents(ctx, ctx, w, afterSeq, false)
		if err != nil {
			if ctx.Err() == nil {
				yield(nil, err)
			}
			return
		}
		defer es.close()
		for {
			e, err := es.recv(ctx)
			if err != nil {
				if ctx.Err() == nil {
					yield(nil, err)
				}
				return
			}
			if !yield(e, nil) {
				return
			}
		}
	}
}
