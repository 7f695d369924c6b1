package uevent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// nullUevent is the uevent file of /dev/null: writing "change UUID KEY=VALUE" to it makes
// the kernel send a synthetic change event carrying SYNTH_UUID and SYNTH_ARG_KEY (the key
// and value must be alphanumeric).
const nullUevent = "/sys/devices/virtual/mem/null/uevent"

func uuid(t *testing.T) string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// trigger asks the kernel for a synthetic change event on /dev/null tagged with id.
func trigger(t *testing.T, id string) {
	t.Helper()
	err := os.WriteFile(nullUevent, []byte("change "+id+" MMBTEST=1"), 0)
	if err != nil {
		t.Skipf("cannot trigger a synthetic uevent by writing %s (read-only or namespaced sysfs?): %v", nullUevent, err)
	}
}

// initialUserNS reports whether this process runs in the initial user namespace, the
// only one whose network namespaces receive kernel uevents.
func initialUserNS() bool {
	b, err := os.ReadFile("/proc/self/uid_map")
	return err == nil && strings.Join(strings.Fields(string(b)), " ") == "0 0 4294967295"
}

// await reads events until the one tagged id arrives.
func await(t *testing.T, l *Listener, id string) Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for {
		ev, err := l.Next(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			if !initialUserNS() {
				t.Skipf("no uevent within 10 s: this process is not in the initial user namespace, whose network namespaces alone receive kernel uevents")
			}
			t.Fatalf("the synthetic uevent %s did not arrive within 10 s", id)
		}
		if errors.Is(err, ErrMalformed) {
			t.Logf("skipping a malformed kernel message: %v", err)
			continue
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		if ev.Env["SYNTH_UUID"] == id {
			return ev
		}
	}
}

func listen(t *testing.T, opt Options) *Listener {
	t.Helper()
	l, err := Listen(opt)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

func TestListenerReceivesKernelEvent(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	testutil.FDLeakCheck(t)
	l := listen(t, Options{})
	if n, err := l.ReceiveBuffer(); err != nil || n < DefaultReceiveBuffer {
		t.Errorf("receive buffer %d, %v; want at least %d (SO_RCVBUFFORCE as root)", n, err, DefaultReceiveBuffer)
	}
	id := uuid(t)
	trigger(t, id)
	ev := await(t, l, id)
	if ev.Action != "change" || ev.DevPath != "/devices/virtual/mem/null" || ev.Subsystem != "mem" ||
		ev.Env["SYNTH_ARG_MMBTEST"] != "1" || ev.Seqnum == 0 {
		t.Errorf("event %+v", ev)
	}
	// The next one has a higher sequence number.
	id2 := uuid(t)
	trigger(t, id2)
	if ev2 := await(t, l, id2); ev2.Seqnum <= ev.Seqnum {
		t.Errorf("SEQNUM %d after %d", ev2.Seqnum, ev.Seqnum)
	}
}

func TestListenerContext(t *testing.T) {
	testutil.FDLeakCheck(t)
	l := listen(t, Options{ReceiveBuffer: 1 << 16})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := l.Next(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Next with a cancelled context = %v", err)
	}
	// A deadline ends a waiting Next (events of other processes may come first).
	ctx, cancel = context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	for {
		_, err := l.Next(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			break
		}
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrOverflow) {
			t.Fatalf("Next = %v, want the deadline", err)
		}
	}
	// A cancel from another goroutine wakes a waiting Next.
	ctx, cancel = context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		for {
			_, err := l.Next(ctx)
			if err == nil || errors.Is(err, ErrMalformed) || errors.Is(err, ErrOverflow) {
				continue
			}
			errc <- err
			return
		}
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("Next after cancel = %v", err)
	}
}

func TestListenerClose(t *testing.T) {
	testutil.FDLeakCheck(t)
	l, err := Listen(Options{})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		for {
			_, err := l.Next(t.Context())
			if err == nil || errors.Is(err, ErrMalformed) || errors.Is(err, ErrOverflow) {
				continue
			}
			errc <- err
			return
		}
	}()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, os.ErrClosed) {
		t.Errorf("Next after Close = %v, want os.ErrClosed", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := Listen(Options{ReceiveBuffer: -1}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Listen(-1) = %v", err)
	}
}

// A receive buffer too small for the events sent overflows: Next reports ErrOverflow,
// and the listener keeps working afterwards.
func TestListenerOverflow(t *testing.T) {
	testutil.SkipUnlessRoot(t)
	testutil.FDLeakCheck(t)
	l := listen(t, Options{ReceiveBuffer: 1}) // the kernel's minimum, a few KiB
	const burst = 64
	for range burst {
		trigger(t, uuid(t))
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	overflowed := false
	for i := 0; i <= burst && !overflowed; i++ {
		_, err := l.Next(ctx)
		switch {
		case errors.Is(err, ErrOverflow):
			overflowed = true
			if !strings.Contains(err.Error(), "no buffer space") {
				t.Errorf("overflow error %q does not keep ENOBUFS", err)
			}
		case errors.Is(err, context.DeadlineExceeded):
			if !initialUserNS() {
				t.Skip("no uevents here: not in the initial user namespace")
			}
			t.Fatal("no overflow and no more events")
		case err != nil && !errors.Is(err, ErrMalformed):
			t.Fatalf("Next: %v", err)
		}
	}
	if !overflowed {
		t.Fatalf("%d synthetic events into a %d-byte buffer did not overflow it", burst, must(l.ReceiveBuffer()))
	}
	// The kernel delivers nothing more until the queue is drained (the socket is
	// "congested"): read until it has been idle for a moment, then the stream resumes.
	for {
		idle, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		_, err := l.Next(idle)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			break
		}
	}
	id := uuid(t)
	trigger(t, id)
	await(t, l, id)
}

func must(n int, _ error) int { return n }
