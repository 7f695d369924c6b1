package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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
	a.opt = client.AllocateOptions{BDF: bdf, BAR: bar, Kind: k, VMName: *vm}
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

	// Watch the caller's events from before the allocation, so that a reissue of the new
	// lease cannot slip by (held leases only: a command holds its own fd).
	var events <-chan watchItem
	if !a.exec {
		wctx, stopWatch := context.WithCancel(ctx)
		defer stopWatch()
		events = watchEvents(wctx, cl)
	}

	rctx, cancel := c.rpcContext(ctx)
	lease, err := cl.Allocate(rctx, a.opt)
	cancel()
	if err != nil {
		return err
	}
	if a.exec {
		return c.execLease(ctx, cl, lease, a.command)
	}
	return c.holdLease(ctx, cl, lease, events)
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
	fmt.Fprintf(w, "  generation  %d\n", fd.Generation)
	fmt.Fprintf(w, "  size        %d (%s)\n", fd.Size, sizeString(fd.Size))
	fmt.Fprintf(w, "  inode       %d\n", fd.Inode)
	fmt.Fprintf(w, "  fd          %d (exp_name %s, name %s)\n", fd.FD, dash(fd.ExpName), dash(fd.Name))
	_, err := fmt.Fprintln(w, "holding the fd; SIGINT (Ctrl-C) or SIGTERM releases the lease")
	return err
}

// watchItem is one item of the event stream.
type watchItem struct {
	event *brokerv1.Event
	err   error
}

// watchEvents streams the caller's events into a channel until ctx ends.
func watchEvents(ctx context.Context, cl *client.Client) <-chan watchItem {
	ch := make(chan watchItem)
	go func() {
		defer close(ch)
		for e, err := range cl.Watch(ctx, 0) {
			select {
			case ch <- watchItem{e, err}:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch
}

// holdLease holds the lease's fd until ctx ends, then releases the lease. It follows the
// lease's events: a reissue is claimed (the old fd is dead) and an end by someone else
// ends the hold.
func (c *cli) holdLease(ctx context.Context, cl *client.Client, lease *client.Lease, events <-chan watchItem) error {
	f := lease.File
	defer func() { f.Close() }()
	fd := describeFD(f, lease.Claim)
	var err error
	if c.json {
		err = writeJSON(c.stdout, allocation{Lease: jsonMessage{lease.Lease}, FD: fd})
	} else {
		err = writeAllocation(c.stdout, lease.Lease, fd)
	}
	if err != nil {
		return errors.Join(err, c.release(cl, lease.ID))
	}
	// Notices after the first document go to stderr with -json (stdout holds one document).
	notes := c.stdout
	if c.json {
		notes = c.stderr
	}
	for {
		select {
		case <-ctx.Done():
			if err := c.release(cl, lease.ID); err != nil {
				return err
			}
			fmt.Fprintf(notes, "released lease %s\n", lease.ID)
			return nil
		case it, ok := <-events:
			if !ok {
				events = nil // ctx is done: the next loop releases
				continue
			}
			if it.err != nil {
				// Without events a reissue would go unnoticed: stop holding.
				return errors.Join(fmt.Errorf("lease %s: event stream: %w", lease.ID, it.err), c.release(cl, lease.ID))
			}
			e := it.event
			l := e.GetLease()
			if l.GetId() != lease.ID {
				continue
			}
			switch e.GetType() {
			case brokerv1.EventType_EVENT_TYPE_REISSUED:
				nf, claim, err := c.reclaim(ctx, cl, lease.ID, e.GetClaimToken())
				if err != nil {
					return errors.Join(fmt.Errorf("lease %s was reissued (generation %d) but claiming it failed: %w",
						lease.ID, l.GetGeneration(), err), c.release(cl, lease.ID))
				}
				f.Close()
				f = nf
				nd := describeFD(f, claim)
				fmt.Fprintf(notes, "lease %s reissued: generation %d, inode %d, fd %d (the old fd is dead)\n",
					lease.ID, nd.Generation, nd.Inode, nd.FD)
			case brokerv1.EventType_EVENT_TYPE_REVOKED, brokerv1.EventType_EVENT_TYPE_RELEASED,
				brokerv1.EventType_EVENT_TYPE_EXPIRED, brokerv1.EventType_EVENT_TYPE_DEVICE_LOST:
				return &leaseEndedError{msg: fmt.Sprintf("lease %s ended: %s (%s, by %s)",
					lease.ID, eventName(e.GetType()), reasonName(l.GetEndReason()), dash(l.GetEndedBy()))}
			}
		}
	}
}

func (c *cli) reclaim(ctx context.Context, cl *client.Client, id, token string) (*os.File, client.ClaimInfo, error) {
	if token == "" {
		return nil, client.ClaimInfo{}, errors.New("the event carries no claim token")
	}
	rctx, cancel := c.rpcContext(ctx)
	defer cancel()
	return cl.Claim(rctx, id, token)
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
