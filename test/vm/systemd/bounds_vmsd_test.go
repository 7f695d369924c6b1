//go:build vmsystemd

package systemd

// Tenants, the revocation bounds R and C, and the daemon's fd budget, on the real kernel
// under systemd: api/proto/mmiobroker/v1/broker.proto ("REVOCATION BOUNDS", the tenant
// text) and docs/config.md ([limits], [tenants]). The tenants are mmb-tenant processes
// (test/vm/cmd/mmb-tenant): uid 1000 in a transient scope under machine.slice (a VM unit),
// or outside one.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
)

const (
	// tenantUID is the rig's unprivileged lessee (every device's allow_uids).
	tenantUID = 1000
	// nofileDropIn lowers the service's fd limit for TestFdBudget.
	nofileDropIn = "/run/systemd/system/mmiobrokerd.service.d/50-mmb-nofile.conf"
	chunk64K     = 64 << 10
)

// --- tenant processes ----------------------------------------------------------------------

var scopeSeq atomic.Int32

// tenantProc is an mmb-tenant process driven on its stdin (see its package doc).
type tenantProc struct {
	t      *testing.T
	name   string
	scope  string // its scope unit under machine.slice; "" if it runs outside one
	tenant string // the tenant the daemon must see it as
	pid    int
	cmd    *exec.Cmd
	in     io.WriteCloser
	lines  chan string
	done   chan struct{}

	stderrMu sync.Mutex
	stderr   strings.Builder
}

func (p *tenantProc) Write(b []byte) (int, error) {
	p.stderrMu.Lock()
	defer p.stderrMu.Unlock()
	return p.stderr.Write(b)
}

func (p *tenantProc) stderrText() string {
	p.stderrMu.Lock()
	defer p.stderrMu.Unlock()
	return strings.TrimSpace(p.stderr.String())
}

// socketGID is the gid of the group that owns the daemon's sockets (deploy/'s socket
// units: SocketGroup=mmiobroker, mode 0660): a tenant needs it to connect.
func socketGID(t *testing.T) int {
	t.Helper()
	b := mustRead(t, "/etc/group")
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Split(l, ":")
		if len(f) >= 3 && f[0] == "mmiobroker" {
			gid, err := strconv.Atoi(f[2])
			if err != nil {
				t.Fatalf("/etc/group: %q", l)
			}
			return gid
		}
	}
	t.Fatal("/etc/group has no group mmiobroker (deploy/sysusers.d)")
	return 0
}

// startTenant starts mmb-tenant as uid (primary group: the sockets' group, no other
// groups). inVM puts it into a new transient scope under machine.slice, as libvirt puts
// a VM's QEMU: `systemd-run --scope --slice=machine.slice --unit=NAME`. The program drops
// to uid itself: the guest's passwd has no uid 1000, and systemd-run --uid= resolves the
// user through NSS ("Failed to resolve user").
func startTenant(t *testing.T, name string, uid int, inVM bool) *tenantProc {
	t.Helper()
	p := &tenantProc{t: t, name: name, lines: make(chan string, 16), done: make(chan struct{})}
	args := []string{"-uid", strconv.Itoa(uid), "-gid", strconv.Itoa(socketGID(t))}
	if inVM {
		unit := fmt.Sprintf("mmb-%s-%d-%d", name, os.Getpid(), scopeSeq.Add(1))
		p.scope = unit + ".scope"
		p.tenant = fmt.Sprintf("uid=%d,cgroup=/machine.slice/%s", uid, p.scope)
		p.cmd = exec.Command("systemd-run", append([]string{"--scope", "--quiet", "--slice=machine.slice",
			"--unit=" + unit, "--description=mmiobroker test tenant " + name, "--", "/usr/bin/mmb-tenant"}, args...)...)
	} else {
		p.tenant = fmt.Sprintf("uid=%d", uid)
		p.cmd = exec.Command("/usr/bin/mmb-tenant", args...)
	}
	p.cmd.Stderr = p
	var err error
	if p.in, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("tenant %s: %v", name, err)
	}
	go func() {
		s := bufio.NewScanner(out)
		s.Buffer(make([]byte, 1<<20), 16<<20)
		for s.Scan() {
			p.lines <- s.Text()
		}
		close(p.lines)
	}()
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	var who struct {
		UID    int    `json:"uid"`
		PID    int    `json:"pid"`
		Cgroup string `json:"cgroup"`
	}
	p.ok("whoami", &who)
	p.pid = who.PID
	switch {
	case who.UID != uid:
		t.Fatalf("tenant %s runs as uid %d, want %d", name, who.UID, uid)
	case inVM && who.Cgroup != "/machine.slice/"+p.scope:
		t.Fatalf("tenant %s is in cgroup %q, want /machine.slice/%s", name, who.Cgroup, p.scope)
	case !inVM && strings.HasPrefix(who.Cgroup, "/machine.slice/"):
		t.Fatalf("tenant %s is in cgroup %q, inside machine.slice", name, who.Cgroup)
	}
	t.Logf("tenant %s: pid %d uid %d cgroup %s: expects tenant %q", name, who.PID, who.UID, who.Cgroup, p.tenant)
	return p
}

// reply is one answer of an mmb-tenant.
type reply struct {
	ok   bool
	body string // ok: the JSON
	code string // err: the gRPC code name
	msg  string
}

func (p *tenantProc) call(cmd string, limit time.Duration) (reply, error) {
	if _, err := fmt.Fprintln(p.in, cmd); err != nil {
		return reply{}, fmt.Errorf("tenant %s: %s: %w (stderr: %s)", p.name, cmd, err, p.stderrText())
	}
	timeout := time.After(limit)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				return reply{}, fmt.Errorf("tenant %s: %s: the process exited (stderr: %s)", p.name, cmd, p.stderrText())
			}
			if body, ok := strings.CutPrefix(l, "ok "); ok {
				return reply{ok: true, body: body}, nil
			}
			if rest, ok := strings.CutPrefix(l, "err "); ok {
				code, msg, _ := strings.Cut(rest, " ")
				return reply{code: code, msg: msg}, nil
			}
			p.t.Logf("tenant %s: %s", p.name, l)
		case <-timeout:
			return reply{}, fmt.Errorf("tenant %s: no answer to %q within %v", p.name, cmd, limit)
		}
	}
}

// okWithin runs cmd, which must succeed within limit, and decodes its answer into v.
func (p *tenantProc) okWithin(cmd string, limit time.Duration, v any) {
	p.t.Helper()
	r, err := p.call(cmd, limit)
	if err != nil {
		p.t.Fatal(err)
	}
	if !r.ok {
		p.t.Fatalf("tenant %s (%s): %s: %s %s\n%s", p.name, p.tenant, cmd, r.code, r.msg, journal(service, 40))
	}
	if v != nil {
		if err := json.Unmarshal([]byte(r.body), v); err != nil {
			p.t.Fatalf("tenant %s: %s: answer %q: %v", p.name, cmd, r.body, err)
		}
	}
}

func (p *tenantProc) ok(cmd string, v any) { p.t.Helper(); p.okWithin(cmd, time.Minute, v) }

// refused runs cmd, which the daemon must refuse with one of codes; it returns the code.
func (p *tenantProc) refused(cmd string, want ...string) string {
	p.t.Helper()
	r, err := p.call(cmd, time.Minute)
	if err != nil {
		p.t.Fatal(err)
	}
	switch {
	case r.ok:
		p.t.Errorf("tenant %s (%s): %s succeeded (%s), want %s", p.name, p.tenant, cmd, r.body, strings.Join(want, " or "))
	case !slices.Contains(want, r.code):
		p.t.Errorf("tenant %s (%s): %s: %s %s, want %s", p.name, p.tenant, cmd, r.code, r.msg, strings.Join(want, " or "))
	}
	return r.code
}

// stop ends the process (its leases end with it) and waits for it.
func (p *tenantProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	fmt.Fprintln(p.in, "quit")
	p.in.Close()
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// leaseInfo is mmb-tenant's answer about a lease.
type leaseInfo struct {
	ID        string `json:"id"`
	State     string `json:"state"`
	EndReason string `json:"end_reason"`
	Gen       uint64 `json:"gen"`
	Inode     uint64 `json:"inode"`
	Size      uint64 `json:"size"`
	UID       uint32 `json:"uid"`
	Tenant    string `json:"tenant"`
	EndTime   string `json:"end_time"`
	RevokeDue string `json:"revoke_due"`
	FdDead    bool   `json:"fd_dead"`
	Reissues  int64  `json:"reissues"`
	HoldErr   string `json:"hold_err"`
}

// stealFd duplicates the current dma-buf fd of lease id from tenant p into this process
// (pidfd_getfd; the test runs as root): an unprivileged tenant cannot open /dev/iommu to
// map it itself. The copy is the same open file, so it is dead exactly when p's is.
func stealFd(t *testing.T, p *tenantProc, id string) *os.File {
	t.Helper()
	var r struct {
		FD  int `json:"fd"`
		PID int `json:"pid"`
	}
	p.ok("fd "+id, &r)
	pidfd, err := unix.PidfdOpen(r.PID, 0)
	if err != nil {
		t.Fatalf("pidfd_open %d: %v", r.PID, err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, r.FD, 0)
	if err != nil {
		t.Fatalf("pidfd_getfd of tenant %s's fd %d (lease %s): %v", p.name, r.FD, id, err)
	}
	f := os.NewFile(uintptr(fd), "lease-"+id)
	t.Cleanup(func() { f.Close() })
	return f
}

// --- the daemon's configuration and unit ---------------------------------------------------

// withLimits returns the daemon configuration conf with the [limits] keys in kv set to
// their TOML values (the section's old lines for those keys are dropped).
func withLimits(t *testing.T, conf string, kv map[string]string) string {
	t.Helper()
	var out []string
	in, found := false, false
	for _, l := range strings.Split(conf, "\n") {
		trim := strings.TrimSpace(l)
		if strings.HasPrefix(trim, "[") {
			in = trim == "[limits]"
			if in {
				found = true
				out = append(out, l)
				keys := make([]string, 0, len(kv))
				for k := range kv {
					keys = append(keys, k)
				}
				slices.Sort(keys)
				for _, k := range keys {
					out = append(out, k+" = "+kv[k])
				}
				continue
			}
		}
		if in {
			if k, _, ok := strings.Cut(trim, "="); ok {
				if _, set := kv[strings.TrimSpace(k)]; set {
					continue
				}
			}
		}
		out = append(out, l)
	}
	if !found {
		t.Fatalf("%s has no [limits] section:\n%s", daemonConfig, conf)
	}
	return strings.Join(out, "\n")
}

// restartDaemon restarts the service and waits for a new main process, active.
func restartDaemon(t *testing.T, what string) unitState {
	t.Helper()
	before := show(t, service)
	if out, err := run(time.Minute, "systemctl", "restart", service); err != nil {
		t.Fatalf("systemctl restart %s (%s): %v\n%s\n%s", service, what, err, out, journal(service, 40))
	}
	return waitUnit(t, "restarted "+what, 30*time.Second, func(s unitState) bool { return active(s) && s.MainPID != before.MainPID })
}

// keepConfig makes sure the daemon gets its configuration orig back when t ends: no fd
// drop-in, the file restored, the units reset and the daemon restarted.
func keepConfig(t *testing.T) []byte {
	t.Helper()
	orig := mustRead(t, daemonConfig)
	t.Cleanup(func() {
		if err := os.WriteFile(daemonConfig, orig, 0o644); err != nil {
			t.Errorf("restoring %s: %v", daemonConfig, err)
		}
		if err := os.Remove(nofileDropIn); err == nil {
			run(time.Minute, "systemctl", "daemon-reload")
		}
		run(time.Minute, "systemctl", "reset-failed", service, controlUnit, claimUnit)
		for _, u := range []string{controlUnit, claimUnit} {
			if out, _ := run(time.Minute, "systemctl", "is-active", u); strings.TrimSpace(out) != "active" {
				t.Logf("%s is %s after the test: starting it", u, strings.TrimSpace(out))
				run(time.Minute, "systemctl", "start", u)
			}
		}
		restartDaemon(t, "with the rig's configuration")
	})
	return orig
}

// cycleAll cycles the devices as an admin (CycleDevice: not bound by C): ended-but-live
// leases of earlier tests (the rig's R is an hour) die, and stop counting against limits.
func cycleAll(t *testing.T, c *client.Client, bdfs ...string) {
	t.Helper()
	for _, bdf := range bdfs {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		resp, err := c.API().CycleDevice(ctx, &brokerv1.CycleDeviceRequest{Bdf: bdf})
		cancel()
		if err != nil {
			t.Fatalf("CycleDevice %s: %v\n%s", bdf, err, journal(service, 40))
		}
		if resp.GetReissuedLeases()+resp.GetFdRevokedLeases() > 0 {
			t.Logf("CycleDevice %s: %d live leases reissued, %d ended-but-live made dead", bdf, resp.GetReissuedLeases(), resp.GetFdRevokedLeases())
		}
	}
}

// --- admin event stream --------------------------------------------------------------------

// watcher collects every event of the daemon (an admin's stream) from its start.
type watcher struct {
	mu     sync.Mutex
	events []*brokerv1.Event
	err    error
}

func watchAll(t *testing.T, c *client.Client) *watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := c.API().WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
	if err == nil {
		_, err = st.Header() // the daemon subscribed: every later event reaches us
	}
	if err != nil {
		cancel()
		t.Fatalf("WatchEvents: %v", err)
	}
	w := &watcher{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			resp, err := st.Recv()
			w.mu.Lock()
			if err != nil {
				if ctx.Err() == nil {
					w.err = err
				}
				w.mu.Unlock()
				return
			}
			w.events = append(w.events, resp.GetEvent())
			w.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

func (w *watcher) snapshot(t *testing.T) []*brokerv1.Event {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		t.Fatalf("the admin's event stream ended: %v", w.err)
	}
	return slices.Clone(w.events)
}

// wait polls for the first event matching cond, up to limit.
func (w *watcher) wait(t *testing.T, what string, limit time.Duration, cond func(*brokerv1.Event) bool) *brokerv1.Event {
	t.Helper()
	start := time.Now()
	for {
		for _, e := range w.snapshot(t) {
			if cond(e) {
				return e
			}
		}
		if time.Since(start) > limit {
			t.Fatalf("%s: no such event within %v\n%s", what, limit, journal(service, 60))
		}
		time.Sleep(pollInterval)
	}
}

func isType(e *brokerv1.Event, typ brokerv1.EventType, id string) bool {
	return e.GetType() == typ && e.GetLease().GetId() == id
}

func parseTime(t *testing.T, what, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("%s: %q: %v", what, s, err)
	}
	return v
}

// spread formats a set of durations as count, min, median and max.
func spread(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	r := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	return fmt.Sprintf("n=%d min=%v median=%v max=%v", len(s), r(s[0]), r(s[len(s)/2]), r(s[len(s)-1]))
}

// --- tenants -------------------------------------------------------------------------------

// TestTenantsByCgroup: with [tenants] by = "cgroup" (the default; the rig's configuration
// sets no [tenants]) two processes of uid 1000 in two VM units (transient scopes, direct
// children of /machine.slice) are two tenants, and a uid-1000 process outside
// machine.slice is a third ("uid=1000"). Each lease's holder.tenant names its tenant; no
// tenant can release, renew, get, list or share the ranges of another's lease; a second
// process of the same tenant can (get, list, renew), and the holder itself can renew and
// release its own.
func TestTenantsByCgroup(t *testing.T) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	testdev := env(t, "TESTDEV")
	if conf := string(mustRead(t, daemonConfig)); strings.Contains(conf, "[tenants]") {
		t.Fatalf("%s sets [tenants]: this test is about the default (by = \"cgroup\", units = [\"/machine.slice\"])", daemonConfig)
	}
	c := dial(t)
	t.Cleanup(func() { c.Close() })
	// Runs after the tenants have exited (their leases are ended-but-live for the rig's R
	// of an hour): kill their fds now.
	t.Cleanup(func() { cycleAll(t, c, testdev) })

	type vm struct {
		p     *tenantProc
		off   uint64
		lease string
	}
	vms := []*vm{
		{p: startTenant(t, "vm-a", tenantUID, true), off: 0},
		{p: startTenant(t, "vm-b", tenantUID, true), off: chunk64K},
		{p: startTenant(t, "uid-only", tenantUID, false), off: 2 * chunk64K},
	}
	second := startTenant(t, "uid-only-2", tenantUID, false) // another process of the third tenant
	allocCmd := func(off uint64) string { return fmt.Sprintf("alloc %s 2 %d %d", testdev, off, chunk64K) }

	for _, v := range vms {
		var li leaseInfo
		v.p.ok(allocCmd(v.off), &li)
		v.lease = li.ID
		if li.Tenant != v.p.tenant {
			t.Errorf("tenant %s: its own lease %s has holder.tenant %q, want %q", v.p.name, li.ID, li.Tenant, v.p.tenant)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		resp, err := c.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: li.ID})
		cancel()
		if err != nil {
			t.Fatalf("admin GetLease %s: %v", li.ID, err)
		}
		h := resp.GetLease().GetHolder()
		t.Logf("tenant %s: lease %s of %s bar 2 %#x+64K: holder uid=%d pid=%d tenant=%q", v.p.name, li.ID, testdev, v.off, h.GetUid(), h.GetPid(), h.GetTenant())
		if h.GetTenant() != v.p.tenant || h.GetUid() != tenantUID || int(h.GetPid()) != v.p.pid {
			t.Errorf("lease %s as the admin sees it: holder uid=%d pid=%d tenant=%q; want uid=%d pid=%d tenant=%q",
				li.ID, h.GetUid(), h.GetPid(), h.GetTenant(), tenantUID, v.p.pid, v.p.tenant)
		}
	}

	for _, x := range vms {
		for _, y := range vms {
			if x == y {
				continue
			}
			x.p.refused("release "+y.lease, "PermissionDenied")
			x.p.refused("renew "+y.lease+" 1h", "PermissionDenied")
			code := x.p.refused("get "+y.lease, "PermissionDenied", "NotFound")
			x.p.refused("list "+y.p.tenant, "PermissionDenied")
			var ls struct {
				IDs []string `json:"ids"`
			}
			x.p.ok("list", &ls)
			if slices.Contains(ls.IDs, y.lease) || !slices.Contains(ls.IDs, x.lease) {
				t.Errorf("tenant %s lists %v: want its own %s and not %s's %s", x.p.name, ls.IDs, x.lease, y.p.name, y.lease)
			}
			// shared ranges are shared within a tenant only
			x.p.refused(allocCmd(y.off), "FailedPrecondition")
			t.Logf("tenant %s on %s's lease: release, renew, list by tenant PERMISSION_DENIED; get %s; not listed; its range refused", x.p.name, y.p.name, code)
		}
	}

	// The third tenant's second process is the same tenant: it sees and renews the lease.
	third := vms[2]
	var li leaseInfo
	second.ok("get "+third.lease, &li)
	if li.Tenant != third.p.tenant {
		t.Errorf("the second uid-only process gets lease %s with tenant %q, want %q", third.lease, li.Tenant, third.p.tenant)
	}
	var ls struct {
		IDs []string `json:"ids"`
	}
	second.ok("list", &ls)
	if !slices.Contains(ls.IDs, third.lease) {
		t.Errorf("the second uid-only process lists %v, not its tenant's lease %s", ls.IDs, third.lease)
	}
	second.ok("renew "+third.lease+" 1h", nil)
	for _, v := range vms[:2] {
		if r, err := second.call("get "+v.lease, time.Minute); err != nil || r.ok {
			t.Errorf("the second uid-only process gets %s's lease %s: %+v %v", v.p.name, v.lease, r, err)
		}
	}

	// Each VM renews and releases its own lease.
	a := vms[0]
	a.p.ok("renew "+a.lease+" 1h", nil)
	a.p.ok("release "+a.lease, &li)
	if li.State != "LEASE_STATE_RELEASED" {
		t.Errorf("tenant %s released its lease %s: %s, want RELEASED", a.p.name, a.lease, li.State)
	}
	vms[1].p.refused("get "+a.lease, "PermissionDenied", "NotFound")

	all := leases(t, c)
	for _, v := range vms {
		if all[v.lease] == nil {
			t.Errorf("the admin does not list lease %s of tenant %s", v.lease, v.p.name)
		}
	}
}

// --- bounds R and C ------------------------------------------------------------------------

// attackReport is mmb-tenant's answer to attack.
type attackReport struct {
	Iterations     int      `json:"iterations"`
	Released       int      `json:"released"`
	TTLLeases      int      `json:"ttl_leases"`
	HolderExits    int      `json:"holder_exits"`
	PrivateGranted int      `json:"private_granted"`
	Unavailable    int      `json:"unavailable"`
	Exhausted      int      `json:"exhausted"`
	ExhaustedMsg   string   `json:"exhausted_msg"`
	Unexpected     []string `json:"unexpected"`
	Took           string   `json:"took"`
	Refusals       []struct {
		Step  string    `json:"step"`
		Sent  time.Time `json:"sent"`
		Reply time.Time `json:"reply"`
		Msg   string    `json:"msg"`
	} `json:"refusals"`
}

// cycleTook finds how long a device cycle took in the daemon's journal.
var cycleTook = regexp.MustCompile(`msg="device cycled" .* took=(\S+)`)

// cyclesAt finds the time an UNAVAILABLE refusal names for the device's next cycle.
var cyclesAt = regexp.MustCompile(`it cycles at (\S+), retry after`)

// TestBoundsRC restarts the daemon with R = revoke_within = 4s, C = tenant_cycle_interval
// = 2s and min_ttl = 1s, and checks the two bounds on the real kernel:
//
//   - ended but live: a tenant releases its claimed lease on a quiet device; the lease's
//     revoke_due is end + R; (iommufd) its fd keeps mapping into a fresh IOAS (polled)
//     until the kernel kills it, never beyond end + R and never after the FD_REVOKED
//     event, which comes at most R after the end (its time; no slack beyond R);
//   - hostile tenant: a victim (uid 1000, VM unit A) holds a claimed lease on ivshmem BAR2
//     (following its reissues) while an attacker of the same uid in VM unit B loops for
//     20 s over the device's other ranges: release after claim, ttl leases at min_ttl,
//     holder processes that exit, private allocations that need a cycle. The victim's
//     lease is reissued at most once per C (its REISSUED event times), every FD_REVOKED
//     comes at most R after its lease's end (event times; no slack beyond R), every
//     ended-but-live lease gets one, each UNAVAILABLE refusal names a cycle at most C
//     away, and the victim's hold survives with a working fd.
//
// Breaches of R are reported by the subtest R, breaches of C by the subtest C, anything
// else (unexpected errors, leases never revoked, a broken hold) by the test itself.
func TestBoundsRC(t *testing.T) {
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	const R, C, minTTL = 4 * time.Second, 2 * time.Second, time.Second
	iv, testdev := env(t, "IVSHMEM"), env(t, "TESTDEV")
	// Breaches of each bound, reported in the subtests R and C at the end.
	var beyondR, underC []string
	orig := keepConfig(t)
	conf := withLimits(t, string(orig), map[string]string{
		"revoke_within": `"4s"`, "tenant_cycle_interval": `"2s"`, "min_ttl": `"1s"`})
	if err := os.WriteFile(daemonConfig, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	restartDaemon(t, "with revoke_within = 4s, tenant_cycle_interval = 2s, min_ttl = 1s")
	c := dial(t)
	t.Cleanup(func() { c.Close() })
	cycleAll(t, c, rigDevices(t)...)
	t.Cleanup(func() { cycleAll(t, c, iv, testdev) }) // after the tenants have exited
	cursor := journalCursor(t)
	w := watchAll(t, c)
	victim := startTenant(t, "victim", tenantUID, true)
	attacker := startTenant(t, "attacker", tenantUID, true)

	// --- ended but live, on a quiet device
	var l, rel leaseInfo
	victim.ok(fmt.Sprintf("alloc %s 2 0 %d", testdev, chunk64K), &l)
	var dup *os.File
	if iommufdKernel() {
		dup = stealFd(t, victim, l.ID)
	}
	victim.ok("release "+l.ID, &rel)
	if rel.RevokeDue == "" || rel.FdDead {
		t.Fatalf("lease %s released after its claim: revoke_due %q fd_dead %v; want ended-but-live", l.ID, rel.RevokeDue, rel.FdDead)
	}
	end, due := parseTime(t, "end_time", rel.EndTime), parseTime(t, "revoke_due", rel.RevokeDue)
	if !due.Equal(end.Add(R)) {
		t.Errorf("lease %s: revoke_due %s, want end_time %s + R", l.ID, rel.RevokeDue, rel.EndTime)
	}
	// iommufd: the fd maps into a fresh IOAS again and again until it no longer does (the
	// kernel killed it). lastOK is when the last map that worked began: the fd was alive
	// then or later.
	var lastOK, firstFail time.Time
	var failErr error
	maps := 0
	if dup != nil {
		for limit := time.Now().Add(R + time.Minute); ; maps++ {
			at := time.Now()
			if failErr = mapsFresh(dup, l.Size); failErr != nil {
				firstFail = at
				break
			}
			lastOK = at
			if at.After(limit) {
				t.Fatalf("the fd of ended-but-live lease %s still maps into a fresh IOAS %v after its end (R = %v)", l.ID, at.Sub(end).Round(time.Millisecond), R)
			}
			time.Sleep(pollInterval)
		}
		if lastOK.IsZero() {
			t.Fatalf("the fd of ended-but-live lease %s (released %v ago, due in %v) does not map into a fresh IOAS: %v",
				l.ID, firstFail.Sub(end).Round(time.Millisecond), due.Sub(firstFail).Round(time.Millisecond), failErr)
		}
		t.Logf("ended-but-live lease %s: its fd mapped into a fresh IOAS %d times, the last beginning %v after the end; the first refusal began %v after the end: %v",
			l.ID, maps, lastOK.Sub(end).Round(time.Millisecond), firstFail.Sub(end).Round(time.Millisecond), failErr)
		if lastOK.After(due) {
			beyondR = append(beyondR, fmt.Sprintf("quiet device: the fd of lease %s still mapped into a fresh IOAS %v after its end, beyond R = %v",
				l.ID, lastOK.Sub(end).Round(time.Millisecond), R))
		}
	} else {
		t.Logf("kernel %s has no iommufd: the fd of the ended-but-live lease is not mapped", os.Getenv("MMIOBROKER_VM_KERNEL"))
	}
	fdr := w.wait(t, "FD_REVOKED of "+l.ID, R+time.Minute, func(e *brokerv1.Event) bool {
		return isType(e, brokerv1.EventType_EVENT_TYPE_FD_REVOKED, l.ID)
	})
	delay := fdr.GetTime().AsTime().Sub(end)
	t.Logf("quiet device: lease %s ended %s, FD_REVOKED at %s: %v after the end (R = %v), caused by %q",
		l.ID, rel.EndTime, fdr.GetTime().AsTime().Format(time.RFC3339Nano), delay.Round(time.Millisecond), R, fdr.GetCausedBy())
	if delay > R {
		beyondR = append(beyondR, fmt.Sprintf("quiet device: lease %s's FD_REVOKED came %v after its end, beyond R = %v", l.ID, delay, R))
	}
	if !fdr.GetLease().GetFdDead() || fdr.GetLease().GetRevokeDue() != nil {
		t.Errorf("FD_REVOKED lease: fd_dead %v revoke_due %v; want dead, no due", fdr.GetLease().GetFdDead(), fdr.GetLease().GetRevokeDue())
	}
	if dup != nil {
		if fdr.GetTime().AsTime().Before(lastOK) {
			t.Errorf("FD_REVOKED of %s is stamped %s, before a map that still worked (begun %s)", l.ID, fdr.GetTime().AsTime().Format(time.RFC3339Nano), lastOK.Format(time.RFC3339Nano))
		}
		if err := mapsFresh(dup, l.Size); err == nil {
			t.Errorf("lease %s: its fd still maps into a fresh IOAS after FD_REVOKED", l.ID)
		} else {
			t.Logf("after FD_REVOKED the fd no longer maps: %v", err)
		}
	}
	victim.ok("close "+l.ID, nil)

	// --- a hostile tenant next to a victim
	var v leaseInfo
	victim.ok(fmt.Sprintf("hold %s 2 0 %d", iv, chunk64K), &v)
	t.Logf("victim (%s) holds lease %s of %s bar 2 0+64K", victim.tenant, v.ID, iv)
	attackStart := time.Now()
	var rep attackReport
	attacker.okWithin(fmt.Sprintf("attack %s 2 20s %v", iv, minTTL), 5*time.Minute, &rep)
	t.Logf("attacker (%s): %d iterations in %s: %d released after claim, %d ttl leases, %d holder exits, %d private granted; refused %d UNAVAILABLE, %d RESOURCE_EXHAUSTED %s",
		attacker.tenant, rep.Iterations, rep.Took, rep.Released, rep.TTLLeases, rep.HolderExits, rep.PrivateGranted, rep.Unavailable, rep.Exhausted, rep.ExhaustedMsg)
	for _, u := range rep.Unexpected {
		t.Errorf("attacker: unexpected error: %s", u)
	}

	// Quiescence: the attacker ends (its ttl leases may still run out after the loop, and
	// its exit ends whatever it holds), then every lease its tenant ended after the claim
	// dies within R: wait until none of the attacker's leases is live and each ended one
	// has its FD_REVOKED (the event times are what is checked).
	attacker.stop()
	attackerLive := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		resp, err := c.API().ListLeases(ctx, &brokerv1.ListLeasesRequest{Tenant: attacker.tenant, LiveOnly: true})
		if err != nil {
			t.Fatalf("ListLeases of tenant %s: %v", attacker.tenant, err)
		}
		return len(resp.GetLeases())
	}
	ended := map[string]*brokerv1.Event{}
	revoked := map[string]*brokerv1.Event{}
	collect := func() (last time.Time) {
		clear(ended)
		clear(revoked)
		for _, e := range w.snapshot(t) {
			id := e.GetLease().GetId()
			switch {
			case e.GetType() == brokerv1.EventType_EVENT_TYPE_FD_REVOKED:
				revoked[id] = e
			case e.GetLease().GetRevokeDue() != nil && ended[id] == nil:
				ended[id] = e
				if d := e.GetLease().GetRevokeDue().AsTime(); d.After(last) {
					last = d
				}
			}
		}
		return last
	}
	for start := time.Now(); ; {
		last := collect()
		missing := 0
		for id := range ended {
			if revoked[id] == nil {
				missing++
			}
		}
		live := attackerLive()
		if missing == 0 && live == 0 {
			break
		}
		if time.Since(start) > time.Minute && time.Now().After(last.Add(30*time.Second)) {
			if live > 0 {
				t.Errorf("the attacker's tenant still has %d live leases %v after its process exited", live, time.Since(start).Round(time.Millisecond))
			}
			for id, e := range ended {
				if revoked[id] == nil {
					t.Errorf("lease %s ended (%v, due %s) but has no FD_REVOKED %v after its due", id, e.GetLease().GetEndReason(),
						e.GetLease().GetRevokeDue().AsTime().Format(time.RFC3339Nano), time.Since(e.GetLease().GetRevokeDue().AsTime()).Round(time.Millisecond))
				}
			}
			break
		}
		time.Sleep(4 * pollInterval)
	}

	var reissues []time.Time
	var delays []time.Duration
	causes := map[string]int{}
	for _, e := range w.snapshot(t) {
		lease := e.GetLease()
		switch e.GetType() {
		case brokerv1.EventType_EVENT_TYPE_REISSUED:
			if lease.GetId() == v.ID {
				reissues = append(reissues, e.GetTime().AsTime())
				causes[e.GetCausedBy()]++
			}
		case brokerv1.EventType_EVENT_TYPE_FD_REVOKED:
			d := e.GetTime().AsTime().Sub(lease.GetEndTime().AsTime())
			delays = append(delays, d)
			if d > R {
				beyondR = append(beyondR, fmt.Sprintf("lease %s (%v, ended %s) FD_REVOKED at %s: %v after its end, beyond R = %v (caused by %q)", lease.GetId(), lease.GetEndReason(),
					lease.GetEndTime().AsTime().Format(time.RFC3339Nano), e.GetTime().AsTime().Format(time.RFC3339Nano), d.Round(time.Millisecond), R, e.GetCausedBy()))
			}
		case brokerv1.EventType_EVENT_TYPE_DEVICE_LOST:
			t.Errorf("DEVICE_LOST: lease %s of %s", lease.GetId(), lease.GetBdf())
		case brokerv1.EventType_EVENT_TYPE_REVOKED:
			if lease.GetEndReason() == brokerv1.EndReason_END_REASON_REISSUE_FAILED {
				t.Errorf("reissue failed: lease %s of %s", lease.GetId(), lease.GetBdf())
			}
		}
		if due := lease.GetRevokeDue(); due != nil && e.GetType() != brokerv1.EventType_EVENT_TYPE_FD_REVOKED {
			if want := lease.GetEndTime().AsTime().Add(R); !due.AsTime().Equal(want) {
				beyondR = append(beyondR, fmt.Sprintf("lease %s (%v): revoke_due %s, want end_time + R = %s", lease.GetId(), e.GetType(), due.AsTime().Format(time.RFC3339Nano), want.Format(time.RFC3339Nano)))
			}
		}
	}
	var gaps []time.Duration
	var rel0 []string
	for i, at := range reissues {
		rel0 = append(rel0, "+"+at.Sub(attackStart).Round(time.Millisecond).String())
		if i == 0 {
			continue
		}
		gap := at.Sub(reissues[i-1])
		gaps = append(gaps, gap)
		if gap < C {
			underC = append(underC, fmt.Sprintf("the victim's lease was reissued %v after its previous reissue (at +%v), under C = %v",
				gap.Round(time.Millisecond), reissues[i-1].Sub(attackStart).Round(time.Millisecond), C))
		}
	}
	t.Logf("victim reissued %d times at %s (from the attack's start; caused by %v); gaps between reissues: %s (C = %v)",
		len(reissues), strings.Join(rel0, " "), causes, spread(gaps), C)
	t.Logf("FD_REVOKED after the lease's end: %s (R = %v); %d leases ended-but-live", spread(delays), R, len(ended))
	if len(reissues) < 3 || rep.Unavailable == 0 {
		t.Errorf("the attack made the victim reissue %d times and was refused UNAVAILABLE %d times: it did not exercise the bounds", len(reissues), rep.Unavailable)
	}
	var waits []time.Duration
	for _, r := range rep.Refusals {
		m := cyclesAt.FindStringSubmatch(r.Msg)
		if m == nil {
			t.Errorf("attacker's %s refused UNAVAILABLE without naming when the device cycles: %s", r.Step, r.Msg)
			continue
		}
		at := parseTime(t, "refusal", m[1])
		wait := at.Sub(r.Reply) // the daemon decided before its reply: at most C before at
		waits = append(waits, wait)
		if wait > C {
			underC = append(underC, fmt.Sprintf("attacker's %s refused at %s naming a cycle at %s: %v away, beyond C = %v", r.Step, r.Reply.Format(time.RFC3339Nano), m[1], wait, C))
		}
	}
	t.Logf("UNAVAILABLE refusals: the named cycle was %s after the reply (at most C)", spread(waits))

	var took []time.Duration
	for _, m := range cycleTook.FindAllStringSubmatch(journalAfter(t, cursor), -1) {
		if d, err := time.ParseDuration(m[1]); err == nil {
			took = append(took, d)
		}
	}
	t.Logf("the daemon's device cycles (its journal, \"device cycled ... took=\"): %s", spread(took))
	t.Run("R", func(t *testing.T) {
		for _, m := range beyondR {
			t.Error(m)
		}
	})
	t.Run("C", func(t *testing.T) {
		for _, m := range underC {
			t.Error(m)
		}
	})

	// The victim's hold claims each reissued generation by itself: wait for the last.
	var vi leaseInfo
	for start := time.Now(); ; time.Sleep(pollInterval) {
		victim.ok("info "+v.ID, &vi)
		if vi.Reissues >= int64(len(reissues)) || vi.HoldErr != "" || time.Since(start) > time.Minute {
			break
		}
	}
	t.Logf("victim's lease %s now: %s generation %d, %d reissues claimed by its hold, hold error %q", v.ID, vi.State, vi.Gen, vi.Reissues, vi.HoldErr)
	if vi.HoldErr != "" || vi.State != "LEASE_STATE_ACTIVE" || vi.Gen != uint64(1+len(reissues)) || vi.Reissues != int64(len(reissues)) {
		t.Errorf("victim's hold: %+v; want ACTIVE, holding generation %d after %d reissues, no error", vi, 1+len(reissues), len(reissues))
	}
	if iommufdKernel() {
		if err := mapsFresh(stealFd(t, victim, v.ID), vi.Size); err != nil {
			t.Errorf("the victim's current fd (generation %d) does not map into a fresh IOAS: %v", vi.Gen, err)
		}
	}
}

// --- fd budget -----------------------------------------------------------------------------

// connReport is mmb-tenant's answer to conns.
type connReport struct {
	Opened  int    `json:"opened"`
	Total   int    `json:"total"`
	Refused bool   `json:"refused"`
	Code    string `json:"code"`
	Msg     string `json:"msg"`
	Took    string `json:"took"`
}

// budgetLine finds the daemon's refusal to start for lack of fds (internal/daemon/fds.go).
var budgetLine = regexp.MustCompile(`can need (\d+) file descriptors \(([^)]*)\), but RLIMIT_NOFILE is (\d+)`)

// setNofile installs the drop-in with LimitNOFILE=n (no restarts on failure and no start
// rate limit, so that a refused start is one failed start) and reloads systemd.
func setNofile(t *testing.T, n int) {
	t.Helper()
	if err := os.MkdirAll(strings.TrimSuffix(nofileDropIn, "/50-mmb-nofile.conf"), 0o755); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf("[Unit]\nStartLimitIntervalSec=0\n\n[Service]\nLimitNOFILE=%d\nRestart=no\n", n)
	if err := os.WriteFile(nofileDropIn, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	must(t, "systemctl", "daemon-reload")
}

// journalCursor is the cursor of the service's last journal entry.
func journalCursor(t *testing.T) string {
	t.Helper()
	out := must(t, "journalctl", "-b", "-u", service, "-n", "1", "--no-pager", "--show-cursor", "-o", "cat")
	_, cur, ok := strings.Cut(out, "-- cursor: ")
	if !ok {
		t.Fatalf("journalctl --show-cursor: %q", out)
	}
	return strings.TrimSpace(cur)
}

// journalAfter is the service's journal after cursor.
func journalAfter(t *testing.T, cursor string) string {
	t.Helper()
	return must(t, "journalctl", "-b", "-u", service, "--no-pager", "-o", "cat", "--after-cursor="+cursor)
}

// refusedStart checks that the daemon does not start with LimitNOFILE=limit and that its
// journal names what its fd budget is made of; it returns the budget.
func refusedStart(t *testing.T, limit, devices, maxLeases int) int {
	t.Helper()
	cursor := journalCursor(t)
	setNofile(t, limit)
	out, err := run(time.Minute, "systemctl", "restart", service)
	if err == nil {
		t.Fatalf("the daemon started with LimitNOFILE=%d (%v)", limit, show(t, service))
	}
	st := waitUnit(t, fmt.Sprintf("start refused with LimitNOFILE=%d", limit), 30*time.Second,
		func(s unitState) bool { return s.Active == "failed" || s.Active == "inactive" })
	p := props(t, "Result", "ExecMainStatus")
	text := journalAfter(t, cursor)
	m := budgetLine.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("LimitNOFILE=%d: systemctl restart: %v %s; %v Result=%s ExecMainStatus=%s; no fd budget line in the journal:\n%s",
			limit, err, strings.TrimSpace(out), st, p["Result"], p["ExecMainStatus"], text)
	}
	need, _ := strconv.Atoi(m[1])
	got, _ := strconv.Atoi(m[3])
	t.Logf("LimitNOFILE=%d: start refused (%s, Result=%s, ExecMainStatus=%s): %q", limit, st.Active, p["Result"], p["ExecMainStatus"], m[0])
	if p["ExecMainStatus"] != "1" {
		t.Errorf("the refused start exited with status %s, want 1", p["ExecMainStatus"])
	}
	if got != limit {
		t.Errorf("the daemon reports RLIMIT_NOFILE %d, the unit set %d", got, limit)
	}
	sum := 0
	for _, n := range regexp.MustCompile(`(\d+) (?:for|reserved)`).FindAllStringSubmatch(m[2], -1) {
		v, _ := strconv.Atoi(n[1])
		sum += v
	}
	if sum != need {
		t.Errorf("the parts of the fd budget (%s) add up to %d, not %d", m[2], sum, need)
	}
	for _, part := range []string{
		fmt.Sprintf("for %d control connections", fdBudgetConns+peercred.RootConnsReserve), "for claims",
		fmt.Sprintf("for %d leases", maxLeases), fmt.Sprintf("for %d devices", devices), "reserved",
	} {
		if !strings.Contains(m[2], part) {
			t.Errorf("the fd budget's parts (%s) do not name %q", m[2], part)
		}
	}
	return need
}

// fdBudgetConns is TestFdBudget's [limits] max_connections: two tenants' worth of
// connections and part of a third, so that the flood reaches the total (with a tenant
// refused short of its own limit) after ~300 connections instead of the default 1024's
// (about 2.5 minutes under TCG).
const fdBudgetConns = 300

// countFds counts the open fds of process pid.
func countFds(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("the daemon's fds: %v", err)
	}
	return len(ents)
}

// TestFdBudget runs the daemon at its fd budget. With [limits] max_leases = 16 it refuses
// to start under LimitNOFILE=64 and LimitNOFILE=budget-1, naming the parts of its budget
// in the journal, and starts with LimitNOFILE=budget. There, with 16 claimed leases (3 on
// edu1), connections of one tenant after another flood the control socket until the
// daemon refuses them (per tenant at 128, then all at max_connections = 300); uid 0 still opens its reserve
// of connections beyond that, and no more. With every connection the budget counts open,
// an admin's RevokeLease of the claimed edu1 lease still cycles the device and reissues
// the other two (no EMFILE, no DEVICE_LOST), whose new generations claim (and map,
// iommufd) while the revoked fds do not.
func TestFdBudget(t *testing.T) {
	if iommufdKernel() {
		// The budget and the connection limits are the same code on both kernels; the
		// flood of fdBudgetConns connections takes most of a minute under TCG, which CI's
		// time allows once, and the two kernels' systemd suites run side by side: it runs on
		// the stock kernel, whose suite is the shorter one (the iommufd suite has the
		// soak), so the reissued generations are claimed but not mapped.
		t.Skip("runs on the stock kernel only (CI time); the fd budget does not depend on the kernel")
	}
	requireDaemon(t)
	dumpJournalOnFailure(t)
	daemonRunning(t)
	const maxLeases = 16
	edu1, iv, testdev := env(t, "EDU1"), env(t, "IVSHMEM"), env(t, "TESTDEV")
	devices := rigDevices(t)
	orig := keepConfig(t)
	conf := withLimits(t, string(orig), map[string]string{
		"max_leases": strconv.Itoa(maxLeases), "max_leases_per_holder": strconv.Itoa(maxLeases),
		"max_connections": strconv.Itoa(fdBudgetConns)})
	if err := os.WriteFile(daemonConfig, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}

	need := refusedStart(t, 64, len(devices), maxLeases)
	if again := refusedStart(t, need-1, len(devices), maxLeases); again != need {
		t.Errorf("the budget is %d with LimitNOFILE=64 but %d with LimitNOFILE=%d", need, again, need-1)
	}
	setNofile(t, need)
	run(time.Minute, "systemctl", "reset-failed", service)
	st := restartDaemon(t, fmt.Sprintf("with LimitNOFILE=%d (its budget)", need))
	limits := string(mustRead(t, fmt.Sprintf("/proc/%d/limits", st.MainPID)))
	if want := regexp.MustCompile(fmt.Sprintf(`Max open files\s+%d\s+%d\s`, need, need)); !want.MatchString(limits) {
		t.Errorf("the daemon's limits do not show %d open files:\n%s", need, limits)
	}
	for _, u := range []string{controlUnit, claimUnit} {
		if out, _ := run(time.Minute, "systemctl", "is-active", u); strings.TrimSpace(out) != "active" {
			t.Errorf("%s is %s after the refused starts", u, strings.TrimSpace(out))
		}
	}
	cursor := journalCursor(t)

	// The admin's connection, opened before the flood (it counts against the total).
	c := dial(t)
	t.Cleanup(func() { c.Close() })
	cycleAll(t, c, devices...)
	w := watchAll(t, c)
	type lease struct {
		*client.Lease
		bdf string
	}
	var all []lease
	t.Cleanup(func() {
		for _, l := range all {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			c.Release(ctx, l.ID)
			cancel()
			l.File.Close()
		}
	})
	for i := range maxLeases {
		bdf, bar, off := edu1, 0, uint64(i)*chunk64K
		switch {
		case i >= 10:
			bdf, bar, off = testdev, 2, uint64(i-10)*chunk64K
		case i >= 3:
			bdf, bar, off = iv, 2, uint64(i-3)*chunk64K
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		l, err := c.Allocate(ctx, client.AllocateOptions{BDF: bdf, BAR: bar, VMName: fmt.Sprintf("fd-budget-%d", i),
			Ranges: []*brokerv1.Range{{Offset: off, Length: chunk64K}}})
		cancel()
		if err != nil {
			t.Fatalf("lease %d of %d (%s bar %d %#x): %v\n%s", i+1, maxLeases, bdf, bar, off, err, journal(service, 40))
		}
		all = append(all, lease{Lease: l, bdf: bdf})
	}
	victim, survivors := all[0], all[1:3]
	pid := show(t, service).MainPID
	idle := countFds(t, pid)
	t.Logf("%d claimed leases (%s: victim %s, survivors %s %s); the daemon (pid %d) has %d fds open of %d",
		maxLeases, edu1, victim.ID, survivors[0].ID, survivors[1].ID, pid, idle, need)

	// The flood: tenant after tenant (uids 2001, 2002, …) opens connections until refused.
	flooded := 0
	var counts []string
	totalReached := false
	for k := 0; k < fdBudgetConns/peercred.MaxConnsPerTenant+3; k++ {
		f := startTenant(t, fmt.Sprintf("flood-%d", k+1), 2001+k, false)
		var r connReport
		f.okWithin(fmt.Sprintf("conns %d", peercred.MaxConnsPerTenant+16), 10*time.Minute, &r)
		flooded += r.Opened
		counts = append(counts, strconv.Itoa(r.Opened))
		t.Logf("tenant %s: %d connections in %s, then refused=%v (%s %s); %d flood connections in all; daemon fds %d",
			f.tenant, r.Opened, r.Took, r.Refused, r.Code, r.Msg, flooded, countFds(t, pid))
		switch {
		case !r.Refused:
			t.Fatalf("tenant %s opened %d connections without a refusal (limit %d per tenant)", f.tenant, r.Opened, peercred.MaxConnsPerTenant)
		case r.Opened > peercred.MaxConnsPerTenant:
			t.Errorf("tenant %s opened %d connections, beyond the %d per tenant", f.tenant, r.Opened, peercred.MaxConnsPerTenant)
		case !totalReached && r.Opened < peercred.MaxConnsPerTenant:
			totalReached = true
			// the admin's connection is the only other one
			if flooded+1 != fdBudgetConns {
				t.Errorf("refused at %d connections in all (%d flood + the admin's), want %d", flooded+1, flooded, fdBudgetConns)
			}
		case totalReached && r.Opened != 0:
			t.Errorf("tenant %s opened %d connections after the daemon reached its %d in all", f.tenant, r.Opened, fdBudgetConns)
		}
		if totalReached && r.Opened == 0 {
			break
		}
	}
	if !totalReached {
		t.Fatalf("the flood (%d connections) never reached the daemon's limit of %d", flooded, fdBudgetConns)
	}
	peak := countFds(t, pid)
	t.Logf("flood: connections per tenant %s = %d (+1 admin); the daemon has %d fds open (%d before the flood, %+.2f per connection) of its budget %d",
		strings.Join(counts, "+"), flooded, peak, idle, float64(peak-idle)/float64(flooded), need)
	// uid 0 keeps a reserve of connections beyond the limit (peercred.RootConnsReserve):
	// an administrator reaches the flooded daemon, until the reserve too is used up. Then
	// every connection the fd budget counts is open.
	var admins []*client.Client
	t.Cleanup(func() {
		for _, a := range admins {
			a.Close()
		}
	})
	var adminErr error
	for range peercred.RootConnsReserve + 8 {
		nc, err := client.Dial(controlSock)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err = nc.API().ListDevices(ctx, &brokerv1.ListDevicesRequest{})
			cancel()
			if err != nil {
				nc.Close()
			}
		}
		if err != nil {
			adminErr = err
			break
		}
		admins = append(admins, nc)
	}
	full := countFds(t, pid)
	t.Logf("new admin connections during the flood: %d, then %v; %d connections open in all; the daemon has %d fds open of its budget %d",
		len(admins), adminErr, flooded+1+len(admins), full, need)
	if len(admins) != peercred.RootConnsReserve || adminErr == nil {
		t.Errorf("uid 0 opened %d new connections during the flood (then %v), want its reserve of %d and then a refusal", len(admins), adminErr, peercred.RootConnsReserve)
	}

	// An admin revokes the claimed edu1 lease: on a connection opened during the flood
	// if it got one, else on the one opened before.
	rc := c
	if len(admins) > 0 {
		rc = admins[0]
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	resp, err := rc.API().RevokeLease(ctx, &brokerv1.RevokeLeaseRequest{LeaseId: victim.ID})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("RevokeLease %s during the flood: %v (%v)\n%s", victim.ID, err, status.Code(err), journal(service, 60))
	}
	t.Logf("RevokeLease %s during the flood: %v, %d leases reissued, in %v; the daemon has %d fds open",
		victim.ID, resp.GetLease().GetState(), resp.GetReissuedLeases(), took.Round(time.Millisecond), countFds(t, pid))
	if resp.GetLease().GetState() != brokerv1.LeaseState_LEASE_STATE_REVOKED || resp.GetReissuedLeases() != uint32(len(survivors)) {
		t.Errorf("RevokeLease: %v with %d reissued, want REVOKED with %d", resp.GetLease().GetState(), resp.GetReissuedLeases(), len(survivors))
	}
	w.wait(t, "REVOKED of the victim", time.Minute, func(e *brokerv1.Event) bool {
		return isType(e, brokerv1.EventType_EVENT_TYPE_REVOKED, victim.ID)
	})
	for _, s := range survivors {
		e := w.wait(t, "REISSUED of "+s.ID, time.Minute, func(e *brokerv1.Event) bool {
			return isType(e, brokerv1.EventType_EVENT_TYPE_REISSUED, s.ID)
		})
		if e.GetClaimToken() == "" {
			t.Fatalf("REISSUED of %s reached its holder without a claim token", s.ID)
		}
		f, info, err := c.Claim(ctx, s.ID, e.GetClaimToken())
		if err != nil {
			t.Fatalf("claim of %s's generation %d during the flood: %v", s.ID, e.GetLease().GetGeneration(), err)
		}
		defer f.Close()
		if info.Generation != 2 || info.Inode != e.GetLease().GetInode() {
			t.Errorf("reissued %s: claimed generation %d inode %d, event says generation 2 inode %d", s.ID, info.Generation, info.Inode, e.GetLease().GetInode())
		}
		if iommufdKernel() {
			if err := mapsFresh(f, info.Size); err != nil {
				t.Errorf("reissued %s generation 2 does not map into a fresh IOAS: %v", s.ID, err)
			}
			if err := mapsFresh(s.File, info.Size); err == nil {
				t.Errorf("%s's generation 1 fd still maps after the revoke", s.ID)
			}
		}
	}
	if iommufdKernel() {
		if err := mapsFresh(victim.File, chunk64K); err == nil {
			t.Errorf("the revoked lease %s's fd still maps into a fresh IOAS", victim.ID)
		} else {
			t.Logf("the revoked fd: %v", err)
		}
	}
	for _, e := range w.snapshot(t) {
		if e.GetType() == brokerv1.EventType_EVENT_TYPE_DEVICE_LOST || e.GetLease().GetEndReason() == brokerv1.EndReason_END_REASON_REISSUE_FAILED {
			t.Errorf("%v: lease %s of %s (%v)", e.GetType(), e.GetLease().GetId(), e.GetLease().GetBdf(), e.GetLease().GetEndReason())
		}
	}
	dresp, err := c.API().GetDevice(ctx, &brokerv1.GetDeviceRequest{Bdf: edu1})
	if err != nil || !dresp.GetDevice().GetUsable() {
		t.Errorf("%s after the revoke: %v %v", edu1, dresp.GetDevice(), err)
	}
	text := strings.ToLower(journalAfter(t, cursor))
	for _, bad := range []string{"too many open files", "emfile"} {
		if strings.Contains(text, bad) {
			t.Errorf("the daemon's journal says %q:\n%s", bad, journal(service, 80))
		}
	}
	t.Logf("the daemon has %d fds open after the revoke and the reissued claims (budget %d); status %v", countFds(t, pid), need, show(t, service))
}
