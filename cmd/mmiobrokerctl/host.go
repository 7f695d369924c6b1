package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// host runs host: what the daemon's host offers.
func (c *cli) host(ctx context.Context, args []string) error {
	return plainCommand(c, ctx, "host", args,
		func(ctx context.Context, cl *client.Client) (*brokerv1.GetHostResponse, error) {
			return cl.API().GetHost(ctx, &brokerv1.GetHostRequest{})
		},
		func(resp *brokerv1.GetHostResponse) error { return writeHost(c.stdout, resp.GetHost()) })
}

// writeHost writes the host report: kernel, VM types and TSMs, the probes table, the TSMs
// table (if any) and the limits.
func writeHost(w io.Writer, h *brokerv1.Host) error {
	var types []string
	for _, t := range h.GetVmTypes() {
		types = append(types, t.GetName())
	}
	var tsms []string
	for _, t := range h.GetTsms() {
		tsms = append(tsms, t.GetName())
	}
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	fmt.Fprintf(tw, "Kernel:\t%s\n", dash(h.GetKernelRelease()))
	fmt.Fprintf(tw, "VM types:\t%s\n", noneIfEmpty(types))
	fmt.Fprintf(tw, "TSMs:\t%s\n", noneIfEmpty(tsms))
	if err := tw.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "PROBE\tOK\tVALUE\tREASON")
	for _, p := range h.GetProbes() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.GetName(), yesNo(p.GetOk()), dash(p.GetValue()), dash(p.GetReason()))
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	if len(h.GetTsms()) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "TSM\tPARENT\tDRIVER\tCONNECTED\tBOUND")
		for _, t := range h.GetTsms() {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.GetName(), dash(t.GetParent()), dash(t.GetDriver()),
				dash(strings.Join(t.GetConnectedDevices(), ",")), dash(strings.Join(t.GetBoundDevices(), ",")))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}

	l := h.GetLimits()
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Limits:")
	tw = tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	budget := "none"
	if n := l.GetTenantCycleBudget(); n > 0 {
		budget = fmt.Sprintf("%d per tenant and hour", n)
	}
	rows := [][2]string{
		{"Max leases", strconv.FormatUint(uint64(l.GetMaxLeases()), 10)},
		{"Max leases per tenant", strconv.FormatUint(uint64(l.GetMaxLeasesPerHolder()), 10)},
		{"Max ranges per lease", strconv.FormatUint(uint64(l.GetMaxRangesPerLease()), 10)},
		{"Claim timeout", limitDuration(l.GetClaimTimeout(), "")},
		{"Revoke within (R)", limitDuration(l.GetRevokeWithin(), "at once")},
		{"Tenant cycle interval (C)", limitDuration(l.GetTenantCycleInterval(), "no limit")},
		{"Tenant cycle budget", budget},
		{"Min ttl", limitDuration(l.GetMinTtl(), "none")},
		{"Max connections", strconv.FormatUint(uint64(l.GetMaxConnections()), 10)},
		{"Max connections per tenant", strconv.FormatUint(uint64(l.GetMaxConnectionsPerTenant()), 10)},
		{"Max concurrent claims", strconv.FormatUint(uint64(l.GetMaxConcurrentClaims()), 10)},
		{"File descriptors", fmt.Sprintf("%d needed at most, limit %d", l.GetFdBudget(), l.GetFdLimit())},
		{"Tenants by", dash(l.GetTenantsBy())},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "  %s:\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

func noneIfEmpty(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// limitDuration formats a limit's duration; zero is "0s" followed by zero's meaning.
func limitDuration(d *durationpb.Duration, zero string) string {
	v := d.AsDuration()
	if v == 0 && zero != "" {
		return "0s (" + zero + ")"
	}
	return v.Round(time.Millisecond).String()
}
