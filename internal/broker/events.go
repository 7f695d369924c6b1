package broker

import (
	"fmt"
	"sync"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// subscriptionBuffer is how many live events a subscriber may fall behind before it is
// cut off with [ErrSubscriberLagged] (it then resumes with its last sequence number).
const subscriptionBuffer = 256

// ErrSubscriberLagged ends a [Subscription] whose reader fell too far behind; resubscribe
// with the last sequence number seen.
var ErrSubscriberLagged = fmt.Errorf("event subscriber fell behind: %w", errdefs.ErrResourceExhausted)

// eventLog keeps the last events for replay and fans new ones out to subscribers.
// Its methods are called with Broker.mu held.
type eventLog struct {
	// ring holds the last len(ring) events: ring[(head+i)%len(ring)] is the i-th oldest.
	// An event is allocated once and shared, read-only, by the ring and every
	// subscription it is delivered to (a subscriber's buffer is 256 pointers, not 256
	// copies of a lease).
	ring []*Event
	head int
	next uint64 // sequence number of the next event
	size int
	subs map[*Subscription]struct{}
	// lagged counts the subscriptions ended for falling behind (ErrSubscriberLagged).
	lagged uint64
}

func newEventLog(backlog int) *eventLog {
	return &eventLog{ring: make([]*Event, 0, min(backlog, 1024)), next: 1, size: backlog, subs: map[*Subscription]struct{}{}}
}

func (l *eventLog) append(e Event) Event {
	e.Seq = l.next
	l.next++
	ep := &e
	l.retain(ep)
	for s := range l.subs {
		if !s.push(ep) {
			delete(l.subs, s)
			l.lagged++
		}
	}
	return e
}

// retain keeps e (the newest event) for replay, dropping the oldest beyond size.
func (l *eventLog) retain(e *Event) {
	switch {
	case l.size == 0:
	case len(l.ring) < l.size:
		l.ring = append(l.ring, e)
	default:
		l.ring[l.head] = e
		l.head = (l.head + 1) % l.size
	}
}

// restore continues the sequence of a previous run: evs are its retained events (oldest
// first), last its last sequence number. Only the newest contiguous run of evs ending at
// last is kept for replay.
func (l *eventLog) restore(evs []Event, last uint64) {
	l.ring, l.head, l.next = l.ring[:0], 0, last+1
	start := len(evs)
	for i := len(evs) - 1; i >= 0; i-- {
		want := last - uint64(len(evs)-1-i)
		if evs[i].Seq != want || want == 0 {
			break
		}
		start = i
	}
	evs = evs[start:]
	if len(evs) > l.size {
		evs = evs[len(evs)-l.size:]
	}
	for i := range evs {
		e := evs[i]
		l.retain(&e)
	}
}

// oldest returns the sequence number of the oldest retained event (next if none).
func (l *eventLog) oldest() uint64 { return l.next - uint64(len(l.ring)) }

func (l *eventLog) since(cursor uint64) ([]*Event, error) {
	if cursor >= l.next {
		if cursor > l.next-1 {
			return nil, fmt.Errorf("event cursor %d is ahead of the last event %d: %w", cursor, l.next-1, errdefs.ErrInvalidArgument)
		}
		return nil, nil
	}
	if cursor+1 < l.oldest() {
		return nil, fmt.Errorf("event cursor %d is older than the oldest retained event %d; list leases to resync: %w",
			cursor, l.oldest(), errdefs.ErrFailedPrecondition)
	}
	out := make([]*Event, 0, l.next-1-cursor)
	for seq := cursor + 1; seq < l.next; seq++ {
		out = append(out, l.ring[(l.head+int(seq-l.oldest()))%len(l.ring)])
	}
	return out, nil
}

// Subscription delivers events in order. Read [Subscription.Events] until it is closed,
// then [Subscription.Err] says why.
type Subscription struct {
	last   uint64            // the sequence number of the last event before the subscription
	keep   func(*Event) bool // nil: every event
	ch     chan *Event
	b      *Broker
	mu     sync.Mutex
	err    error
	closed bool
}

// Last returns the sequence number of the last event that happened before the
// subscription (0 if none): live events follow it. A client that saw no event yet resumes
// from it after a restart.
func (s *Subscription) Last() uint64 { return s.last }

// Events returns the channel of events; it is closed when the subscription ends.
// The events are shared with other subscriptions: do not modify them.
func (s *Subscription) Events() <-chan *Event { return s.ch }

// Err returns why the subscription ended: nil after [Subscription.Close], or
// [ErrSubscriberLagged], or the broker shutting down.
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// push delivers e without blocking, unless the subscription's filter drops it; on
// overflow it ends the subscription and returns false.
func (s *Subscription) push(e *Event) bool {
	if s.keep != nil && !s.keep(e) {
		return true
	}
	select {
	case s.ch <- e:
		return true
	default:
		s.end(ErrSubscriberLagged)
		return false
	}
}

func (s *Subscription) end(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.err = err
	close(s.ch)
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.b.mu.Lock()
	delete(s.b.events.subs, s)
	s.b.mu.Unlock()
	s.end(nil)
}

// errBrokerClosed ends subscriptions when the broker closes.
var errBrokerClosed = fmt.Errorf("broker closed: %w", errdefs.ErrUnavailable)

// errBrokerRestarting ends subscriptions when the broker stops for a restart that keeps
// every lease: resume with the last sequence number once it is back.
var errBrokerRestarting = fmt.Errorf("broker restarting, leases kept; resume from your last event: %w", errdefs.ErrUnavailable)

// Subscribe returns the events after sequence number cursor (0: only new events). It fails
// with errdefs.ErrFailedPrecondition if events after cursor are no longer retained.
func (b *Broker) Subscribe(cursor uint64) (*Subscription, error) {
	return b.SubscribeFiltered(cursor, nil)
}

// MaxReplay bounds how many retained events one subscription replays: a cursor further
// back is refused like one older than the backlog (list leases to resync).
const MaxReplay = 4096

// SubscribeFiltered is [Broker.Subscribe] for the events keep accepts (nil: all). Events
// are filtered before they are buffered: only the subscriber's own events count against
// its buffer, so other tenants' activity cannot make it lag, and a replay holds only what
// it will deliver. keep is called with the broker's lock held: it must be quick, must
// not call the broker, and must not modify the event (it is shared).
func (b *Broker) SubscribeFiltered(cursor uint64, keep func(*Event) bool) (*Subscription, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("subscribe: %w", errBrokerClosed)
	}
	var backlog []*Event
	if cursor > 0 {
		if n := b.events.next - 1 - min(cursor, b.events.next-1); n > MaxReplay {
			return nil, fmt.Errorf("event cursor %d is %d events back, more than the %d a subscription replays; list leases to resync: %w",
				cursor, n, MaxReplay, errdefs.ErrFailedPrecondition)
		}
		all, err := b.events.since(cursor)
		if err != nil {
			return nil, err
		}
		for _, e := range all {
			if keep == nil || keep(e) {
				backlog = append(backlog, e)
			}
		}
	}
	// The buffer holds the replay plus subscriptionBuffer live events: memory per
	// subscriber is bounded by what it asked to replay.
	s := &Subscription{ch: make(chan *Event, len(backlog)+subscriptionBuffer), b: b, last: b.events.next - 1, keep: keep}
	for _, e := range backlog {
		s.ch <- e // fits: the channel holds the whole replay
	}
	b.events.subs[s] = struct{}{}
	return s, nil
}
