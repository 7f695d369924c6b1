package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/server"
)

// The scale scenario's leases: one page each, of the fake devices' 16 MiB BAR 4, so that
// a device has room for 4096 leases that overlap no other (leases of different tenants
// may not overlap).
const (
	scaleBAR       = 4
	scalePage      = 4096
	scalePagesPerD = 16 << 20 / scalePage
)

// scaleRange returns the device and the range of the scale scenario's lease number g:
// leases go round robin over the devices, each on the next free page of its device.
func scaleRange(g, devices int) (bdf string, r *brokerv1.Range) {
	return DeviceBDF(g % devices), &brokerv1.Range{Offset: uint64(g/devices) * scalePage, Length: scalePage}
}

// Commands the scale scenario's orchestrator sends its holder and watcher processes on
// their standard input, one a line; each answers with one line of JSON on its standard
// output. Both say lineReady once connected, and exit when their standard input closes.
const (
	cmdFill  = "fill"  // holder: "fill N": allocate and claim until N leases are held
	cmdWatch = "watch" // watcher: open every stream and wait until each is in place
	cmdStop  = "stop"  // watcher: "stop SEQ": read every stream up to event SEQ, then close it
)

// HolderOptions are the settings of a holder process of the scale scenario.
type HolderOptions struct {
	// Dir is the scenario's directory (the daemon's sockets).
	Dir string
	// Index is this process's number among Procs: its leases are the scenario's lease
	// numbers Index, Index+Procs, Index+2·Procs, … (see scaleRange).
	Index, Procs int
	// Devices is the number of fake devices.
	Devices int
}

// FillResult is a holder's answer to a fill command.
type FillResult struct {
	// Held is how many leases the process holds now; Elapsed how long the command took.
	Held    int
	Elapsed time.Duration
	// Fill is the latency of each lease round trip (AllocateLease and claim) the command
	// made.
	Fill Histogram
}

// RunHolder is a holder process: it allocates, claims and holds leases as told (fill
// commands) and keeps them, fds open, until its standard input closes; then it closes the
// fds and returns, and its exit ends the leases.
func RunHolder(ctx context.Context, o HolderOptions, stdin io.Reader, stdout io.Writer) error {
	if o.Procs < 1 || o.Index < 0 || o.Index >= o.Procs || o.Devices < 1 {
		return fmt.Errorf("index %d of %d processes on %d devices: out of range", o.Index, o.Procs, o.Devices)
	}
	c, err := client.Dial(filepath.Join(o.Dir, controlSocket))
	if err != nil {
		return err
	}
	defer c.Close()
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	return serveCommands(stdin, stdout, func(cmd string, arg uint64) (any, error) {
		if cmd != cmdFill {
			return nil, fmt.Errorf("unknown command %q", cmd)
		}
		start := time.Now()
		res := FillResult{}
		for len(held) < int(arg) {
			g := len(held)*o.Procs + o.Index
			bdf, r := scaleRange(g, o.Devices)
			t := time.Now()
			l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: scaleBAR, Ranges: []*brokerv1.Range{r}})
			if err != nil {
				return nil, fmt.Errorf("lease %d (%s, offset %#x): %w", g, bdf, r.Offset, err)
			}
			res.Fill.Record(time.Since(t))
			held = append(held, l.File)
		}
		res.Held, res.Elapsed = len(held), time.Since(start)
		return res, nil
	})
}

// serveCommands says ready, then runs every command line of stdin ("name" or "name
// NUMBER") with do and writes its result as one line of JSON, until stdin ends.
func serveCommands(stdin io.Reader, stdout io.Writer, do func(cmd string, arg uint64) (any, error)) error {
	if _, err := fmt.Fprintln(stdout, lineReady); err != nil {
		return err
	}
	sc := bufio.NewScanner(stdin)
	for sc.Scan() {
		name, argText, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		var arg uint64
		if argText != "" {
			var err error
			if arg, err = strconv.ParseUint(argText, 10, 64); err != nil {
				return fmt.Errorf("command %q: %w", sc.Text(), err)
			}
		}
		res, err := do(name, arg)
		if err != nil {
			return fmt.Errorf("%s: %w", sc.Text(), err)
		}
		line, err := json.Marshal(res)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(stdout, "%s\n", line); err != nil {
			return err
		}
	}
	return sc.Err()
}

// WatcherOptions are the settings of a watcher process of the scale scenario.
type WatcherOptions struct {
	// Dir is the scenario's directory (the daemon's sockets).
	Dir string
	// Streams is how many WatchEvents streams the process keeps open, PerConn of them on
	// each connection (at most the daemon's 64 concurrent RPCs per connection).
	Streams, PerConn int
}

// WatchReport is a watcher's answer to a stop command: what its streams received of the
// events after their subscription up to the stop's sequence number.
type WatchReport struct {
	Streams int
	// Completed streams received every event up to the last; Cut ones were ended by the
	// daemon with RESOURCE_EXHAUSTED (they fell more than its buffer behind); Incomplete
	// ones had neither happened when the process gave up waiting.
	Completed, Cut, Incomplete int
	// Received counts the events the streams received; Missing those they should have
	// received and did not (every event of a cut stream after its cut included).
	Received, Missing uint64
	// Latency is each received event's delivery latency: from its time (set by the daemon
	// when it emitted the event) until the stream received it.
	Latency Histogram
	// Errors are the other ends of streams (each fails the run).
	Errors []string `json:",omitempty"`
	// CPU is the CPU time (user and system) the watcher process used from the end of the
	// watch command to the end of the stop command.
	CPU time.Duration
}

// watchStopTimeout is how long a watcher waits after a stop command for its streams to
// reach the last event.
const watchStopTimeout = 2 * time.Minute

// RunWatcher is a watcher process: as an administrator (it runs as root) it opens
// o.Streams event streams when told (watch), reads and counts their events, and reports
// when told where the events end (stop), until its standard input closes.
func RunWatcher(ctx context.Context, o WatcherOptions, stdin io.Reader, stdout io.Writer) error {
	if o.Streams < 1 || o.PerConn < 1 {
		return fmt.Errorf("%d streams, %d per connection: want at least 1 of each", o.Streams, o.PerConn)
	}
	var conns []*client.Client
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range (o.Streams + o.PerConn - 1) / o.PerConn {
		c, err := client.Dial(filepath.Join(o.Dir, controlSocket))
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	var streams []*watchStream
	var cpuAtWatch time.Duration
	defer func() {
		for _, s := range streams {
			s.cancel()
			<-s.done
		}
	}()
	return serveCommands(stdin, stdout, func(cmd string, arg uint64) (any, error) {
		switch cmd {
		case cmdWatch:
			if len(streams) > 0 {
				return nil, errors.New("streams already open")
			}
			for i := range o.Streams {
				s, err := openWatch(ctx, conns[i/o.PerConn].API())
				if err != nil {
					return nil, fmt.Errorf("stream %d: %w", i, err)
				}
				streams = append(streams, s)
			}
			cpuAtWatch = cpuTime()
			return struct{ Streams int }{len(streams)}, nil
		case cmdStop:
			rep := stopWatches(streams, arg, watchStopTimeout)
			rep.CPU = cpuTime() - cpuAtWatch
			streams = nil
			return rep, nil
		}
		return nil, fmt.Errorf("unknown command %q", cmd)
	})
}

// watchStream is one WatchEvents stream of a watcher and what it received. Its goroutine
// alone writes the counters until done is closed.
type watchStream struct {
	cancel context.CancelFunc
	done   chan struct{}
	from   uint64        // the last event before the subscription (mmiobroker-last-seq)
	last   atomic.Uint64 // the last event received
	target atomic.Uint64 // the last event to read (0: not known yet)

	received uint64
	latency  Histogram
	err      error // why the stream ended, if not at target
}

// openWatch opens a stream of every event after the subscription (an administrator's:
// every event of every tenant) and waits for its headers, which the daemon sends once the
// subscription is in place.
func openWatch(ctx context.Context, api brokerv1.BrokerClient) (*watchStream, error) {
	sctx, cancel := context.WithCancel(ctx)
	st, err := api.WatchEvents(sctx, &brokerv1.WatchEventsRequest{})
	if err != nil {
		cancel()
		return nil, err
	}
	md, err := st.Header()
	if err != nil {
		cancel()
		return nil, err
	}
	vals := md.Get(server.LastSeqHeader)
	if len(vals) != 1 {
		cancel()
		return nil, fmt.Errorf("header %s: %q", server.LastSeqHeader, vals)
	}
	from, err := strconv.ParseUint(vals[0], 10, 64)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("header %s: %w", server.LastSeqHeader, err)
	}
	s := &watchStream{cancel: cancel, done: make(chan struct{}), from: from}
	s.last.Store(from)
	go s.read(st)
	return s, nil
}

// read receives events until the stream ends or the target event came.
func (s *watchStream) read(st brokerv1.Broker_WatchEventsClient) {
	defer close(s.done)
	for {
		resp, err := st.Recv()
		if err != nil {
			if t := s.target.Load(); t == 0 || s.last.Load() < t {
				s.err = err
			}
			return
		}
		now := time.Now()
		ev := resp.GetEvent()
		seq := ev.GetSeq()
		if prev := s.last.Load(); seq <= prev {
			s.err = fmt.Errorf("event %d after event %d", seq, prev)
			s.cancel()
			return
		}
		s.latency.Record(now.Sub(ev.GetTime().AsTime()))
		s.received++
		s.last.Store(seq)
		if t := s.target.Load(); t != 0 && seq >= t {
			s.cancel()
			return
		}
	}
}

// stopWatches tells every stream that target is the last event, waits up to timeout for
// them to get there (or end), closes them and reports.
func stopWatches(streams []*watchStream, target uint64, timeout time.Duration) WatchReport {
	rep := WatchReport{Streams: len(streams)}
	for _, s := range streams {
		// The stream stores last before it loads target; this stores target before it
		// loads last: one of the two sees the other.
		s.target.Store(target)
		if s.last.Load() >= target {
			s.cancel()
		}
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	var errs []string
	for _, s := range streams {
		select {
		case <-s.done:
		case <-t.C:
			// Out of time: close every stream that is still waiting.
			for _, s := range streams {
				s.cancel()
			}
			<-s.done
		}
		rep.Received += s.received
		if want := target - min(s.from, target); s.received < want {
			rep.Missing += want - s.received
		}
		rep.Latency.Merge(&s.latency)
		switch {
		case s.last.Load() >= target:
			rep.Completed++
		case status.Code(s.err) == codes.ResourceExhausted:
			rep.Cut++
		case s.err == nil || status.Code(s.err) == codes.Canceled:
			rep.Incomplete++
		default:
			if len(errs) < 5 {
				errs = append(errs, s.err.Error())
			}
			rep.Incomplete++
		}
	}
	rep.Errors = errs
	return rep
}

// cpuTime returns the CPU time (user and system) this process used so far.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
