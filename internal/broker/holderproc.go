package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// holderProc is a holder process with the live leases it holds: one pinned process (one
// pidfd, one more while its exit is waited for) and one exit watcher per process, however
// many leases it holds — a VMM with a lease per BAR, a client with thousands. Its fields
// are guarded by Broker.mu.
type holderProc struct {
	key    string
	proc   Process
	leases map[string]*lease
	cancel context.CancelFunc
}

// holderKey names l's holder process: its pid and start stamp (which tells it from a later
// process with the same pid). Without a stamp the lease gets a watcher of its own.
func holderKey(l *lease) string {
	if l.holder.Start == 0 {
		return "lease " + l.ID
	}
	return strconv.Itoa(int(l.Holder.PID)) + "/" + strconv.FormatUint(l.holder.Start, 10)
}

// watchHolder attaches l to its holder process, taking over l.holder.Proc: the process's
// first lease starts the watcher that ends every lease of it when it exits (end reason
// HOLDER_EXITED); a later lease of the same running process joins it and its own pin is
// closed. Called with b.mu held.
func (b *Broker) watchHolder(l *lease) {
	p := l.holder.Proc
	if p == nil {
		return
	}
	l.holder.Proc = nil
	key := holderKey(l)
	if h := b.holders[key]; h != nil && h.proc.Alive() {
		p.Close()
		h.leases[l.ID] = l
		l.hp = h
		return
	}
	// A new process, or one that exited while this lease was being allocated (its
	// watcher may have collected its leases already): a watcher of its own.
	ctx, cancel := context.WithCancel(context.Background())
	h := &holderProc{key: key, proc: p, leases: map[string]*lease{l.ID: l}, cancel: cancel}
	b.holders[key] = h
	l.hp = h
	pid := l.Holder.PID
	b.watchers.Add(1)
	go func() {
		defer b.watchers.Done()
		if p.Wait(ctx) != nil {
			return // its last lease ended first
		}
		b.mu.Lock()
		ids := make([]string, 0, len(h.leases))
		for id := range h.leases {
			ids = append(ids, id)
		}
		b.mu.Unlock()
		slices.Sort(ids)
		// One line per process: a VMM with thousands of leases ends them all at once (each
		// end has its own "lease ended" line and event).
		if len(ids) > 0 {
			b.log.Info("lease holder exited", "client_pid", pid, "leases", len(ids), "lease_id", ids[0])
		}
		for _, id := range ids {
			_, err := b.endByTenant(id, StateReleased, ReasonHolderExited, fmt.Sprintf("pid %d exited", pid), EventReleased)
			switch {
			case err == nil, errors.Is(err, errdefs.ErrFailedPrecondition): // ended meanwhile
			case b.Available() != nil: // closed: its stop (a drain or a detach) deals with them
				return
			default:
				b.log.Error("ending the lease of an exited holder failed", "lease_id", id, "err", err)
			}
		}
	}()
}

// unwatchHolder detaches l from its holder process; the last lease's detach stops the
// watcher and closes the pin. Called with b.mu held.
func (b *Broker) unwatchHolder(l *lease) {
	h := l.hp
	if h == nil {
		return
	}
	l.hp = nil
	delete(h.leases, l.ID)
	if len(h.leases) > 0 {
		return
	}
	h.cancel()
	h.proc.Close()
	if b.holders[h.key] == h {
		delete(b.holders, h.key)
	}
}

// holderAlive reports whether l's holder process still runs (true if it is not pinned).
// Called with b.mu held.
func (l *lease) holderAlive() bool {
	switch {
	case l.hp != nil:
		return l.hp.proc.Alive()
	case l.holder.Proc != nil:
		return l.holder.Proc.Alive()
	}
	return true
}

// unwatchAllLocked stops every holder watcher and closes every pin (Detach). Called with
// b.mu held.
func (b *Broker) unwatchAllLocked() {
	for _, h := range b.holders {
		h.cancel()
		h.proc.Close()
		for _, l := range h.leases {
			l.hp = nil
		}
	}
	clear(b.holders)
}
