package peercred

import (
	"context"
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func openSelf(t *testing.T) *Process {
	t.Helper()
	p, err := Open(int32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestProcessCloseIdempotent(t *testing.T) {
	testutil.FDLeakCheck(t)
	p := openSelf(t)
	if !p.Alive() {
		t.Fatal("Alive() = false for this very process")
	}
	for i := range 2 {
		if err := p.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if p.Alive() {
		t.Error("Alive() = true after Close")
	}
	if _, err := p.Dup(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Dup after Close = %v, want os.ErrClosed", err)
	}
	if err := p.Wait(context.Background()); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Wait after Close = %v, want os.ErrClosed", err)
	}
	if p.PID() != int32(os.Getpid()) {
		t.Errorf("PID() = %d after Close, want %d", p.PID(), os.Getpid())
	}
}

func TestProcessWaitContext(t *testing.T) {
	testutil.FDLeakCheck(t)
	p := openSelf(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Wait(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait(cancelled) = %v, want context.Canceled", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := p.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait(timeout) = %v, want context.DeadlineExceeded", err)
	}
}

// TestProcessCloseUnblocksWait closes a Process while Waits block on it.
func TestProcessCloseUnblocksWait(t *testing.T) {
	testutil.FDLeakCheck(t)
	p := openSelf(t)
	const n = 3
	errs := make(chan error, n)
	for range n {
		go func() { errs <- p.Wait(context.Background()) }()
	}
	for {
		p.mu.Lock()
		k := len(p.waiters)
		p.mu.Unlock()
		if k == n {
			break
		}
		runtime.Gosched()
	}
	p.Close()
	for range n {
		if err := <-errs; !errors.Is(err, os.ErrClosed) {
			t.Errorf("Wait = %v, want os.ErrClosed", err)
		}
	}
}

func TestProcessDupAndSame(t *testing.T) {
	testutil.FDLeakCheck(t)
	p := openSelf(t)
	d, err := p.Dup()
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	defer d.Close()
	if !d.Alive() || d.PID() != int32(os.Getpid()) {
		t.Fatalf("dup: Alive() = %v PID() = %d", d.Alive(), d.PID())
	}
	q := openSelf(t)
	if same, err := d.Same(q); err != nil || !same {
		t.Errorf("Same(two pidfds of this process) = %v, %v; want true", same, err)
	}

	ch := startChild(t, "hold", keepCreds)
	ch.ready(t)
	_, c, err := FromConn(ch.conn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if same, err := q.Same(c); err != nil || same {
		t.Errorf("Same(self, child) = %v, %v; want false", same, err)
	}
	c2, err := Open(ch.pid)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if same, err := c.Same(c2); err != nil || !same {
		t.Errorf("Same(child via socket, child via pidfd_open) = %v, %v; want true", same, err)
	}
}

func TestOpenErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	if _, err := Open(0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Open(0) = %v, want ErrInvalidArgument", err)
	}
	ch := startChild(t, "exit", keepCreds)
	if err := ch.wait(); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ch.pid); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Open(reaped pid) = %v, want ErrNotFound", err)
	}
}
