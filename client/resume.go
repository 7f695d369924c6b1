package client

import (
	"context"
	"errors"
	"io"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// LastSeqHeader is the WatchEvents response header carrying the sequence number of the
// last event before the subscription (docs/api.md): where an event stream resumes if it
// ends before any event arrived.
const LastSeqHeader = "mmiobroker-last-seq"

// ReconnectTimeout is how long [Client.Watch] and a [HeldLease] wait by default for the
// daemon to come back when their event stream ends with codes.Unavailable (a restart, an
// upgrade, a crash and restart by systemd): they then resume after the last event they
// saw, so no event is missed or repeated. See [WithReconnectTimeout].
const ReconnectTimeout = 2 * time.Minute

// eventStream is a WatchEvents stream that follows the daemon across restarts.
type eventStream struct {
	c      *Client
	stream grpc.ServerStreamingClient[brokerv1.WatchEventsResponse]
	cancel context.CancelFunc // ends stream
	seq    uint64             // the last event seen (or the header's last before the subscription)
	w      *watchConfig
}

// openEvents subscribes as w asks after cursor after (0: from now), waits until the
// daemon has subscribed (its response headers) and then calls w.subscribed, if set. wait
// makes the call wait for the daemon (a restart in progress) instead of failing at once,
// up to the deadline of setup; the stream itself lives as long as ctx.
func (c *Client) openEvents(ctx, setup context.Context, w *watchConfig, after uint64, wait bool) (*eventStream, error) {
	sctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(setup, cancel)
	req := &brokerv1.WatchEventsRequest{AfterSeq: after, DeviceEvents: w.deviceEvents}
	stream, err := c.api.WatchEvents(sctx, req, grpc.WaitForReady(wait))
	var md metadata.MD
	if err == nil {
		md, err = stream.Header()
	}
	if !stop() && err == nil {
		err = setup.Err()
	}
	if err != nil {
		cancel()
		if ctx.Err() == nil && setup.Err() != nil {
			err = status.FromContextError(setup.Err()).Err()
		}
		return nil, err
	}
	es := &eventStream{c: c, stream: stream, cancel: cancel, seq: after, w: w}
	last := after
	if v := md.Get(LastSeqHeader); len(v) == 1 {
		last, _ = strconv.ParseUint(v[0], 10, 64)
	}
	if after == 0 {
		es.seq = last
	}
	if w.subscribed != nil {
		w.subscribed(last)
	}
	return es, nil
}

// close ends the stream.
func (es *eventStream) close() { es.cancel() }

// recv returns the next event. When the stream ends with codes.Unavailable it
// subscribes again after the last event seen, waiting up to ReconnectTimeout for the
// daemon; other errors end it.
func (es *eventStream) recv(ctx context.Context) (*brokerv1.Event, error) {
	for {
		resp, err := es.stream.Recv()
		if err == nil {
			e := resp.GetEvent()
			es.seq = max(es.seq, e.GetSeq())
			return e, nil
		}
		if errors.Is(err, io.EOF) {
			err = status.Error(codes.Unavailable, "the daemon ended the event stream")
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil || es.c.reconnect == 0 {
			return nil, err
		}
		if rerr := es.reopen(ctx); rerr != nil {
			return nil, errors.Join(err, rerr)
		}
	}
}

// reopen subscribes again after es.seq, retrying while the daemon is unavailable, for up
// to the client's reconnect timeout.
func (es *eventStream) reopen(ctx context.Context) error {
	es.cancel()
	setup, cancel := context.WithTimeout(ctx, es.c.reconnect)
	defer cancel()
	wait := 10 * time.Millisecond
	for {
		n, err := es.c.openEvents(ctx, setup, es.w, es.seq, true)
		if err == nil {
			es.stream, es.cancel = n.stream, n.cancel
			return nil
		}
		if status.Code(err) != codes.Unavailable && status.Code(err) != codes.DeadlineExceeded || setup.Err() != nil {
			return err
		}
		select {
		case <-setup.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Second)
	}
}
