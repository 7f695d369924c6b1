package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

// execFD is the fd number the -exec command finds the lease's dma-buf at.
const execFD = 3

// allocateArgs is a parsed allocate command line.
type allocateArgs struct {
	opt     client.AllocateOptions
	exec    bool
	command []string
}

func parseAllocate(c *cli, args []string) (allocateArgs, error) {
	fs := c.subcommand("allocate", "[flags] BDF BAR [-- COMMAND [ARG]...]")
	var ranges rangeFlag
	fs.Var(&ranges, "range", "lease the byte range `OFFSET:LENGTH` of the BAR (repeatable; default the whole BAR)")
	kind := fs.String("kind", "shared", "lease `kind`: shared or private")
	vm := fs.String("vm", "", "name of the VM the lease is for (at most 64 bytes)")
	ttl := fs.Duration("ttl", 0, "time to live: the lease is revoked `DUR` after allocation unless renewed (0: none)")
	hold := fs.Bool("hold", false, "hold the fd until SIGINT or SIGTERM, then release (the default)")
	execFlag := fs.Bool("exec", false, "run the command after -- with the fd as fd 3; release when it exits")
	pos, rest, err := parse(fs, args, 2)
	if err != nil {
		return allocateArgs{}, err
	}
	var a allocateArgs
	switch {
	case *hold && *execFlag:
		return a, usagef("allocate: -hold and -exec exclude each other")
	case *execFlag && len(rest) == 0:
		return a, usagef("allocate: -exec needs a command after --")
	case !*execFlag && rest != nil:
		return a, usagef("allocate: a command after -- needs -exec")
	}
	if err := nonNegative("allocate: -ttl", *ttl); err != nil {
		return a, err
	}
	bdf, err := parseBDF(pos[0])
	if err != nil {
		return a, err
	}
	bar, err := parseBAR(pos[1])
	if err != nil {
		return a, err
	}
	var k brokerv1.LeaseKind
	switch *kind {
	case "shared":
		k = brokerv1.LeaseKind_LEASE_KIND_SHARED
	case "private":
		k = brokerv1.LeaseKind_LEASE_KIND_PRIVATE
	default:
		return a, usagef("allocate: -kind %q: want shared or private", *kind)
	}
	a.opt = client.AllocateOptions{BDF: bdf, BAR: bar, Kind: k, VMName: *vm, TTL: *ttl}
	for _, r := range ranges {
		a.opt.Ranges = append(a.opt.Ranges, &brokerv1.Range{Offset: r.off, Length: r.len})
	}
	a.exec, a.command = *execFlag, rest
	return a, nil
}

func (c *cli) allocate(ctx context.Context, args []string) error {
	a, err := parseAllocate(c, args)
	if err != nil {
		return err
	}
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	if a.exec {
		rctx, cancel := c.rpcContext(ctx)
		lease, err := cl.Allocate(rctx, a.opt)
		cancel()
		if err != nil {
			return err
		}
		return c.execLease(ctx, cl, lease, a.command)
	}
	return c.holdLease(ctx, cl, a.opt)
}

// release releases the lease after the command or the hold ended. ctx may be done
// already, so it gets its own time limit.
func (c *cli) release(cl *client.Client, id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	_, err := cl.Release(ctx, id)
	return err
}

// fdDescription describes the held fd; printed by allocate.
type fdDescription struct {
	FD         int    `json:"fd"`
	Inode      uint64 `json:"inode"`
	Size       uint64 `json:"size"`
	Generation uint64 `json:"generation"`
	// ExpName and Name come from /proc/self/fdinfo; empty if the fd is not a dma-buf
	// (a test daemon's fake device).
	ExpName string `json:"exp_name"`
	Name    string `json:"name"`
}

func describeFD(f *os.File, claim client.ClaimInfo) fdDescription {
	d := fdDescription{FD: -1, Inode: claim.Inode, Size: claim.Size, Generation: claim.Generation}
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { d.FD = int(fd) })
	}
	if text, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(d.FD)); err == nil {
		if info, err := dmabuf.ParseFDInfo(string(text)); err == nil {
			d.ExpName, d.Name = info.ExpName, info.Name
		}
	}
	return d
}

// allocation is the JSON document allocate prints.
type allocation struct {
	Lease jsonMessage   `json:"lease"`
	FD    fdDescription `json:"fd"`
}

func writeAllocation(w io.Writer, l *brokerv1.Lease, fd fdDescription) error {
	fmt.Fprintf(w, "lease %s allocated and claimed\n", l.GetId())
	fmt.Fprintf(w, "  device      %s bar %d\n", l.GetBdf(), l.GetBar())
	fmt.Fprintf(w, "  ranges      %s\n", rangesString(l.GetRanges()))
	kind := leaseKind(l)
	fmt.Fprintf(w, "  kind        %s\n", kind)
	if vm := l.GetVmName(); vm != "" {
		fmt.Fprintf(w, "  vm          %s\n", vm)
	}
	if l.GetTtl() != nil {
		fmt.Fprintf(w, "  ttl         %s (expires %s unless renewed)\n", ttlString(l), timeString(l.GetExpireTime()))
	}
	fmt.Fprintf(w, "  generation  %d\n", fd.Generation)
	fmt.Fprintf(w, "  size        %d (%s)\n", fd.Size, sizeString(fd.Size))
	fmt.Fprintf(w, "  inode       %d\n", fd.Inode)
	fmt.Fprintf(w, "  fd          %d (exp_name %s, name %s)\n", fd.FD, dash(fd.ExpName), dash(fd.Name))
	_, err := fmt.Fprintln(w, "holding the fd; SIGINT (Ctrl-C) or SIGTERM releases the lease")
	return err
}

// holdNote is something the hold's callbacks tell the command's loop.
type holdNote struct {
	text string
	// revokeRequested: an administrator asked for the lease back by this deadline.
	revokeRequested *timestamppb.Timestamp
}

// holdNotes queues notes from the hold's callbacks, which must not block, for the
// command's loop, which prints them: one writer, in order.
type holdNotes struct {
	mu     sync.Mutex
	notes  []holdNote    // guarded by mu
	signal chan struct{} // one pending wake-up
}

func (q *holdNotes) add(n holdNote) {
	q.mu.Lock()
	q.notes = append(q.notes, n)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *holdNotes) take() []holdNote {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.notes
	q.notes = nil
	return n
}

// holdLease allocates a lease, claims its fd and holds it until ctx ends, then releases
// the lease. The client's hold claims reissued generations by itself (the old fd is dead);
// an administrator's revoke request is honored by releasing the lease at once, and an end
// by someone else ends the hold.
func (c *cli) holdLease(ctx context.Context, cl *client.Client, opt client.AllocateOptions) error {
	q := &holdNotes{signal: make(chan struct{}, 1)}
	hopt := client.HoldOptions{
		OnReissue: func(f *os.File, info client.ClaimInfo) {
			nd := describeFD(f, info)
			q.add(holdNote{text: fmt.Sprintf("lease %s reissued: generation %d, inode %d, fd %d (the old fd is dead)",
				info.LeaseID, nd.Generation, nd.Inode, nd.FD)})
		},
		OnEvent: func(e *brokerv1.Event) {
			l := e.GetLease()
			switch e.GetType() {
			case brokerv1.EventType_EVENT_TYPE_REVOKE_REQUESTED:
				q.add(holdNote{revokeRequested: l.GetRevokeDeadline()})
			case brokerv1.EventType_EVENT_TYPE_RENEWED:
				q.add(holdNote{text: fmt.Sprintf("lease %s renewed: ttl %s, expires %s", l.GetId(), ttlString(l), timeString(l.GetExpireTime()))})
			case brokerv1.EventType_EVENT_TYPE_SUSPENDED:
				q.add(holdNote{text: fmt.Sprintf("lease %s: device %s suspended; the fd is inaccessible until it is resumed", l.GetId(), l.GetBdf())})
			case brokerv1.EventType_EVENT_TYPE_RESUMED:
				q.add(holdNote{text: fmt.Sprintf("lease %s: device %s resumed; the fd is accessible again", l.GetId(), l.GetBdf())})
			}
		},
	}
	rctx, cancel := c.rpcContext(ctx)
	h, err := cl.AllocateAndHold(rctx, opt, hopt)
	cancel()
	if err != nil {
		return err
	}
	defer h.Close()

	l := h.Lease()
	fd := describeFD(h.File(), h.Claim())
	if c.json {
		err = writeJSON(c.stdout, allocation{Lease: jsonMessage{l}, FD: fd})
	} else {
		err = writeAllocation(c.stdout, l, fd)
	}
	if err != nil {
		return errors.Join(err, c.release(cl, h.ID))
	}
	// Notices after the first document go to stderr with -json (stdout holds one document).
	notes := c.stdout
	if c.json {
		notes = c.stderr
	}
	// drain prints the pending notes and reports a revoke request.
	drain := func() (deadline *timestamppb.Timestamp, requested bool) {
		for _, n := range q.take() {
			if n.revokeRequested != nil {
				deadline, requested = n.revokeRequested, true
				continue
			}
			fmt.Fprintln(notes, n.text)
		}
		return deadline, requested
	}
	for {
		select {
		case <-ctx.Done():
			drain()
			if err := c.release(cl, h.ID); err != nil {
				return err
			}
			fmt.Fprintf(notes, "released lease %s\n", h.ID)
			return nil
		case <-q.signal:
			deadline, requested := drain()
			if !requested {
				continue
			}
			// Nothing to finish here: cooperate at once.
			if err := c.release(cl, h.ID); err != nil {
				return fmt.Errorf("lease %s: an administrator asked for it back (revoke deadline %s), but releasing it failed: %w",
					h.ID, timeString(deadline), err)
			}
			return &leaseEndedError{msg: fmt.Sprintf("lease %s: an administrator asked for it back (revoke deadline %s); released it",
				h.ID, timeString(deadline))}
		case <-h.Done():
			drain()
			err := h.Err()
			var le *client.LeaseEndedError
			if errors.As(err, &le) {
				e := le.Event
				l := e.GetLease()
				return &leaseEndedError{msg: fmt.Sprintf("lease %s ended: %s (%s, by %s)",
					h.ID, eventName(e.GetType()), reasonName(l.GetEndReason()), dash(l.GetEndedBy()))}
			}
			// Without events a reissue would go unnoticed: stop holding.
			return errors.Join(err, c.release(cl, h.ID))
		}
	}
}

// leaseEnv returns the MMIO_LEASE_* variables describing the lease to the -exec command.
func leaseEnv(lease *client.Lease) []string {
	l := lease.Lease
	return []string{
		"MMIO_LEASE_ID=" + lease.ID,
		"MMIO_LEASE_FD=" + strconv.Itoa(execFD),
		"MMIO_LEASE_BDF=" + l.GetBdf(),
		"MMIO_LEASE_BAR=" + strconv.Itoa(int(l.GetBar())),
		"MMIO_LEASE_KIND=" + kindName(l.GetKind()),
		"MMIO_LEASE_SIZE=" + strconv.FormatUint(lease.Claim.Size, 10),
		"MMIO_LEASE_INODE=" + strconv.FormatUint(lease.Claim.Inode, 10),
		"MMIO_LEASE_GENERATION=" + strconv.FormatUint(lease.Claim.Generation, 10),
	}
}

// execLease runs command with the lease's fd as fd 3, waits for it and releases the
// lease. SIGINT and SIGTERM (ctx ending) are passed on to the command as SIGTERM. The
// result is the command's exit status.
func (c *cli) execLease(ctx context.Context, cl *client.Client, lease *client.Lease, command []string) error {
	cmd := exec.Command(command[0], command[1:]...)
	cmd.Stdin = os.Stdin
	cmd.Stdout = c.stdout
	cmd.Stderr = c.stderr
	cmd.ExtraFiles = []*os.File{lease.File} // fd 3 == execFD
	cmd.Env = append(os.Environ(), leaseEnv(lease)...)
	err := cmd.Start()
	lease.File.Close() // the command holds it now
	if err != nil {
		return &exitStatus{code: exitCannotExec, err: errors.Join(
			fmt.Errorf("run %s: %w", command[0], err), c.release(cl, lease.ID))}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-done:
	case <-ctx.Done():
		cmd.Process.Signal(syscall.SIGTERM)
		werr = <-done
	}
	code := cmd.ProcessState.ExitCode()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		code = 128 + int(ws.Signal())
	}
	var ee *exec.ExitError
	if werr != nil && !errors.As(werr, &ee) {
		// Waiting failed (not the command's failure): say so, keep its status.
		fmt.Fprintf(c.stderr, "mmiobrokerctl: wait for %s: %v\n", command[0], werr)
	}
	if err := c.release(cl, lease.ID); status.Code(err) == codes.FailedPrecondition {
		// Ended while the command ran (revoked, device lost): nothing is left to release,
		// and the command's status is what the caller asked for.
		fmt.Fprintf(c.stderr, "mmiobrokerctl: lease %s ended while %s ran: %s\n", lease.ID, command[0], status.Convert(err).Message())
	} else if err != nil {
		if code == 0 {
			return err
		}
		printError(c.stderr, err)
	}
	return &exitStatus{code: code}
}
