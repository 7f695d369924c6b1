package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// holders runs holders [LEASE_ID]: who holds the leases' dma-bufs.
func (c *cli) holders(ctx context.Context, args []string) error {
	fs := c.subcommand("holders", "[LEASE_ID]")
	pos, _, err := parse(fs, args, -1)
	if err != nil {
		return err
	}
	req := &brokerv1.ScanHoldersRequest{}
	if len(pos) == 1 {
		req.LeaseId = pos[0]
	}
	return c.call(ctx, func(ctx context.Context, cl *client.Client) error {
		resp, err := cl.API().ScanHolders(ctx, req)
		if err != nil {
			return err
		}
		if c.json {
			return writeJSON(c.stdout, resp)
		}
		return writeHolders(c.stdout, resp)
	})
}

// writeHolders writes one row per descriptor of a lease's dma-buf (a lease without any
// gets one row of dashes), then the unaccounted dma-bufs and the scan's totals.
func writeHolders(w io.Writer, r *brokerv1.ScanHoldersResponse) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "LEASE\tSTATE\tFD-STATE\tPID\tCOMM\tUID\tFD\tROLE\tGEN\tFLAG")
	for _, lh := range r.GetLeases() {
		l := lh.GetLease()
		flag := "-"
		if lh.GetOutlasting() {
			flag = "OUTLASTING"
		}
		if len(lh.GetHolders()) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t%s\n", l.GetId(), stateName(l.GetState()), fdString(l), flag)
		}
		for _, h := range lh.GetHolders() {
			gen := "current"
			if !h.GetCurrentGeneration() {
				gen = "old (dead)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s\n", l.GetId(), stateName(l.GetState()), fdString(l),
				h.GetPid(), dash(h.GetComm()), h.GetUid(), h.GetFd(), roleName(h.GetRole()), gen, flag)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.GetUnaccounted()) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "Dma-bufs of vfio-pci that no lease accounts for:")
		tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "PID\tCOMM\tUID\tFD\tINODE\tNAME\tSIZE")
		for _, u := range r.GetUnaccounted() {
			fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%s\t%s\n", u.GetPid(), dash(u.GetComm()), u.GetUid(), u.GetFd(),
				u.GetInode(), dash(u.GetName()), sizeString(u.GetSize()))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "\nScanned %d processes at %s in %s", r.GetProcessesScanned(), timeString(r.GetScanTime()),
		r.GetScanDuration().AsDuration().Round(100_000))
	if n := r.GetProcessesInaccessible(); n > 0 {
		fmt.Fprintf(w, "; %d could not be read (the daemon needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH for other users' processes)", n)
	}
	if r.GetTruncated() {
		fmt.Fprint(w, "; the scan stopped at its bound of dma-buf descriptors")
	}
	fmt.Fprintln(w, ".")
	return nil
}

// roleName is a holder role without its enum prefix, lower case.
func roleName(r brokerv1.HolderRole) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "HOLDER_ROLE_"))
}
