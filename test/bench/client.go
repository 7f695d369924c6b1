package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// Mode is what a client process runs.
type Mode string

// Client modes.
const (
	// ModeMixed alternates broker and floor operations (in the order BF FB BF …, so that
	// neither kind always follows the other).
	ModeMixed Mode = "mixed"
	// ModeBroker runs broker operations only.
	ModeBroker Mode = "broker"
	// ModeFloor runs floor operations only.
	ModeFloor Mode = "floor"
	// ModeRevoke alternates revoke operations and bare unary calls.
	ModeRevoke Mode = "revoke"
)

// Lines a client process writes on its standard output, and the one it reads on its
// standard input: it warms up, says ready, waits for go, runs, writes its result file,
// says done, and exits when its standard input is closed (so that the orchestrator can
// sample the daemon while every client is still connected).
const (
	lineReady = "ready"
	lineGo    = "go"
	lineDone  = "done"
)

// leaseLength is the length of every lease's one range (of BAR 0, 1 MiB on the fake
// device).
const leaseLength = 1 << 16

// ClientOptions are the client mode's settings.
type ClientOptions struct {
	// Dir is the scenario's directory, where the daemon's and the floor's sockets are.
	Dir string
	// BDF is the fake device to lease from.
	BDF string
	// Mode is what to run; Ops how many operations of each kind it runs (ModeMixed: Ops
	// broker and Ops floor operations).
	Mode Mode
	Ops  int
	// Warmup is how many operations of each kind run before ready, not recorded.
	Warmup int
	// Out is the result file (JSON, a [ClientResult]).
	Out string
}

// ClientResult is what one client process measured: the latency of every operation by
// kind, and for the throughput the time its broker and floor operations took in all,
// releases included.
type ClientResult struct {
	Mode   Mode
	Broker []time.Duration `json:",omitempty"`
	Floor  []time.Duration `json:",omitempty"`
	Revoke []time.Duration `json:",omitempty"`
	Unary  []time.Duration `json:",omitempty"`
	// BrokerBusy and FloorBusy are the sums of the operations' full times (with their
	// release).
	BrokerBusy, FloorBusy time.Duration
	// FloorEOFs counts the floor replies read only at a second recvmsg because the first
	// reported EOF (a kernel race: see worker.floorClaim).
	FloorEOFs int
	// Start and End bound the timed run.
	Start, End time.Time
}

// worker runs operations against one daemon and its floor.
type worker struct {
	c        *client.Client
	health   healthpb.HealthClient
	floorFD  string
	bdf      string
	ranges   []*brokerv1.Range
	req      []byte
	buf, oob []byte
	// floorEOFs counts the floor replies read by a second recvmsg after a spurious EOF.
	floorEOFs int
}

// RunClient connects to the scenario's daemon and floor and runs o's operations,
// speaking the ready/go/done protocol on stdin and stdout.
func RunClient(ctx context.Context, o ClientOptions, stdin io.Reader, stdout io.Writer) error {
	if o.Ops < 0 || o.Warmup < 0 {
		return fmt.Errorf("ops %d and warmup %d must not be negative", o.Ops, o.Warmup)
	}
	c, err := client.Dial(filepath.Join(o.Dir, controlSocket))
	if err != nil {
		return err
	}
	defer c.Close()
	fconn, err := grpc.NewClient("unix://"+filepath.Join(o.Dir, floorGRPC), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer fconn.Close()
	w := &worker{
		c:       c,
		health:  healthpb.NewHealthClient(fconn),
		floorFD: filepath.Join(o.Dir, floorClaim),
		bdf:     o.BDF,
		ranges:  []*brokerv1.Range{{Offset: 0, Length: leaseLength}},
		req:     make([]byte, FloorRequestSize),
		buf:     make([]byte, fdpass.MaxReplySize+1),
		oob:     make([]byte, unix.CmsgSpace(4*4)),
	}
	if _, err := w.run(ctx, o.Mode, o.Warmup); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	in := bufio.NewReader(stdin)
	if _, err := fmt.Fprintln(stdout, lineReady); err != nil {
		return err
	}
	if line, err := in.ReadString('\n'); err != nil || strings.TrimSpace(line) != lineGo {
		return fmt.Errorf("waiting for %q: got %q, %v", lineGo, line, err)
	}
	res, err := w.run(ctx, o.Mode, o.Ops)
	if err != nil {
		return err
	}
	if err := writeJSON(o.Out, res); err != nil {
		return err
	}
	if _, err := fmt.Fprintln(stdout, lineDone); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, in)
	return err
}

// run runs n operations of each kind of mode and records them.
func (w *worker) run(ctx context.Context, mode Mode, n int) (*ClientResult, error) {
	res := &ClientResult{Mode: mode, Start: time.Now()}
	w.floorEOFs = 0
	switch mode {
	case ModeMixed, ModeBroker, ModeFloor:
		res.Broker, res.Floor = make([]time.Duration, 0, n), make([]time.Duration, 0, n)
	case ModeRevoke:
		res.Revoke, res.Unary = make([]time.Duration, 0, n), make([]time.Duration, 0, n)
	}
	broker := func(i int) error {
		start := time.Now()
		lat, busy, err := w.broker(ctx)
		if err != nil {
			return fmt.Errorf("broker operation %d (failed after %v): %w", i, time.Since(start), err)
		}
		res.Broker = append(res.Broker, lat)
		res.BrokerBusy += busy
		return nil
	}
	floor := func(i int) error {
		start := time.Now()
		lat, busy, err := w.floor(ctx)
		if err != nil {
			return fmt.Errorf("floor operation %d (failed after %v): %w", i, time.Since(start), err)
		}
		res.Floor = append(res.Floor, lat)
		res.FloorBusy += busy
		return nil
	}
	revoke := func(i int) error {
		start := time.Now()
		lat, err := w.revoke(ctx)
		if err != nil {
			return fmt.Errorf("revoke operation %d (failed after %v): %w", i, time.Since(start), err)
		}
		res.Revoke = append(res.Revoke, lat)
		return nil
	}
	unary := func(i int) error {
		start := time.Now()
		if _, err := w.health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			return fmt.Errorf("floor unary call %d: %w", i, err)
		}
		res.Unary = append(res.Unary, time.Since(start))
		return nil
	}
	var first, second func(int) error
	switch mode {
	case ModeMixed:
		first, second = broker, floor
	case ModeBroker:
		first = broker
	case ModeFloor:
		first = floor
	case ModeRevoke:
		first, second = revoke, unary
	default:
		return nil, fmt.Errorf("unknown mode %q", mode)
	}
	for i := range n {
		a, b := first, second
		if i%2 == 1 && b != nil {
			a, b = b, a
		}
		if err := a(i); err != nil {
			return nil, err
		}
		if b != nil {
			if err := b(i); err != nil {
				return nil, err
			}
		}
	}
	res.End = time.Now()
	res.FloorEOFs = w.floorEOFs
	return res, nil
}

// broker runs one lease round trip: AllocateLease and the claim until the fd is in hand
// (lat), then closing the fd and ReleaseLease (busy is the whole).
func (w *worker) broker(ctx context.Context) (lat, busy time.Duration, err error) {
	start := time.Now()
	l, err := w.c.Allocate(ctx, client.AllocateOptions{BDF: w.bdf, BAR: 0, Ranges: w.ranges})
	if err != nil {
		return 0, 0, err
	}
	lat = time.Since(start)
	l.File.Close()
	if _, err := w.c.Release(ctx, l.ID); err != nil {
		return 0, 0, fmt.Errorf("release lease %s: %w", l.ID, err)
	}
	return lat, time.Since(start), nil
}

// floor runs the floor of a lease round trip: a unary call, then dial, request and reply
// with one fd (lat), then closing the fd and one more unary call for the release (busy is
// the whole).
func (w *worker) floor(ctx context.Context) (lat, busy time.Duration, err error) {
	start := time.Now()
	if _, err := w.health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		return 0, 0, err
	}
	fd, err := w.floorClaim(ctx)
	if err != nil {
		return 0, 0, err
	}
	lat = time.Since(start)
	unix.Close(fd)
	if _, err := w.health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		return 0, 0, err
	}
	return lat, time.Since(start), nil
}

// floorClaim dials the floor's claim socket, sends the request and returns the fd of the
// reply. The caller closes it.
func (w *worker) floorClaim(ctx context.Context) (int, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", w.floorFD)
	if err != nil {
		return -1, err
	}
	c := nc.(*net.UnixConn)
	if _, err := c.Write(w.req); err != nil {
		c.Close()
		return -1, err
	}
	n, oobn, _, _, err := c.ReadMsgUnix(w.buf, w.oob) // MSG_CMSG_CLOEXEC
	if errors.Is(err, io.EOF) {
		// Linux reports EOF on a non-blocking SOCK_SEQPACKET socket whose queue was empty
		// when recvmsg looked, even if the peer queued its reply and closed right after:
		// unix_dgram_recvmsg checks RCV_SHUTDOWN without looking at the queue again. The
		// reply is then still there for the next recvmsg (a real EOF repeats).
		n, oobn, _, _, err = c.ReadMsgUnix(w.buf, w.oob)
		if err == nil {
			w.floorEOFs++
		}
	}
	fds := fdpass.ParseRights(w.oob[:oobn])
	c.Close()
	if err == nil && (n != floorReplySize || len(fds) != 1) {
		err = fmt.Errorf("floor reply of %d bytes with %d fds, want %d bytes with 1", n, len(fds), floorReplySize)
	}
	if err != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return -1, err
	}
	return fds[0], nil
}

// revoke allocates and claims a lease (not timed), then times an administrator's
// RevokeLease of it: the response comes once its dma-buf is dead.
func (w *worker) revoke(ctx context.Context) (time.Duration, error) {
	l, err := w.c.Allocate(ctx, client.AllocateOptions{BDF: w.bdf, BAR: 0, Ranges: w.ranges})
	if err != nil {
		return 0, err
	}
	defer l.File.Close()
	start := time.Now()
	got, err := w.c.Revoke(ctx, l.ID)
	lat := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("revoke lease %s: %w", l.ID, err)
	}
	if got.GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED {
		return 0, fmt.Errorf("revoke lease %s: state %v after RevokeLease", l.ID, got.GetState())
	}
	return lat, nil
}

// writeJSON writes v to path as JSON.
func writeJSON(path string, v any) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(f)
	err = json.NewEncoder(bw).Encode(v)
	return errors.Join(err, bw.Flush(), f.Close())
}

// readJSON reads path's JSON into v.
func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
