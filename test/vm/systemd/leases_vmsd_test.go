//go:build vmsystemd

package systemd

// Helpers of the restart, crash and soak tests: lease holders in their own processes, a
// load generator, the daemon's dma-buf census and the lease invariants.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const daemonConfig = "/etc/mmiobroker/mmiobrokerd.toml"

func iommufdKernel() bool { return os.Getenv("MMIOBROKER_VM_KERNEL") == "iommufd" }

// props reads properties of the service with systemctl show.
func props(t testing.TB, names ...string) map[string]string {
	t.Helper()
	out, err := run(time.Minute, "systemctl", "show", "-p", strings.Join(names, ","), service)
	if err != nil {
		t.Fatalf("systemctl show %s: %v\n%s", service, err, out)
	}
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), "="); ok {
			m[k] = v
		}
	}
	return m
}

// monoNow is CLOCK_MONOTONIC in microseconds, systemd's *TimestampMonotonic clock.
func monoNow() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}

// readyAfter waits until the service is active with a main PID other than old and returns
// how long after since (CLOCK_MONOTONIC µs) it became ready: systemd enters "active" for
// a Type=notify service when it gets READY=1, and stamps ActiveEnterTimestampMonotonic.
func readyAfter(t testing.TB, old int, since int64, limit time.Duration) (unitState, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		p := props(t, "ActiveState", "SubState", "MainPID", "NRestarts", "ActiveEnterTimestampMonotonic")
		pid, _ := strconv.Atoi(p["MainPID"])
		n, _ := strconv.Atoi(p["NRestarts"])
		st := unitState{Active: p["ActiveState"], Sub: p["SubState"], MainPID: pid, NRestarts: n}
		if active(st) && pid != old {
			at, _ := strconv.ParseInt(p["ActiveEnterTimestampMonotonic"], 10, 64)
			return st, time.Duration(at-since) * time.Microsecond
		}
		if time.Since(start) > limit {
			t.Fatalf("the daemon is not back (active, main PID other than %d) within %v: %v\n%s", old, limit, st, journal(service, 60))
		}
		// Every systemctl run takes the one vCPU from the starting daemon; the ready time
		// comes from systemd's timestamp, not from this poll.
		time.Sleep(2 * pollInterval)
	}
}

// dumpJournalOnFailure logs the daemon's journal of this boot when t fails.
func dumpJournalOnFailure(t *testing.T) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("test failed; %s", journal(service, 400))
		}
	})
}

// --- holders -------------------------------------------------------------------------------

// holder is a lease holder in its own process: `mmiobrokerctl allocate -exec BDF BAR --
// mmb-holder` (test/vm/cmd/mmb-holder). mmiobrokerctl allocated and claimed the lease
// and waits for mmb-holder, which holds the dma-buf as fd 3 and answers commands.
type holder struct {
	t        *testing.T
	name     string
	cmd      *exec.Cmd
	in       io.WriteCloser
	lines    chan string
	done     chan struct{}
	ID       string
	Inode    uint64
	Gen      uint64
	Size     uint64
	stderrMu sync.Mutex
	stderr   strings.Builder
}

func (h *holder) Write(p []byte) (int, error) {
	h.stderrMu.Lock()
	defer h.stderrMu.Unlock()
	return h.stderr.Write(p)
}

// startHolder allocates a lease of bdf bar (ranges: mmiobrokerctl -range arguments) held
// by a new holder process; it is released when the test ends.
func startHolder(t *testing.T, name, bdf string, bar int, ranges ...string) *holder {
	t.Helper()
	args := []string{"-timeout", "20s", "allocate"}
	for _, r := range ranges {
		args = append(args, "-range", r)
	}
	args = append(args, "-vm", name, "-exec", bdf, strconv.Itoa(bar), "--", "/usr/bin/mmb-holder")
	h := &holder{t: t, name: name, lines: make(chan string, 16), done: make(chan struct{})}
	h.cmd = exec.Command("mmiobrokerctl", args...)
	h.cmd.Stderr = h
	var err error
	if h.in, err = h.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("holder %s: %v", name, err)
	}
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			h.lines <- s.Text()
		}
		close(h.lines)
	}()
	go func() { h.cmd.Wait(); close(h.done) }()
	t.Cleanup(h.stop)
	info, err := h.do("info")
	if err != nil {
		t.Fatalf("holder %s (mmiobrokerctl %s): %v\n%s", name, strings.Join(args, " "), err, journal(service, 40))
	}
	for _, f := range strings.Fields(info) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "id":
			h.ID = v
		case "inode":
			h.Inode, _ = strconv.ParseUint(v, 10, 64)
		case "gen":
			h.Gen, _ = strconv.ParseUint(v, 10, 64)
		case "size":
			h.Size, _ = strconv.ParseUint(v, 10, 64)
		}
	}
	if h.ID == "" || h.Inode == 0 || h.Gen == 0 {
		t.Fatalf("holder %s: info %q", name, info)
	}
	t.Logf("holder %s (pid %d): lease %s of %s bar %d, generation %d, dma-buf inode %d, %d bytes",
		name, h.cmd.Process.Pid, h.ID, bdf, bar, h.Gen, h.Inode, h.Size)
	return h
}

// do sends one command and returns the text of its "ok" answer, or the "err" answer as an
// error.
func (h *holder) do(cmd string) (string, error) {
	if _, err := fmt.Fprintln(h.in, cmd); err != nil {
		return "", fmt.Errorf("holder %s: %s: %w (stderr: %s)", h.name, cmd, err, h.stderrText())
	}
	timeout := time.After(90 * time.Second)
	for {
		select {
		case l, ok := <-h.lines:
			if !ok {
				return "", fmt.Errorf("holder %s: %s: the holder exited (stderr: %s)", h.name, cmd, h.stderrText())
			}
			if rest, ok := strings.CutPrefix(l, "ok "); ok {
				return rest, nil
			}
			if rest, ok := strings.CutPrefix(l, "err "); ok {
				return "", fmt.Errorf("holder %s: %s", h.name, rest)
			}
			h.t.Logf("holder %s: %s", h.name, l)
		case <-timeout:
			return "", fmt.Errorf("holder %s: no answer to %q within 90s", h.name, cmd)
		}
	}
}

func (h *holder) must(cmd string) string {
	h.t.Helper()
	out, err := h.do(cmd)
	if err != nil {
		h.t.Fatal(err)
	}
	return out
}

func (h *holder) stderrText() string {
	h.stderrMu.Lock()
	defer h.stderrMu.Unlock()
	return strings.TrimSpace(h.stderr.String())
}

// stop ends the holder (mmiobrokerctl then releases the lease).
func (h *holder) stop() {
	select {
	case <-h.done:
		return
	default:
	}
	fmt.Fprintln(h.in, "quit")
	h.in.Close()
	select {
	case <-h.done:
	case <-time.After(60 * time.Second):
		h.cmd.Process.Kill()
		<-h.done
		h.t.Errorf("holder %s did not exit within 60s of quit", h.name)
	}
	if s := h.stderrText(); s != "" {
		h.t.Logf("holder %s stderr: %s", h.name, s)
	}
}

// --- lease invariants ----------------------------------------------------------------------

func dial(t testing.TB) *client.Client {
	t.Helper()
	c, err := client.Dial(controlSock)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// leases lists every lease the daemon knows (live and recently ended), by id.
func leases(t testing.TB, c *client.Client) map[string]*brokerv1.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.API().ListLeases(ctx, &brokerv1.ListLeasesRequest{})
	if err != nil {
		t.Fatalf("ListLeases: %v\n%s", err, journal(service, 40))
	}
	m := map[string]*brokerv1.Lease{}
	for _, l := range resp.GetLeases() {
		m[l.GetId()] = l
	}
	return m
}

func live(l *brokerv1.Lease) bool {
	return l.GetState() == brokerv1.LeaseState_LEASE_STATE_ALLOCATED || l.GetState() == brokerv1.LeaseState_LEASE_STATE_ACTIVE
}

// checkHolders checks that the daemon reports every holder's lease live, claimed, at the
// generation and inode the holder holds (nothing ended, nothing reissued), and on the
// iommufd kernel that each holder's fd still maps into a fresh IOAS (not revoked). Each
// problem is reported with t.Errorf and counted as lost (not listed, or ended without
// being revoked) or revoked (ended REVOKED, reissued, or the fd no longer maps).
func checkHolders(t testing.TB, all map[string]*brokerv1.Lease, hs ...*holder) (lost, revoked int) {
	t.Helper()
	for _, h := range hs {
		l := all[h.ID]
		switch {
		case l == nil:
			t.Errorf("LOST: holder %s's lease %s is not listed by the daemon", h.name, h.ID)
			lost++
			continue
		case !live(l):
			t.Errorf("holder %s's lease %s ended: %v %v by %q", h.name, h.ID, l.GetState(), l.GetEndReason(), l.GetEndedBy())
			if l.GetState() == brokerv1.LeaseState_LEASE_STATE_REVOKED {
				revoked++
			} else {
				lost++
			}
		case l.GetGeneration() != h.Gen || l.GetInode() != h.Inode:
			t.Errorf("holder %s's lease %s: generation %d inode %d, the holder holds generation %d inode %d (reissued: its fd was revoked)",
				h.name, h.ID, l.GetGeneration(), l.GetInode(), h.Gen, h.Inode)
			revoked++
		case l.GetState() != brokerv1.LeaseState_LEASE_STATE_ACTIVE || l.GetClaimTime() == nil:
			t.Errorf("holder %s's lease %s: %v claimed %v, want ACTIVE and claimed", h.name, h.ID, l.GetState(), l.GetClaimTime() != nil)
			lost++
		}
		if iommufdKernel() {
			if _, err := h.do("fresh"); err != nil {
				t.Errorf("REVOKED: %v", err)
				revoked++
			}
		}
	}
	return lost, revoked
}

// --- dma-buf census ------------------------------------------------------------------------

// census is the dma-bufs of VFIO devices (exp_name vfio_pci_core) the daemon holds, by
// inode with their names (mmb-<lease id>), and those in its fd store (dmabuf.<inode>).
type census struct {
	daemon map[uint64]string
	store  map[uint64]bool
}

func takeCensus(t testing.TB, pid int) census {
	t.Helper()
	c := census{daemon: map[uint64]string{}, store: map[uint64]bool{}}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("the daemon's fds: %v", err)
	}
	for _, e := range ents {
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil || !strings.Contains(string(info), "exp_name:\tvfio_pci_core") {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(dir+"/"+e.Name(), &st); err != nil {
			continue // closed meanwhile
		}
		name := ""
		for _, l := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(l, "name:\t"); ok {
				name = strings.TrimSpace(v)
			}
		}
		c.daemon[st.Ino] = name
	}
	out, err := run(time.Minute, "systemd-analyze", "fdstore", "--no-pager", service)
	if err != nil {
		t.Fatalf("systemd-analyze fdstore %s: %v\n%s", service, err, out)
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if v, ok := strings.CutPrefix(f[0], "dmabuf."); ok {
			ino, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Errorf("fd store entry %q: not dmabuf.<inode>", f[0])
				continue
			}
			c.store[ino] = true
		}
	}
	return c
}

// bufAccount compares the census with the leases that have an outstanding claim token
// (ALLOCATED, or a reissued generation not claimed yet: claim_time unset): the daemon must
// hold exactly those dma-bufs (in its fds and in the fd store), any other is leaked.
type bufAccount struct {
	leaked, missing []string
	outstanding     int
}

func account(c census, all map[string]*brokerv1.Lease) bufAccount {
	want := map[uint64]string{}
	for id, l := range all {
		if live(l) && l.GetClaimTime() == nil {
			want[l.GetInode()] = id
		}
	}
	var a bufAccount
	a.outstanding = len(want)
	for ino, name := range c.daemon {
		if _, ok := want[ino]; !ok {
			a.leaked = append(a.leaked, fmt.Sprintf("daemon fd: dma-buf inode %d %q", ino, name))
		}
	}
	for ino := range c.store {
		if _, ok := want[ino]; !ok {
			a.leaked = append(a.leaked, fmt.Sprintf("fd store: dmabuf.%d (%s)", ino, c.daemon[ino]))
		}
	}
	for ino, id := range want {
		if _, ok := c.daemon[ino]; !ok {
			a.missing = append(a.missing, fmt.Sprintf("lease %s (%v gen %d) has a claim token but the daemon holds no dma-buf inode %d", id, all[id].GetState(), all[id].GetGeneration(), ino))
		}
		if !c.store[ino] {
			a.missing = append(a.missing, fmt.Sprintf("lease %s (%v gen %d) has a claim token but dmabuf.%d is not in the fd store", id, all[id].GetState(), all[id].GetGeneration(), ino))
		}
	}
	sort.Strings(a.leaked)
	sort.Strings(a.missing)
	return a
}

// checkBuffers polls the census (claims in flight settle) for up to 10 s and reports the
// leaked and missing dma-bufs of the last one; it returns the number leaked.
func checkBuffers(t testing.TB, c *client.Client) int {
	t.Helper()
	var a bufAccount
	start := time.Now()
	for {
		pid := show(t, service).MainPID
		all := leases(t, c)
		a = account(takeCensus(t, pid), all)
		if len(a.leaked)+len(a.missing) == 0 {
			return 0
		}
		if time.Since(start) > 10*time.Second {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, l := range a.leaked {
		t.Errorf("LEAKED dma-buf: %s", l)
	}
	for _, m := range a.missing {
		t.Errorf("MISSING dma-buf: %s", m)
	}
	out, _ := run(time.Minute, "systemd-analyze", "fdstore", "--no-pager", service)
	t.Logf("systemd-analyze fdstore %s:\n%s", service, out)
	return len(a.leaked)
}

// --- load generator ------------------------------------------------------------------------

// loadTarget is a BAR range the load generator leases again and again.
type loadTarget struct {
	bdf    string
	bar    uint32
	off    uint64
	length uint64
}

// told is a lease the daemon told the load generator about (an AllocateLease reply).
type told struct {
	id       string
	inode    uint64
	gen      uint64
	file     *os.File // the claimed fd; nil until claimed
	released bool     // the daemon confirmed our release
	claimErr error    // the claim failed for good (not just UNAVAILABLE)
}

// loadGen allocates, claims and releases leases on its targets in a loop (holding up to two
// at a time), from this process. Errors while the daemon restarts must be UNAVAILABLE
// only; it retries claims and releases until they succeed.
type loadGen struct {
	t       *testing.T
	c       *client.Client
	targets []loadTarget

	mu         sync.Mutex
	paused     bool
	resume     *sync.Cond
	granted    int // allocations the daemon confirmed
	claimed    int
	released   int
	unavail    int // UNAVAILABLE errors (restart windows)
	unexpected []string
	leases     []*told  // every lease we were told about, in order
	lostClaims []string // leases whose claim was spent without the fd reaching us
	held       []*told

	stop chan struct{}
	done chan struct{}
	idle chan struct{} // a paused generator sends once on it when it stops between steps
}

func startLoad(t *testing.T, targets ...loadTarget) *loadGen {
	g := &loadGen{t: t, c: dial(t), targets: targets, stop: make(chan struct{}), done: make(chan struct{}), idle: make(chan struct{}, 1)}
	g.resume = sync.NewCond(&g.mu)
	go g.loop()
	t.Cleanup(func() { g.finish() })
	return g
}

// allowed reports whether err is what a client may see while the daemon restarts.
func allowed(err error) bool {
	var ce *client.ClaimError
	if errors.As(err, &ce) {
		return ce.GRPCCode() == codes.Unavailable
	}
	return status.Code(err) == codes.Unavailable
}

func (g *loadGen) note(format string, a ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.unexpected = append(g.unexpected, fmt.Sprintf(format, a...))
}

func (g *loadGen) loop() {
	defer close(g.done)
	for i := 0; ; i++ {
		g.mu.Lock()
		for g.paused {
			select {
			case g.idle <- struct{}{}:
			default:
			}
			g.resume.Wait()
		}
		g.mu.Unlock()
		select {
		case <-g.stop:
			return
		default:
		}
		g.step(g.targets[i%len(g.targets)])
	}
}

// retry calls fn until it returns something other than UNAVAILABLE, for up to 60 s.
func (g *loadGen) retry(what string, fn func(ctx context.Context) error) error {
	start := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := fn(ctx)
		cancel()
		if err == nil || !allowed(err) {
			return err
		}
		g.mu.Lock()
		g.unavail++
		g.mu.Unlock()
		if time.Since(start) > 60*time.Second {
			return fmt.Errorf("%s: still UNAVAILABLE after 60s: %w", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (g *loadGen) step(tg loadTarget) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	resp, err := g.c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: tg.bdf, Bar: tg.bar,
		Ranges: []*brokerv1.Range{{Offset: tg.off, Length: tg.length}}, VmName: "load"})
	cancel()
	if err != nil {
		if allowed(err) {
			g.mu.Lock()
			g.unavail++
			g.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		} else {
			g.note("allocate %s bar %d: %v", tg.bdf, tg.bar, err)
			time.Sleep(500 * time.Millisecond)
		}
		return
	}
	l := &told{id: resp.GetLease().GetId(), inode: resp.GetLease().GetInode(), gen: resp.GetLease().GetGeneration()}
	g.mu.Lock()
	g.granted++
	g.leases = append(g.leases, l)
	g.mu.Unlock()
	token := resp.GetClaimToken()
	err = g.retry("claim "+l.id, func(ctx context.Context) error {
		f, info, err := g.c.Claim(ctx, l.id, token)
		if err == nil {
			l.file, l.gen, l.inode = f, info.Generation, info.Inode
		}
		return err
	})
	if err != nil {
		// The claim may have been journaled before the daemon died (its reply lost): then
		// the token is spent, and if the lease is ACTIVE and claimed, its dma-buf went to
		// nobody: a lease we were told about that we can never use (lost).
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, gerr := g.c.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: l.id})
		cancel()
		g.mu.Lock()
		l.claimErr = err
		if gerr == nil && live(resp.GetLease()) && resp.GetLease().GetClaimTime() != nil {
			g.lostClaims = append(g.lostClaims, fmt.Sprintf("lease %s: the claim failed (%v) after a restart, yet the daemon reports it %v and claimed at generation %d: its fd reached no process and the token is spent",
				l.id, err, resp.GetLease().GetState(), resp.GetLease().GetGeneration()))
		} else {
			g.unexpected = append(g.unexpected, fmt.Sprintf("claim of lease %s: %v (lease now: %v, %v)", l.id, err, resp.GetLease(), gerr))
		}
		g.mu.Unlock()
		g.releaseLease(l)
		return
	}
	g.mu.Lock()
	g.claimed++
	g.held = append(g.held, l)
	var old *told
	if len(g.held) > 2 {
		old, g.held = g.held[0], g.held[1:]
	}
	g.mu.Unlock()
	if old != nil {
		g.releaseLease(old)
	}
}

func (g *loadGen) releaseLease(l *told) {
	err := g.retry("release "+l.id, func(ctx context.Context) error {
		_, err := g.c.Release(ctx, l.id)
		if status.Code(err) == codes.FailedPrecondition {
			// Ended already: our earlier release went through before its reply was lost?
			resp, gerr := g.c.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: l.id})
			if gerr == nil && resp.GetLease().GetEndReason() == brokerv1.EndReason_END_REASON_RELEASED {
				return nil
			}
			if gerr != nil && allowed(gerr) {
				return gerr
			}
			return fmt.Errorf("%w (lease now: %v)", err, resp.GetLease())
		}
		return err
	})
	if l.file != nil {
		l.file.Close()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		g.unexpected = append(g.unexpected, fmt.Sprintf("release of lease %s: %v", l.id, err))
		return
	}
	l.released = true
	g.released++
}

// pause stops the generator between two steps (nothing in flight) and waits for that.
func (g *loadGen) pause() {
	g.mu.Lock()
	g.paused = true
	g.mu.Unlock()
	select {
	case <-g.idle:
	case <-g.done:
	case <-time.After(3 * time.Minute):
		g.t.Fatal("the load generator did not pause within 3 minutes")
	}
}

func (g *loadGen) unpause() {
	g.mu.Lock()
	g.paused = false
	g.mu.Unlock()
	g.resume.Broadcast()
}

// waitGrants waits until the daemon granted n more leases than before (the load is
// flowing), up to limit.
func (g *loadGen) waitGrants(before, n int, limit time.Duration) {
	g.t.Helper()
	start := time.Now()
	for {
		g.mu.Lock()
		got := g.granted
		g.mu.Unlock()
		if got >= before+n {
			return
		}
		if time.Since(start) > limit {
			g.t.Fatalf("the load generator got %d grants in %v, want %d: %s\n%s", got-before, limit, n, g.summary(), journal(service, 40))
		}
		time.Sleep(pollInterval)
	}
}

func (g *loadGen) grants() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.granted
}

func (g *loadGen) summary() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return fmt.Sprintf("granted %d, claimed %d, released %d, UNAVAILABLE %d, unexpected errors %d", g.granted, g.claimed, g.released, g.unavail, len(g.unexpected))
}

// check (paused) compares what the load generator was told with what the daemon reports:
// the leases it holds are live at the generation it claimed, those it released ended
// RELEASED, and it saw no error but UNAVAILABLE. Returns (lost, unexpected revocations).
func (g *loadGen) check(t testing.TB, all map[string]*brokerv1.Lease) (lost, revoked int) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, u := range g.unexpected {
		t.Errorf("load generator: unexpected error (only UNAVAILABLE is allowed while the daemon restarts): %s", u)
	}
	g.unexpected = nil
	for _, m := range g.lostClaims {
		t.Errorf("LOST (claim): %s", m)
		lost++
	}
	g.lostClaims = nil
	for _, l := range g.leases {
		d := all[l.id]
		switch {
		case l.released:
			if d != nil && d.GetEndReason() != brokerv1.EndReason_END_REASON_RELEASED {
				t.Errorf("load lease %s, released by the load generator, is %v %v", l.id, d.GetState(), d.GetEndReason())
				revoked++
			}
		case d == nil:
			t.Errorf("LOST: load lease %s (told by AllocateLease, not released) is not listed by the daemon", l.id)
			lost++
		case l.file != nil && !live(d):
			t.Errorf("load lease %s, held, ended: %v %v by %q", l.id, d.GetState(), d.GetEndReason(), d.GetEndedBy())
			if d.GetState() == brokerv1.LeaseState_LEASE_STATE_REVOKED {
				revoked++
			} else {
				lost++
			}
		case l.file != nil && d.GetGeneration() != l.gen:
			t.Errorf("load lease %s, held at generation %d, is at generation %d (reissued: revoked)", l.id, l.gen, d.GetGeneration())
			revoked++
		case !live(d) && d.GetEndReason() == brokerv1.EndReason_END_REASON_UNSPECIFIED:
			t.Errorf("load lease %s ended without a reason: %v", l.id, d)
			lost++
		}
	}
	// forget the settled ones
	g.leases = slices.DeleteFunc(g.leases, func(l *told) bool { return l.released })
	return lost, revoked
}

// finish stops the generator and releases what it holds.
func (g *loadGen) finish() {
	select {
	case <-g.stop:
		return
	default:
	}
	close(g.stop)
	g.unpause()
	<-g.done
	for _, l := range g.held {
		g.releaseLease(l)
	}
	g.held = nil
	g.c.Close()
}

// mapsFresh reports whether f, a dma-buf of size bytes, maps as a whole into a fresh
// iommufd IOAS (a revoked dma-buf does not: ENODEV).
func mapsFresh(f *os.File, size uint64) error {
	fd, err := iommufd.Open("")
	if err != nil {
		return err
	}
	defer fd.Close()
	ioas, err := fd.AllocIOAS()
	if err != nil {
		return err
	}
	m, err := ioas.Map(f, iommufd.MapOptions{IOVA: 0x100000, Fixed: true})
	if err == nil && m.Length != size {
		err = fmt.Errorf("mapped %d bytes, want the dma-buf's %d", m.Length, size)
	}
	return err
}
