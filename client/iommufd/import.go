package iommufd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// ImportOptions configure [IOAS.AllocateAndImport] and [IOAS.Import].
type ImportOptions struct {
	// Map says where to map the lease's first fd. Every later generation is mapped at the
	// IOVA the first one got (fixed, or the one the kernel picked), so the VM sees the BAR
	// at one address for the lease's whole life.
	Map MapOptions
	// OnRemap, if set, is called whenever the import changed the mapping because of an
	// event: re-mapped a reissued generation (REISSUED) or the same fd after a resume
	// (RESUMED), with the mapping now in place; unmapped it at the lease's end, with the
	// zero Mapping. A non-nil err is why the change failed: the lease's current fd is then
	// not mapped ([Import.Mapping] says what is), until a later event maps it. OnRemap runs
	// on the hold's goroutine, before Hold's callbacks, under the same rules (see
	// [client.HoldOptions]).
	OnRemap func(m Mapping, err error)
	// Hold are the hold's own callbacks, called after the import has acted on the event.
	Hold client.HoldOptions
}

// Import is a lease held with [client.HeldLease] whose current fd the import keeps mapped
// in an IOAS, at one IOVA, until the lease ends or [Import.Close]:
//
//   - REISSUED (another lease of the device was revoked, which killed this lease's fd): the
//     hold claims the new generation; the import unmaps the dead one and maps the new fd at
//     the same IOVA.
//   - SUSPENDED: the device's dma-bufs are inaccessible and the kernel has dropped the
//     mapping's pages; the import keeps the (dead) mapping, which keeps its IOVA range
//     reserved.
//   - RESUMED: the fd is the same and works again, but iommufd never re-populates a
//     mapping it dropped: the import unmaps it and maps the fd again at the same IOVA.
//   - The lease's end (REVOKED, RELEASED, EXPIRED, DEVICE_LOST): the import unmaps it.
//
// A restart of the daemon changes nothing: the fd and the mapping stay, and the hold's
// event stream resumes where it stopped. If the hold stops without the lease ending (its
// event stream failed for good: Held().Err() is not a [*client.LeaseEndedError]), the
// import stops following the lease and leaves the mapping as it is until [Import.Close].
type Import struct {
	ioas *IOAS
	opt  ImportOptions
	h    *client.HeldLease

	mu      sync.Mutex
	id      string          // the lease id, once known; guarded by mu
	started bool            // the first fd is mapped; guarded by mu
	iova    uint64          // where every generation goes once started; guarded by mu
	file    *os.File        // the lease's current fd; guarded by mu
	gen     uint64          // its generation; guarded by mu
	m       Mapping         // the mapping in place; zero if none; guarded by mu
	err     error           // why the last change failed; guarded by mu
	ended   *brokerv1.Event // the lease's final event; guarded by mu
}

// AllocateAndImport allocates a lease of one range ([client.AllocateOptions] with at most
// one range: the whole BAR when none), holds it with [client.Client.AllocateAndHold] and
// maps its fd into a. ctx bounds the allocation, the claim and the first map, not the
// import, which lasts until the lease ends or [Import.Close].
//
// If the first map fails (ENODEV: the device was suspended or the lease revoked meanwhile),
// AllocateAndImport releases the lease again and returns the error.
func (a *IOAS) AllocateAndImport(ctx context.Context, c *client.Client, opt client.AllocateOptions, iopt ImportOptions) (*Import, error) {
	if n := len(opt.Ranges); n > 1 {
		return nil, fmt.Errorf("allocate %s BAR %d: %d ranges: %w (IOMMU_IOAS_MAP_FILE maps one contiguous range; lease each range on its own)", opt.BDF, opt.BAR, n, ErrMultiRange)
	}
	im := &Import{ioas: a, opt: iopt}
	h, err := c.AllocateAndHold(ctx, opt, im.holdOptions())
	if err != nil {
		return nil, err
	}
	if err := im.start(h); err != nil {
		if im.endedEvent() == nil {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			if _, rerr := h.Release(rctx); rerr != nil {
				err = fmt.Errorf("%w (releasing the lease failed too: %v)", err, rerr)
			}
			cancel()
		}
		h.Close()
		return nil, err
	}
	return im, nil
}

// Import maps the fd of l, a lease claimed with [client.Client.Allocate], into a and holds
// the lease with [client.Client.Hold], which takes ownership of l.File. On error nothing
// stays mapped and the caller keeps l.File; a lease of more than one range is refused
// with [ErrMultiRange] before anything is mapped. ctx bounds the setup, not the import.
func (a *IOAS) Import(ctx context.Context, c *client.Client, l *client.Lease, iopt ImportOptions) (*Import, error) {
	if err := checkRanges(l); err != nil {
		return nil, err
	}
	im := &Import{ioas: a, opt: iopt}
	m, err := a.Map(l.File, iopt.Map)
	if err != nil {
		return nil, fmt.Errorf("lease %s generation %d: %w", l.ID, l.Claim.Generation, err)
	}
	m.Generation = l.Claim.Generation
	// The hold's callbacks may run as soon as Hold starts it, before it returns.
	im.mu.Lock()
	im.id, im.started, im.iova, im.file, im.gen, im.m = l.ID, true, m.IOVA, l.File, m.Generation, m
	im.mu.Unlock()
	h, err := c.Hold(ctx, l, im.holdOptions())
	if err != nil {
		if uerr := a.Unmap(m); uerr != nil {
			err = fmt.Errorf("%w (unmapping its fd failed too: %v)", err, uerr)
		}
		return nil, err
	}
	im.h = h
	return im, nil
}

// Held returns the hold: the lease's id, current fd and claim, its latest state,
// Release, and Done and Err to learn when and why it ended.
func (im *Import) Held() *client.HeldLease { return im.h }

// Mapping returns the mapping in place (the zero Mapping when none: after the lease's
// end, or after a change failed) and, if the last change failed, why.
func (im *Import) Mapping() (Mapping, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.m, im.err
}

// Close stops the hold (which closes the lease's fd; it does not release the lease: call
// Held().Release first for that) and unmaps the fd. It is idempotent and must not be
// called from the hold's callbacks. Close the Import before its [FD]; if the FD is closed
// already, its mappings are gone with it and Close only stops the hold.
func (im *Import) Close() error {
	err := im.h.Close() // waits for the callbacks
	im.mu.Lock()
	defer im.mu.Unlock()
	return errors.Join(err, im.unmapLocked())
}

// holdOptions puts the import's event handling in front of the caller's callbacks.
func (im *Import) holdOptions() client.HoldOptions {
	user := im.opt.Hold
	return client.HoldOptions{
		OnReissue: func(f *os.File, info client.ClaimInfo) {
			im.onReissue(f, info)
			if user.OnReissue != nil {
				user.OnReissue(f, info)
			}
		},
		OnEvent: func(e *brokerv1.Event) {
			im.onEvent(e)
			if user.OnEvent != nil {
				user.OnEvent(e)
			}
		},
	}
}

// start maps the current fd of the hold that AllocateAndHold started.
func (im *Import) start(h *client.HeldLease) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	im.h, im.id = h, h.ID
	for {
		if im.ended != nil {
			return &client.LeaseEndedError{Event: im.ended}
		}
		f, info := h.File(), h.Claim()
		m, err := im.ioas.Map(f, im.opt.Map)
		if err != nil {
			// A reissue may have killed f before the hold swapped it: its OnReissue waits
			// for mu, and the new fd is already in place.
			if errors.Is(err, unix.ENODEV) && h.File() != f {
				continue
			}
			return fmt.Errorf("lease %s generation %d: %w", h.ID, info.Generation, err)
		}
		m.Generation = info.Generation
		im.started, im.iova, im.file, im.gen, im.m = true, m.IOVA, f, info.Generation, m
		return nil
	}
}

// onReissue maps the new generation f in place of the dead one.
func (im *Import) onReissue(f *os.File, info client.ClaimInfo) {
	im.mu.Lock()
	if f == im.file {
		im.mu.Unlock()
		return // start mapped it already
	}
	im.file, im.gen = f, info.Generation
	if !im.started || im.ended != nil {
		im.mu.Unlock()
		return // start maps the current fd
	}
	m, err := im.remapLocked()
	im.mu.Unlock()
	im.report(m, err)
}

// onEvent re-maps after a resume and unmaps at the lease's end; other events need
// nothing (and do not wait for a first map in progress).
func (im *Import) onEvent(e *brokerv1.Event) {
	st := e.GetLease().GetState()
	end := st == brokerv1.LeaseState_LEASE_STATE_REVOKED || st == brokerv1.LeaseState_LEASE_STATE_RELEASED
	if !end && e.GetType() != brokerv1.EventType_EVENT_TYPE_RESUMED {
		return
	}
	im.mu.Lock()
	if end {
		im.ended = e
	}
	if !im.started || (!end && im.ended != nil) || (end && im.m.Length == 0) {
		im.mu.Unlock()
		return
	}
	var m Mapping
	var err error
	if end {
		err = im.unmapLocked()
	} else {
		m, err = im.remapLocked()
	}
	im.mu.Unlock()
	im.report(m, err)
}

// remapLocked unmaps the mapping in place, if any, and maps the current fd at the
// import's IOVA.
func (im *Import) remapLocked() (Mapping, error) {
	if err := im.unmapLocked(); err != nil {
		return im.m, err // still mapped: the IOVA is taken
	}
	m, err := im.ioas.Map(im.file, MapOptions{IOVA: im.iova, Fixed: true, ReadOnly: im.opt.Map.ReadOnly})
	if err != nil {
		im.err = fmt.Errorf("lease %s generation %d: map at %#x: %w", im.id, im.gen, im.iova, err)
		return Mapping{}, im.err
	}
	m.Generation = im.gen
	im.m, im.err = m, nil
	return m, nil
}

// unmapLocked removes the mapping in place, if any. A mapping whose IOAS or FD is gone
// (ENOENT, or the FD closed) is gone too.
func (im *Import) unmapLocked() error {
	if im.m.Length == 0 {
		return nil
	}
	err := im.ioas.Unmap(im.m)
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrClosed) {
		im.err = fmt.Errorf("lease %s generation %d: unmap: %w", im.id, im.m.Generation, err)
		return im.err
	}
	im.m, im.err = Mapping{}, nil
	return nil
}

func (im *Import) endedEvent() *brokerv1.Event {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.ended
}

func (im *Import) report(m Mapping, err error) {
	if im.opt.OnRemap != nil {
		im.opt.OnRemap(m, err)
	}
}
