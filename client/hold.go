package client

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// reclaimTimeout bounds the claim of a reissued generation.
const reclaimTimeout = 30 * time.Second

// HoldOptions configure [Client.AllocateAndHold] and [Client.Hold].
//
// The callbacks run on the hold's own goroutine, one at a time and in event order. They
// may call [HeldLease.Release], [HeldLease.File] and the [Client]'s methods, but not
// [HeldLease.Close], which waits for that goroutine. They should return soon (hand long
// work to another goroutine): the hold reads no events meanwhile, and a stream that falls
// too far behind is cut by the daemon (codes.ResourceExhausted), which ends the hold.
type HoldOptions struct {
	// OnReissue, if set, is called after the lease was reissued (another lease of the device
	// was revoked, which killed this lease's fd too) and the hold claimed the new
	// generation. f is the new fd, which the HeldLease owns: re-import it here (iommufd:
	// IOMMU_IOAS_MAP_FILE again; mappings of the old fd are dead; client/iommufd's
	// IOAS.AllocateAndImport does it for you). The old fd is dead for good and is closed
	// when OnReissue returns.
	OnReissue func(f *os.File, info ClaimInfo)
	// OnEvent, if set, is called with every event of the lease, after the hold acted on it
	// (for REISSUED: after OnReissue), the lease's final event included. Of note:
	// REVOKE_REQUESTED (an administrator wants the lease back by Lease.revoke_deadline:
	// finish and [HeldLease.Release]), SUSPENDED and RESUMED (after a resume, importers that
	// dropped their mappings must map the same fd again), RENEWED.
	OnEvent func(e *brokerv1.Event)
}

// HeldLease is a claimed lease whose fd the client keeps current: it follows the lease's
// events on the holder's own event stream and, when the lease is reissued, claims the new
// generation with the event's claim token by itself, so the caller never calls
// [Client.Claim].
//
// # Fd ownership
//
// The HeldLease owns the lease's fd. [HeldLease.File] returns the current one; it stays
// open until it is replaced by a reissue (closed after [HoldOptions.OnReissue] returns) or
// until [HeldLease.Close]. Do not close it yourself; duplicate it if you need it longer.
// Importers must re-import after every reissue (use OnReissue), since the old fd is dead.
//
// # End
//
// The hold stops when the lease ends (revoked, released, expired, device lost: [HeldLease.Err]
// is then a [*LeaseEndedError]), when its event stream or a reissue's claim fails, or at
// [HeldLease.Close]. [HeldLease.Done] is closed then. The fd stays open until Close: after
// a release it still works, after any other end it is dead.
type HeldLease struct {
	// ID is the lease id.
	ID string

	c      *Client
	opt    HoldOptions
	ctx    context.Context    // the hold's life: done at Close
	cancel context.CancelFunc // ends the event stream
	done   chan struct{}

	mu      sync.Mutex
	file    *os.File        // guarded by mu
	claim   ClaimInfo       // guarded by mu
	lease   *brokerv1.Lease // latest snapshot; guarded by mu
	err     error           // guarded by mu
	closing bool            // Close was called; guarded by mu
	closed  bool            // guarded by mu
}

// LeaseEndedError is the [HeldLease.Err] of a hold whose lease ended.
type LeaseEndedError struct {
	// Event is the lease's final event: REVOKED, RELEASED, EXPIRED or DEVICE_LOST; its
	// Lease says how and by whom the lease ended.
	Event *brokerv1.Event
}

func (e *LeaseEndedError) Error() string {
	l := e.Event.GetLease()
	by := l.GetEndedBy()
	if by == "" {
		by = "-"
	}
	return fmt.Sprintf("lease %s ended: %v (%v, by %s)", l.GetId(), e.Event.GetType(), l.GetEndReason(), by)
}

// AllocateAndHold allocates a lease, claims its fd, and holds it (see [HeldLease]). It
// subscribes to the caller's events before allocating, so no reissue of the new lease can
// slip by. ctx bounds the subscription, the allocation and the claim, not the hold, which
// lasts until the lease ends or [HeldLease.Close].
func (c *Client) AllocateAndHold(ctx context.Context, opt AllocateOptions, hopt HoldOptions) (*HeldLease, error) {
	h, stream, err := c.subscribe(ctx, hopt)
	if err != nil {
		return nil, err
	}
	l, err := c.Allocate(ctx, opt)
	if err != nil {
		h.cancel()
		return nil, err
	}
	h.start(l, stream)
	return h, nil
}

// Hold holds a lease allocated and claimed with [Client.Allocate] (see [HeldLease]); on
// success it takes ownership of l.File, which the caller must not use or close any more
// (use [HeldLease.File]). ctx bounds the setup, not the hold.
//
// Hold subscribes to the caller's events and then checks that the lease has not been
// reissued since l was claimed: the claim token of a reissue before the subscription is
// lost, and Hold fails with codes.FailedPrecondition (release the lease and allocate
// again). [Client.AllocateAndHold] has no such window. On error the caller keeps l.File.
func (c *Client) Hold(ctx context.Context, l *Lease, hopt HoldOptions) (*HeldLease, error) {
	h, stream, err := c.subscribe(ctx, hopt)
	if err != nil {
		return nil, err
	}
	resp, err := c.api.GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: l.ID})
	if err != nil {
		h.cancel()
		return nil, err
	}
	cur := resp.GetLease()
	switch st := cur.GetState(); {
	case st == brokerv1.LeaseState_LEASE_STATE_REVOKED || st == brokerv1.LeaseState_LEASE_STATE_RELEASED:
		h.cancel()
		return nil, status.Errorf(codes.FailedPrecondition, "lease %s has already ended (%v, by %s)", l.ID, cur.GetEndReason(), cur.GetEndedBy())
	case cur.GetGeneration() != l.Claim.Generation:
		h.cancel()
		return nil, status.Errorf(codes.FailedPrecondition,
			"lease %s was reissued (generation %d, held %d) before its events were followed; its claim token is lost: release it and allocate again",
			l.ID, cur.GetGeneration(), l.Claim.Generation)
	}
	h.start(l, stream)
	return h, nil
}

// subscribe opens the event stream of a new hold and waits until the daemon has
// subscribed (its response headers), so that every later event reaches the hold.
func (c *Client) subscribe(ctx context.Context, hopt HoldOptions) (*HeldLease, *eventStream, error) {
	hctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	h := &HeldLease{c: c, opt: hopt, ctx: hctx, cancel: cancel, done: make(chan struct{})}
	stream, err := c.openEvents(hctx, ctx, &watchConfig{}, 0, false)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return h, stream, nil
}

// start takes over l and starts following the lease's events on stream.
func (h *HeldLease) start(l *Lease, stream *eventStream) {
	h.ID, h.file, h.claim, h.lease = l.ID, l.File, l.Claim, l.Lease
	go h.follow(stream)
}

// File returns the lease's current fd, owned by the HeldLease (see the type's doc).
func (h *HeldLease) File() *os.File {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.file
}

// Claim describes the current fd.
func (h *HeldLease) Claim() ClaimInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.claim
}

// Lease returns the latest snapshot of the lease: as allocated, then as of its latest
// event. Do not modify it.
func (h *HeldLease) Lease() *brokerv1.Lease {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lease
}

// Done is closed when the hold stops (see the type's doc).
func (h *HeldLease) Done() <-chan struct{} { return h.done }

// Err returns why the hold stopped: a [*LeaseEndedError] when the lease ended, the event
// stream's or a reissue claim's error, or nil while holding and after [HeldLease.Close].
func (h *HeldLease) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// Release releases the lease (it does not revoke the fd; see [Client.Release]). The hold
// then stops by itself on the lease's RELEASED event; call [HeldLease.Close] to close the
// fd. Release may be called from the hold's callbacks.
func (h *HeldLease) Release(ctx context.Context) (*brokerv1.Lease, error) {
	return h.c.Release(ctx, h.ID)
}

// Close stops the hold, waits until its goroutine and callbacks are done, and closes the
// fd. It does not release the lease (see [HeldLease.Release]). Close is idempotent; it must
// not be called from the hold's callbacks.
func (h *HeldLease) Close() error {
	h.mu.Lock()
	h.closing = true
	h.mu.Unlock()
	h.cancel()
	<-h.done
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	h.closed = true
	return h.file.Close()
}

// finish records why the hold stopped, unless Close stopped it, and ends the stream.
func (h *HeldLease) finish(err error) {
	h.mu.Lock()
	if !h.closing {
		h.err = err
	}
	h.mu.Unlock()
	h.cancel()
}

// follow acts on the lease's events until it ends, the stream fails or Close.
func (h *HeldLease) follow(stream *eventStream) {
	defer close(h.done)
	defer stream.close()
	ctx := h.ctx
	for {
		e, err := stream.recv(ctx)
		if err != nil {
			h.finish(fmt.Errorf("lease %s: event stream: %w", h.ID, err))
			return
		}
		l := e.GetLease()
		if l.GetId() != h.ID {
			continue
		}
		h.mu.Lock()
		h.lease = l
		h.mu.Unlock()
		if e.GetType() == brokerv1.EventType_EVENT_TYPE_REISSUED {
			if err := h.reclaim(ctx, e); err != nil {
				h.finish(err)
				return
			}
		}
		if h.opt.OnEvent != nil {
			h.opt.OnEvent(e)
		}
		if st := l.GetState(); st == brokerv1.LeaseState_LEASE_STATE_REVOKED || st == brokerv1.LeaseState_LEASE_STATE_RELEASED {
			h.finish(&LeaseEndedError{Event: e})
			return
		}
	}
}

// reclaim claims the generation a REISSUED event announces and makes it the current fd.
func (h *HeldLease) reclaim(ctx context.Context, e *brokerv1.Event) error {
	gen := e.GetLease().GetGeneration()
	if gen <= h.Claim().Generation {
		return nil // already held
	}
	token := e.GetClaimToken()
	if token == "" {
		return fmt.Errorf("lease %s was reissued (generation %d) but the event carries no claim token (the stream is not the holder process's)", h.ID, gen)
	}
	cctx, cancel := context.WithTimeout(ctx, reclaimTimeout)
	defer cancel()
	f, info, err := h.c.Claim(cctx, h.ID, token)
	if err != nil {
		// A later reissue, or the end of the lease, may have overtaken this one; its own
		// event follows.
		if resp, gerr := h.c.api.GetLease(cctx, &brokerv1.GetLeaseRequest{LeaseId: h.ID}); gerr == nil {
			cur := resp.GetLease()
			if cur.GetGeneration() > gen || cur.GetState() == brokerv1.LeaseState_LEASE_STATE_REVOKED ||
				cur.GetState() == brokerv1.LeaseState_LEASE_STATE_RELEASED {
				return nil
			}
		}
		return fmt.Errorf("lease %s was reissued (generation %d) but claiming it failed: %w", h.ID, gen, err)
	}
	h.mu.Lock()
	old := h.file
	h.file, h.claim = f, info
	h.mu.Unlock()
	if h.opt.OnReissue != nil {
		h.opt.OnReissue(f, info)
	}
	old.Close() // dead since the device cycle; nothing to report
	return nil
}
