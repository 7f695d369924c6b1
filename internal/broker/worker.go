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
// a time on its own goroutine. Jobs submitted while another runs wait their turn, so
// revocations that arrive during a device cycle are batched into the next one without
// any waiting window. The job running now is visible to [Broker.Ping] (busySince), which
// lets a service watchdog notice a device operation that hangs in the kernel.
type worker struct {
	jobs      chan func()
	quit      chan struct{} // closed by stop
	exited    chan struct{} // closed when the loop has returned
	busySince atomic.Int64  // unix nanoseconds when the running job started; 0 when idle
	now       func() time.Time
}

// errWorkerStopped is what run returns once the broker let its devices go.
var errWorkerStopped = fmt.Errorf("the broker is shutting down: %w", errdefs.ErrUnavailable)

func newWorker(now func() time.Time) *worker {
	w := &worker{jobs: make(chan func()), quit: make(chan struct{}), exited: make(chan struct{}), now: now}
	go w.loop()
	return w
}

func (w *worker) loop() {
	defer close(w.exited)
	for {
		select {
		case job := <-w.jobs:
			w.busySince.Store(w.now().UnixNano())
			job()
			w.busySince.Store(0)
		case <-w.quit:
			return
		}
	}
}

// run runs f on the worker and returns when f has returned, or errWorkerStopped without
// running f if the worker has stopped.
func (w *worker) run(f func()) error {
	done := make(chan struct{})
	job := func() {
		defer close(done)
		f()
	}
	select {
	case w.jobs <- job:
	case <-w.quit:
		return errWorkerStopped
	}
	<-done
	return nil
}

// stop ends the worker once the job running now (if any) has returned. Later run calls
// return errWorkerStopped.
func (w *worker) stop() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
	<-w.exited
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
