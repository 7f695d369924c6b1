// Command mmb-tenant is a tenant of mmiobrokerd for the systemd guest tests of tenants,
// revocation bounds and fd exhaustion (test/vm/systemd/bounds_vmsd_test.go). The test
// starts it as root, often inside a transient scope under machine.slice (`systemd-run
// --scope --slice=machine.slice --unit=NAME -- mmb-tenant -uid 1000 -gid G`), and it drops
// to -uid/-gid (no supplementary groups) before it connects, so that the daemon sees a
// VMM-like caller: an unprivileged uid in a VM's cgroup unit. It is driven on stdin, one
// command a line; every answer is one line on stdout, "ok JSON" or "err CODE message"
// (CODE is the gRPC code name, e.g. PermissionDenied):
//
//	whoami                       {uid, pid, cgroup}: the cgroup from /proc/self/cgroup
//	alloc BDF BAR OFF LEN [ttl=D] [private]
//	                             allocate a lease and claim its fd (kept open)
//	hold BDF BAR OFF LEN         allocate, claim and hold (client.AllocateAndHold: follows
//	                             reissues, claiming each new generation)
//	info ID                      a held lease: generation, inode, reissues seen, hold error
//	fd ID                        the fd number of the lease's current dma-buf, for the
//	                             test's pidfd_getfd (an unprivileged tenant cannot open
//	                             /dev/iommu itself)
//	release ID | get ID          ReleaseLease | GetLease: the lease
//	renew ID DUR                 RenewLease
//	list [TENANT]                ListLeases (of TENANT only, if given): the lease ids
//	close ID                     close the lease's fd (a held lease: stop holding)
//	pass ID                      pass the lease's fd on to a child process (this program
//	                             again, as `mmb-tenant child`, with the fd as its fd 3,
//	                             until this one exits): {pid, fd} of the child
//	attack BDF BAR DUR TTL       the hostile loop below, for DUR; its report
//	conns N                      open up to N more control connections (one ListDevices
//	                             each), stopping at the first the daemon refuses
//	drop                         close those connections
//	quit                         exit 0 (leases still held end with their holder)
//
// The attack works on 64 KiB chunks 1-12 of the BAR (chunk 0 is left to a victim) and
// repeats, as fast as the daemon answers: (0) allocate + claim + release a shared lease
// on chunk 1-4, (1) allocate + claim a shared lease with ttl TTL on chunk 5-8 and let it
// expire, (2) run `mmb-tenant exit-holder` on chunk 9-12 (a holder process that allocates,
// claims and exits), (3) allocate a private lease over the chunk just released in (0),
// which needs a device cycle; if granted, release it and ask again at once (the device
// just cycled, so this one is within C). UNAVAILABLE and
// RESOURCE_EXHAUSTED refusals are counted (UNAVAILABLE ones with the times the request
// was sent and answered); any other error is reported as unexpected.
//
// `mmb-tenant exit-holder BDF BAR OFF LEN` allocates and claims a lease, prints "ok ID" and
// exits without releasing it.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// socket is the daemon's control socket (-socket).
var socket string

const (
	chunk      = 64 << 10
	rpcTimeout = 30 * time.Second
)

func main() {
	uid := flag.Int("uid", -1, "drop to this uid before connecting (when started as root)")
	gid := flag.Int("gid", -1, "drop to this gid (with -uid)")
	flag.StringVar(&socket, "socket", client.DefaultSocket, "the daemon's control socket")
	flag.Parse()
	if flag.Arg(0) == "child" {
		// Holds fd 3 (inherited) until its parent is gone: stdin is a pipe from it.
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	if flag.Arg(0) == "exit-holder" {
		os.Exit(exitHolder(flag.Args()[1:]))
	}
	if *uid >= 0 && os.Getuid() == 0 {
		if err := drop(*uid, *gid); err != nil {
			fmt.Fprintln(os.Stderr, "mmb-tenant:", err)
			os.Exit(1)
		}
	}
	c, err := client.Dial(socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mmb-tenant:", err)
		os.Exit(1)
	}
	t := &tenant{c: c, files: map[string]*os.File{}, held: map[string]*held{}}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		if f[0] == "quit" {
			break
		}
		v, err := t.do(f)
		if err != nil {
			st := status.Convert(err)
			fmt.Printf("err %s %s\n", st.Code(), strings.ReplaceAll(st.Message(), "\n", " "))
			continue
		}
		b, err := json.Marshal(v)
		if err != nil {
			fmt.Printf("err Internal %v\n", err)
			continue
		}
		fmt.Printf("ok %s\n", b)
	}
}

// drop makes the process uid:gid with no supplementary groups (all threads).
func drop(uid, gid int) error {
	if gid < 0 {
		gid = uid
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("setuid %d: %w", uid, err)
	}
	return nil
}

type held struct {
	h        *client.HeldLease
	reissues atomic.Int64
}

type tenant struct {
	c     *client.Client
	files map[string]*os.File // claimed fds of alloc'd leases, by lease id
	held  map[string]*held
	extra []*client.Client // conns
	// children hold passed-on fds (pass); they exit with this process.
	children []*exec.Cmd
	childIn  []io.WriteCloser
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), rpcTimeout)
}

func parseRange(args []string) (bdf string, bar int, off, length uint64, err error) {
	if len(args) < 4 {
		return "", 0, 0, 0, fmt.Errorf("want BDF BAR OFF LEN, got %q", args)
	}
	bdf = args[0]
	if bar, err = strconv.Atoi(args[1]); err != nil {
		return
	}
	if off, err = strconv.ParseUint(args[2], 0, 64); err != nil {
		return
	}
	length, err = strconv.ParseUint(args[3], 0, 64)
	return
}

func ts(t *timestamppb.Timestamp) string {
	if t == nil {
		return ""
	}
	return t.AsTime().Format(time.RFC3339Nano)
}

// leaseInfo is the answer about one lease.
type leaseInfo struct {
	ID        string `json:"id"`
	State     string `json:"state"`
	EndReason string `json:"end_reason,omitempty"`
	Gen       uint64 `json:"gen"`
	Inode     uint64 `json:"inode"`
	Size      uint64 `json:"size"`
	UID       uint32 `json:"uid"`
	Tenant    string `json:"tenant"`
	EndTime   string `json:"end_time,omitempty"`
	RevokeDue string `json:"revoke_due,omitempty"`
	FdDead    bool   `json:"fd_dead"`
	// for a held lease (info)
	Reissues int64  `json:"reissues,omitempty"`
	HoldErr  string `json:"hold_err,omitempty"`
}

func infoOf(l *brokerv1.Lease) leaseInfo {
	return leaseInfo{ID: l.GetId(), State: l.GetState().String(), EndReason: l.GetEndReason().String(),
		Gen: l.GetGeneration(), Inode: l.GetInode(), Size: l.GetSize(), UID: l.GetHolder().GetUid(),
		Tenant: l.GetHolder().GetTenant(), EndTime: ts(l.GetEndTime()), RevokeDue: ts(l.GetRevokeDue()),
		FdDead: l.GetFdDead()}
}

func (t *tenant) do(f []string) (any, error) {
	switch {
	case f[0] == "whoami":
		cg, err := os.ReadFile("/proc/self/cgroup")
		if err != nil {
			return nil, err
		}
		path := ""
		for _, l := range strings.Split(string(cg), "\n") {
			if p, ok := strings.CutPrefix(l, "0::"); ok {
				path = p
			}
		}
		return map[string]any{"uid": os.Getuid(), "gid": os.Getgid(), "pid": os.Getpid(), "cgroup": path}, nil
	case f[0] == "alloc":
		bdf, bar, off, length, err := parseRange(f[1:])
		if err != nil {
			return nil, err
		}
		req := &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: uint32(bar), Ranges: []*brokerv1.Range{{Offset: off, Length: length}}, VmName: "mmb-tenant"}
		for _, o := range f[5:] {
			switch {
			case o == "private":
				req.Kind = brokerv1.LeaseKind_LEASE_KIND_PRIVATE
			case strings.HasPrefix(o, "ttl="):
				d, err := time.ParseDuration(strings.TrimPrefix(o, "ttl="))
				if err != nil {
					return nil, err
				}
				req.Ttl = durationpb.New(d)
			default:
				return nil, fmt.Errorf("alloc option %q", o)
			}
		}
		l, file, err := t.allocClaim(req)
		if err != nil {
			return nil, err
		}
		t.files[l.GetId()] = file
		return infoOf(l), nil
	case f[0] == "hold":
		bdf, bar, off, length, err := parseRange(f[1:])
		if err != nil {
			return nil, err
		}
		x, cancel := ctx()
		defer cancel()
		h := &held{}
		hl, err := t.c.AllocateAndHold(x, client.AllocateOptions{BDF: bdf, BAR: bar, VMName: "mmb-tenant-hold",
			Ranges: []*brokerv1.Range{{Offset: off, Length: length}}},
			client.HoldOptions{OnReissue: func(*os.File, client.ClaimInfo) { h.reissues.Add(1) }})
		if err != nil {
			return nil, err
		}
		h.h = hl
		t.held[hl.ID] = h
		return infoOf(hl.Lease()), nil
	case f[0] == "info" && len(f) == 2:
		h, ok := t.held[f[1]]
		if !ok {
			return nil, fmt.Errorf("lease %s is not held", f[1])
		}
		cl := h.h.Claim()
		li := infoOf(h.h.Lease())
		li.Gen, li.Inode, li.Reissues = cl.Generation, cl.Inode, h.reissues.Load()
		if err := h.h.Err(); err != nil {
			li.HoldErr = err.Error()
		}
		return li, nil
	case f[0] == "fd" && len(f) == 2:
		if h, ok := t.held[f[1]]; ok {
			return map[string]any{"fd": h.h.File().Fd(), "pid": os.Getpid()}, nil
		}
		if file, ok := t.files[f[1]]; ok {
			return map[string]any{"fd": file.Fd(), "pid": os.Getpid()}, nil
		}
		return nil, fmt.Errorf("no fd of lease %s", f[1])
	case f[0] == "pass" && len(f) == 2:
		file, ok := t.files[f[1]]
		if h, held := t.held[f[1]]; held {
			file, ok = h.h.File(), true
		}
		if !ok {
			return nil, fmt.Errorf("no fd of lease %s", f[1])
		}
		child := exec.Command("/proc/self/exe", "child")
		child.ExtraFiles = []*os.File{file}
		child.Stderr = os.Stderr
		// The pipe's write end stays referenced (an unreferenced *os.File is closed by its
		// finalizer), and is closed when this process exits.
		w, err := child.StdinPipe()
		if err != nil {
			return nil, err
		}
		t.childIn = append(t.childIn, w)
		if err := child.Start(); err != nil {
			return nil, err
		}
		t.children = append(t.children, child)
		return map[string]any{"pid": child.Process.Pid, "fd": 3}, nil
	case f[0] == "close" && len(f) == 2:
		if h, ok := t.held[f[1]]; ok {
			delete(t.held, f[1])
			return map[string]any{}, h.h.Close()
		}
		if file, ok := t.files[f[1]]; ok {
			delete(t.files, f[1])
			return map[string]any{}, file.Close()
		}
		return nil, fmt.Errorf("no fd of lease %s", f[1])
	case f[0] == "release" && len(f) == 2:
		x, cancel := ctx()
		defer cancel()
		l, err := t.c.Release(x, f[1])
		if err != nil {
			return nil, err
		}
		return infoOf(l), nil
	case f[0] == "get" && len(f) == 2:
		x, cancel := ctx()
		defer cancel()
		resp, err := t.c.API().GetLease(x, &brokerv1.GetLeaseRequest{LeaseId: f[1]})
		if err != nil {
			return nil, err
		}
		return infoOf(resp.GetLease()), nil
	case f[0] == "renew" && len(f) == 3:
		d, err := time.ParseDuration(f[2])
		if err != nil {
			return nil, err
		}
		x, cancel := ctx()
		defer cancel()
		l, err := t.c.Renew(x, f[1], d)
		if err != nil {
			return nil, err
		}
		return infoOf(l), nil
	case f[0] == "list" && len(f) <= 2:
		req := &brokerv1.ListLeasesRequest{}
		if len(f) == 2 {
			req.Tenant = f[1]
		}
		x, cancel := ctx()
		defer cancel()
		resp, err := t.c.API().ListLeases(x, req)
		if err != nil {
			return nil, err
		}
		ids := []string{}
		for _, l := range resp.GetLeases() {
			ids = append(ids, l.GetId())
		}
		return map[string]any{"ids": ids}, nil
	case f[0] == "attack" && len(f) == 5:
		bar, err := strconv.Atoi(f[2])
		if err != nil {
			return nil, err
		}
		dur, err := time.ParseDuration(f[3])
		if err != nil {
			return nil, err
		}
		ttl, err := time.ParseDuration(f[4])
		if err != nil {
			return nil, err
		}
		return t.attack(f[1], uint32(bar), dur, ttl), nil
	case f[0] == "conns" && len(f) == 2:
		n, err := strconv.Atoi(f[1])
		if err != nil {
			return nil, err
		}
		return t.conns(n), nil
	case f[0] == "drop":
		for _, c := range t.extra {
			c.Close()
		}
		n := len(t.extra)
		t.extra = nil
		return map[string]any{"closed": n}, nil
	}
	return nil, fmt.Errorf("unknown command %q", strings.Join(f, " "))
}

// allocClaim allocates req and claims its fd; on a claim failure the lease is released.
func (t *tenant) allocClaim(req *brokerv1.AllocateLeaseRequest) (*brokerv1.Lease, *os.File, error) {
	x, cancel := ctx()
	defer cancel()
	resp, err := t.c.API().AllocateLease(x, req)
	if err != nil {
		return nil, nil, err
	}
	file, _, err := t.c.Claim(x, resp.GetLease().GetId(), resp.GetClaimToken())
	if err != nil {
		t.c.Release(x, resp.GetLease().GetId())
		return nil, nil, fmt.Errorf("claim of lease %s: %w", resp.GetLease().GetId(), err)
	}
	return resp.GetLease(), file, nil
}

// connReport is the answer of conns.
type connReport struct {
	Opened  int    `json:"opened"`
	Total   int    `json:"total"`
	Refused bool   `json:"refused"`
	Code    string `json:"code,omitempty"`
	Msg     string `json:"msg,omitempty"`
	Took    string `json:"took"`
}

// conns opens up to n more connections to the control socket, each with one ListDevices
// (the daemon accepted it: handshake, tenant, connection limits), until one is refused.
func (t *tenant) conns(n int) connReport {
	start := time.Now()
	r := connReport{}
	for range n {
		c, err := client.Dial(socket)
		if err == nil {
			x, cancel := ctx()
			_, err = c.API().ListDevices(x, &brokerv1.ListDevicesRequest{})
			cancel()
			if err != nil {
				c.Close()
			}
		}
		if err != nil {
			st := status.Convert(err)
			r.Refused, r.Code, r.Msg = true, st.Code().String(), st.Message()
			break
		}
		t.extra = append(t.extra, c)
		r.Opened++
	}
	r.Total, r.Took = len(t.extra), time.Since(start).Round(time.Millisecond).String()
	return r
}

// refusal is an allocation the daemon refused with UNAVAILABLE.
type refusal struct {
	Step  string    `json:"step"`
	Sent  time.Time `json:"sent"`
	Reply time.Time `json:"reply"`
	Msg   string    `json:"msg"`
}

// attackReport is the answer of attack.
type attackReport struct {
	Iterations     int       `json:"iterations"`
	Released       int       `json:"released"`
	TTLLeases      int       `json:"ttl_leases"`
	HolderExits    int       `json:"holder_exits"`
	PrivateGranted int       `json:"private_granted"`
	Unavailable    int       `json:"unavailable"`
	Exhausted      int       `json:"exhausted"`
	ExhaustedMsg   string    `json:"exhausted_msg,omitempty"`
	Refusals       []refusal `json:"refusals"`
	Unexpected     []string  `json:"unexpected"`
	Took           string    `json:"took"`
}

// refused files an allocation error of step: true if it was a refusal a tenant must
// expect under the bounds (UNAVAILABLE, RESOURCE_EXHAUSTED).
func (r *attackReport) refused(step string, sent time.Time, err error) {
	reply := time.Now()
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable:
		r.Unavailable++
		r.Refusals = append(r.Refusals, refusal{Step: step, Sent: sent, Reply: reply, Msg: st.Message()})
	case codes.ResourceExhausted:
		r.Exhausted++
		r.ExhaustedMsg = st.Message()
	default:
		r.Unexpected = append(r.Unexpected, fmt.Sprintf("%s: %v", step, err))
	}
}

func (t *tenant) attack(bdf string, bar uint32, dur, ttl time.Duration) attackReport {
	r := attackReport{Refusals: []refusal{}, Unexpected: []string{}}
	self, err := os.Executable()
	if err != nil {
		r.Unexpected = append(r.Unexpected, err.Error())
		return r
	}
	start := time.Now()
	released := uint64(chunk) // the chunk (0) released last: (3) asks for it privately
	alloc := func(step string, off uint64, kind brokerv1.LeaseKind, ttl time.Duration) (*brokerv1.Lease, *os.File, bool) {
		req := &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: bar, Kind: kind, VmName: "attacker",
			Ranges: []*brokerv1.Range{{Offset: off, Length: chunk}}}
		if ttl > 0 {
			req.Ttl = durationpb.New(ttl)
		}
		sent := time.Now()
		l, file, err := t.allocClaim(req)
		if err != nil {
			if strings.Contains(err.Error(), "claim of lease") {
				r.Unexpected = append(r.Unexpected, fmt.Sprintf("%s: %v", step, err))
			} else {
				r.refused(step, sent, err)
				time.Sleep(50 * time.Millisecond) // pacing only, not a timing assertion
			}
			return nil, nil, false
		}
		return l, file, true
	}
	release := func(step string, l *brokerv1.Lease, file *os.File) {
		x, cancel := ctx()
		defer cancel()
		if _, err := t.c.Release(x, l.GetId()); err != nil {
			r.Unexpected = append(r.Unexpected, fmt.Sprintf("%s: release %s: %v", step, l.GetId(), err))
		}
		file.Close()
	}
	for i := 0; time.Since(start) < dur; i++ {
		r.Iterations++
		k := uint64(i / 4 % 4)
		switch i % 4 {
		case 0:
			off := (1 + k) * chunk
			if l, file, ok := alloc("release", off, brokerv1.LeaseKind_LEASE_KIND_SHARED, 0); ok {
				release("release", l, file)
				r.Released++
				released = off
			}
		case 1:
			if _, file, ok := alloc("ttl", (5+k)*chunk, brokerv1.LeaseKind_LEASE_KIND_SHARED, ttl); ok {
				file.Close() // the lease runs out by itself
				r.TTLLeases++
			}
		case 2:
			off := (9 + k) * chunk
			sent := time.Now()
			out, err := exec.Command(self, "-socket", socket, "exit-holder", bdf, strconv.Itoa(int(bar)), strconv.FormatUint(off, 10), strconv.Itoa(chunk)).Output()
			line := strings.TrimSpace(string(out))
			switch {
			case err == nil && strings.HasPrefix(line, "ok "):
				r.HolderExits++
			case strings.HasPrefix(line, "err "):
				code, msg, _ := strings.Cut(strings.TrimPrefix(line, "err "), " ")
				if code == "Unavailable" || code == "ResourceExhausted" {
					r.refused("holder-exit", sent, status.Error(codeOf(code), msg))
					time.Sleep(50 * time.Millisecond)
				} else {
					r.Unexpected = append(r.Unexpected, "holder-exit: "+line)
				}
			default:
				r.Unexpected = append(r.Unexpected, fmt.Sprintf("holder-exit: %v: %q", err, line))
			}
		case 3:
			if l, file, ok := alloc("private", released, brokerv1.LeaseKind_LEASE_KIND_PRIVATE, 0); ok {
				// Granted: the device just cycled for it. Released at once, it leaves an
				// ended-but-live private lease, so the same request needs another cycle
				// right away, within C of that one.
				r.PrivateGranted++
				release("private", l, file)
				if l, file, ok := alloc("private-again", released, brokerv1.LeaseKind_LEASE_KIND_PRIVATE, 0); ok {
					r.PrivateGranted++
					release("private-again", l, file)
				}
			}
		}
	}
	r.Took = time.Since(start).Round(time.Millisecond).String()
	return r
}

// codeOf is the gRPC code of an exit-holder's refusal (only those two are refusals).
func codeOf(name string) codes.Code {
	if name == "ResourceExhausted" {
		return codes.ResourceExhausted
	}
	return codes.Unavailable
}

// exitHolder allocates and claims a lease and returns without releasing it: the caller
// exits, and the daemon sees the holder process exit.
func exitHolder(args []string) int {
	bdf, bar, off, length, err := parseRange(args)
	if err != nil {
		fmt.Printf("err InvalidArgument %v\n", err)
		return 2
	}
	c, err := client.Dial(socket)
	if err != nil {
		fmt.Printf("err Unknown %v\n", err)
		return 1
	}
	t := &tenant{c: c}
	l, file, err := t.allocClaim(&brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: uint32(bar), VmName: "exit-holder",
		Ranges: []*brokerv1.Range{{Offset: off, Length: length}}})
	if err != nil {
		st := status.Convert(err)
		fmt.Printf("err %s %s\n", st.Code(), strings.ReplaceAll(st.Message(), "\n", " "))
		return 1
	}
	_ = file // held until the process exits
	fmt.Printf("ok %s\n", l.GetId())
	return 0
}
