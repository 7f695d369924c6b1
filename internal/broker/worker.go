package broker

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// worker runs one device's kernel work (open, export, cycle, suspend, close) one job at
// a time. Jobs submitted while another runs wait their turn, so revocations that arrive
// during a device cycle are batched into the next one without any waiting window. The job
// running now is visible to [Broker.Ping] (busySince), which lets a service watchdog
// notice a device operation that hangs in the kernel.
//
// A job runs on the goroutine that submitted it, under the worker's turn (a one-slot
// channel, so that waiting for a turn is a channel operation, durably blocking for
// testing/synctest): handing each job to a goroutine of the device's own cost two
// goroutine switches per device operation, a tenth of a lease round trip on a busy host.
type worker struct {
	turn      chan struct{} // holds a token while a job runs
	quit      chan struct{} // closed by stop
	stopped   chan struct{} // closed once stop holds the turn for good
	busySince atomic.Int64  // unix nanoseconds when the running job started; 0 when idle
	now       func() time.Time
}

// errWorkerStopped is what run returns once the broker let its devices go.
var errWorkerStopped = fmt.Errorf("the broker is shutting down: %w", errdefs.ErrUnavailable)

func newWorker(now func() time.Time) *worker {
	return &worker{turn: make(chan struct{}, 1), quit: make(chan struct{}), stopped: make(chan struct{}), now: now}
}

// run runs f in the worker's turn and returns when f has returned, or errWorkerStopped
// without running f if the worker has stopped.
func (w *worker) run(f func()) error {
	select {
	case w.turn <- struct{}{}:
	case <-w.quit:
		return errWorkerStopped
	}
	select {
	case <-w.quit: // stopped while this job waited: stop holds no turn until it has one
		<-w.turn
		return errWorkerStopped
	default:
	}
	defer func() {
		w.busySince.Store(0)
		<-w.turn
	}()
	w.busySince.Store(w.now().UnixNano())
	f()
	return nil
}

// stop ends the worker once the job running now (if any) has returned. Later run calls
// return errWorkerStopped.
func (w *worker) stop() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
		w.turn <- struct{}{} // waits for the running job; kept: no job runs again
		close(w.stopped)
	}
	<-w.stopped
}

// busyFor returns how long the running job has been running, 0 if idle.
func (w *worker) busyFor() time.Duration {
	since := w.busySince.Load()
	if since == 0 {
		return 0
	}
	return w.now().Sub(time.Unix(0, since))
}

// Ping is a liveness check for a service watchdog. It returns nil once the broker's lock
// could be taken and every device's worker took a no-op job, or an error naming what
// stayed busy when ctx ended: a device operation hung in the kernel (with how long it
// has run), or the broker's lock held (a deadlock).
func (b *Broker) Ping(ctx context.Context) error {
	got := make(chan struct{})
	go func() {
		b.mu.Lock()
		//lint:ignore SA2001 taking the lock is the check
		b.mu.Unlock()
		close(got)
	}()
	select {
	case <-got:
	case <-ctx.Done():
		return fmt.Errorf("broker lock not free: %w", context.Cause(ctx))
	}
	for _, bdf := range b.order {
		w := b.devices[bdf].w
		done := make(chan error, 1)
		go func() { done <- w.run(func() {}) }()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, errWorkerStopped) {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("device %s: an operation has been running for %v: %w", bdf, w.busyFor().Round(time.Millisecond), context.Cause(ctx))
		}
	}
	return nil
}
