package holders

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

// Checker scans /proc for the daemon's dma-bufs on demand and periodically. A scan reads
// every process's descriptors, so it costs in proportion to the host's open files; the
// checker runs one scan at a time, and requests that wait for the lock share the scan
// that started after they arrived: many clients asking at once cost one scan, and no
// answer predates its request. Its methods are safe for concurrent use.
type Checker struct {
	// Root is procfs ("" means "/proc").
	Root string
	// Self is the daemon's PID (0 means os.Getpid()).
	Self int
	// Log gets the periodic check's findings (nil discards).
	Log *slog.Logger

	mu       sync.Mutex // one scan at a time; guards the fields below
	scan     dmabuf.Scan
	scanned  time.Time
	duration time.Duration
	last     *Report // the last periodic check's report, without its per-lease parts
}

// Report scans (or reuses a recent scan) and joins it with the leases list returns, which
// it calls after the scan so that every lease the scan could have seen is in it. It
// reports unaccounted dma-bufs only if unaccounted is set (callers who may see every
// lease).
func (c *Checker) Report(list func() ([]broker.Lease, error), unaccounted bool) (Report, error) {
	asked := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.refresh(asked); err != nil {
		return Report{}, err
	}
	leases, err := list()
	if err != nil {
		return Report{}, err
	}
	return c.join(leases, unaccounted), nil
}

// refresh scans unless the last scan started after asked. c.mu is held.
func (c *Checker) refresh(asked time.Time) error {
	if c.scanned.After(asked) {
		return nil
	}
	start := time.Now()
	s, err := dmabuf.ScanProcesses(dmabuf.ScanOptions{
		Root: c.Root,
		Keep: func(i dmabuf.FDInfo) bool { return i.ExpName == ExporterName },
	})
	if err != nil {
		return err
	}
	c.scan, c.scanned, c.duration = s, start, time.Since(start)
	return nil
}

func (c *Checker) join(leases []broker.Lease, unaccounted bool) Report {
	self := c.Self
	if self == 0 {
		self = os.Getpid()
	}
	r := Join(c.scan, leases, self, unaccounted)
	r.Time, r.Duration = c.scanned, c.duration
	return r
}

// Last returns the last periodic check's summary (its counts, time and processes; not
// its Leases and Unaccounted, which at 100,000 leases would keep ~50 MB alive between
// checks); false before the first one.
func (c *Checker) Last() (Report, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last == nil {
		return Report{}, false
	}
	return *c.last, true
}

// Run checks every interval until ctx is done, the first time one interval after it
// starts (not while a restarted daemon takes back its leases): a report of every lease,
// summarized for [Checker.Last] (the metrics), and a warning in the log for every ended lease whose fd a
// process still holds while it works and for every unaccounted dma-buf, each once.
func (c *Checker) Run(ctx context.Context, interval time.Duration, b *broker.Broker) {
	log := c.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	warned := make(map[string]bool)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r, err := c.Report(func() ([]broker.Lease, error) { return b.List(broker.Filter{}), nil }, true)
		if err != nil {
			log.Warn("holder check failed", "err", err)
		} else {
			sum := r
			sum.Leases, sum.Unaccounted = nil, nil
			c.mu.Lock()
			c.last = &sum
			c.mu.Unlock()
			seen := make(map[string]bool)
			for _, l := range r.Leases {
				if !l.Outlasting {
					continue
				}
				key := "lease " + l.Lease.ID
				seen[key] = true
				if !warned[key] {
					log.Warn("a process still holds the fd of an ended lease; it works until the device cycles",
						"lease", l.Lease.ID, "bdf", l.Lease.BDF, "revoke_due", l.Lease.RevokeDue, "holders", pids(l.Holders))
				}
			}
			for _, u := range r.Unaccounted {
				key := fmt.Sprintf("unaccounted pid %d fd %d ino %d", u.PID, u.FD, u.Info.Inode)
				seen[key] = true
				if !warned[key] {
					log.Warn("a vfio-pci dma-buf that no lease accounts for is open",
						"pid", u.PID, "comm", u.Comm, "fd", u.FD, "inode", u.Info.Inode, "name", u.Info.Name, "size", u.Info.Size)
				}
			}
			warned = seen
		}
	}
}

func pids(hs []Holder) []int {
	var out []int
	for _, h := range hs {
		if h.Role != RoleDaemon && h.Role != RoleFDStore {
			out = append(out, h.PID)
		}
	}
	return out
}
