package main

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

func (c *cli) devices(ctx context.Context, args []string) error {
	return plainCommand(c, ctx, "devices", args,
		func(ctx context.Context, cl *client.Client) (*brokerv1.ListDevicesResponse, error) {
			return cl.API().ListDevices(ctx, &brokerv1.ListDevicesRequest{})
		},
		func(resp *brokerv1.ListDevicesResponse) error { return writeDevices(c.stdout, resp.GetDevices()) })
}

// plainCommand runs a command without arguments: it connects, calls do and prints the
// response as JSON (-json) or with text.
func plainCommand[R any](c *cli, ctx context.Context, name string, args []string,
	do func(context.Context, *client.Client) (R, error), text func(R) error) error {
	fs := c.subcommand(name, "")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	return c.call(ctx, func(ctx context.Context, cl *client.Client) error {
		resp, err := do(ctx, cl)
		if err != nil {
			return err
		}
		if c.json {
			return writeJSON(c.stdout, resp)
		}
		return text(resp)
	})
}

// call connects and runs f with the connection and the command's RPC context.
func (c *cli) call(ctx context.Context, f func(context.Context, *client.Client) error) error {
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	return f(ctx, cl)
}

func (c *cli) device(ctx context.Context, args []string) error {
	return deviceCommand(c, ctx, "device", args,
		func(ctx context.Context, cl *client.Client, bdf string) (*brokerv1.GetDeviceResponse, error) {
			return cl.API().GetDevice(ctx, &brokerv1.GetDeviceRequest{Bdf: bdf})
		},
		func(_ string, resp *brokerv1.GetDeviceResponse) error { return writeDevice(c.stdout, resp.GetDevice()) })
}

// deviceCommand runs a command whose one argument is a device: it parses the BDF, connects,
// calls do with the canonical BDF and prints the response as JSON (-json) or with text.
func deviceCommand[R any](c *cli, ctx context.Context, name string, args []string,
	do func(context.Context, *client.Client, string) (R, error), text func(bdf string, resp R) error) error {
	fs := c.subcommand(name, "BDF")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	bdf, err := parseBDF(pos[0])
	if err != nil {
		return err
	}
	return c.call(ctx, func(ctx context.Context, cl *client.Client) error {
		resp, err := do(ctx, cl, bdf)
		if err != nil {
			return err
		}
		if c.json {
			return writeJSON(c.stdout, resp)
		}
		return text(bdf, resp)
	})
}

func (c *cli) leases(ctx context.Context, args []string) error {
	fs := c.subcommand("leases", "[-all] [-device BDF] [-uid UID] [-tenant TENANT]")
	all := fs.Bool("all", false, "include recently ended leases")
	device := fs.String("device", "", "only leases of the device at `BDF`")
	uid := fs.Int64("uid", -1, "only leases held by `UID` (admins; others see only their own)")
	tenant := fs.String("tenant", "", "only leases of `TENANT`, as the TENANT column shows it, e.g. uid=107 (admins; others see only their own)")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	req := &brokerv1.ListLeasesRequest{LiveOnly: !*all, Tenant: *tenant}
	if *device != "" {
		bdf, err := parseBDF(*device)
		if err != nil {
			return err
		}
		req.Bdf = bdf
	}
	if *uid >= 0 {
		if *uid > 1<<32-1 {
			return usagef("-uid %d is out of range", *uid)
		}
		u := uint32(*uid)
		req.HolderUid = &u
	}
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	// Every page, in one list: the daemon sends at most 1000 leases a page.
	list := &brokerv1.ListLeasesResponse{}
	for {
		resp, err := cl.API().ListLeases(ctx, req)
		if err != nil {
			return err
		}
		list.Leases = append(list.Leases, resp.GetLeases()...)
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	if c.json {
		return writeJSON(c.stdout, list)
	}
	return writeLeases(c.stdout, list.GetLeases())
}

// revoke runs revoke [-grace DUR] LEASE_ID.
func (c *cli) revoke(ctx context.Context, args []string) error {
	fs := c.subcommand("revoke", "[-grace DUR] LEASE_ID")
	grace := fs.Duration("grace", 0, "ask the holder to release the lease within `DUR` (e.g. 30s, at most 1h); revoke it then (0: at once)")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	if err := nonNegative("revoke: -grace", *grace); err != nil {
		return err
	}
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	req := &brokerv1.RevokeLeaseRequest{LeaseId: pos[0]}
	if *grace > 0 {
		req.GracePeriod = durationpb.New(*grace)
	}
	resp, err := cl.API().RevokeLease(ctx, req)
	if err != nil {
		return err
	}
	l := resp.GetLease()
	if c.json {
		return writeJSON(c.stdout, resp)
	}
	switch r := l.GetEndReason(); {
	case r == brokerv1.EndReason_END_REASON_UNSPECIFIED && l.GetRevokeDeadline() != nil:
		fmt.Fprintf(c.stdout, "revoke of lease %s requested (%s)\n", l.GetId(), leaseSummary(l))
		fmt.Fprintf(c.stdout, "its holder may release it until %s; then it is revoked\n", timeString(l.GetRevokeDeadline()))
		return nil
	case r != brokerv1.EndReason_END_REASON_UNSPECIFIED && r != brokerv1.EndReason_END_REASON_REVOKED:
		// An ended-but-live lease: the revoke killed its fd, the lease keeps its end.
		fmt.Fprintf(c.stdout, "killed the fd of lease %s, which had ended (%s, by %s) (%s)\n",
			l.GetId(), reasonName(r), dash(l.GetEndedBy()), leaseSummary(l))
	default:
		fmt.Fprintf(c.stdout, "revoked lease %s (%s)\n", l.GetId(), leaseSummary(l))
	}
	fmt.Fprintf(c.stdout, "%d other live lease(s) of %s were reissued as a new generation (the kernel revokes every dma-buf of a device at once)\n",
		resp.GetReissuedLeases(), l.GetBdf())
	return nil
}

// renew runs renew [-ttl DUR] LEASE_ID.
func (c *cli) renew(ctx context.Context, args []string) error {
	fs := c.subcommand("renew", "[-ttl DUR] LEASE_ID")
	ttl := fs.Duration("ttl", 0, "the lease now expires `DUR` from now (0: by its own ttl)")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	if err := nonNegative("renew: -ttl", *ttl); err != nil {
		return err
	}
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	l, err := cl.Renew(ctx, pos[0], *ttl)
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, &brokerv1.RenewLeaseResponse{Lease: l})
	}
	fmt.Fprintf(c.stdout, "renewed lease %s: ttl %s, expires %s\n", l.GetId(), ttlString(l), timeString(l.GetExpireTime()))
	return nil
}

// releaseLease runs release LEASE_ID.
func (c *cli) releaseLease(ctx context.Context, args []string) error {
	fs := c.subcommand("release", "LEASE_ID")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	l, err := cl.Release(ctx, pos[0])
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, &brokerv1.ReleaseLeaseResponse{Lease: l})
	}
	fmt.Fprintf(c.stdout, "released lease %s (%s)\n", l.GetId(), leaseSummary(l))
	switch {
	case l.GetRevokeDue() != nil:
		fmt.Fprintf(c.stdout, "its fd keeps working until the device's next cycle, at the latest %s: the holder should close it now (cycle %s or revoke %s kills it at once)\n",
			timeString(l.GetRevokeDue()), l.GetBdf(), l.GetId())
	case l.GetFdDead():
		fmt.Fprintln(c.stdout, "its fd is dead")
	default:
		fmt.Fprintln(c.stdout, "the holder's fd is not revoked (unless a revoke of the lease was pending): the holder should close it")
	}
	return nil
}

// suspendResume runs suspend BDF or resume BDF.
func (c *cli) suspendResume(ctx context.Context, verb string, args []string) error {
	if verb == "suspend" {
		return deviceCommand(c, ctx, verb, args,
			func(ctx context.Context, cl *client.Client, bdf string) (*brokerv1.SuspendDeviceResponse, error) {
				d, err := cl.Suspend(ctx, bdf)
				return &brokerv1.SuspendDeviceResponse{Device: d}, err
			},
			func(_ string, r *brokerv1.SuspendDeviceResponse) error {
				_, err := fmt.Fprintf(c.stdout, "suspended device %s: the dma-bufs of its %d live lease(s) are inaccessible; new leases are refused until resume\n",
					r.GetDevice().GetBdf(), r.GetDevice().GetLiveLeases())
				return err
			})
	}
	return deviceCommand(c, ctx, verb, args,
		func(ctx context.Context, cl *client.Client, bdf string) (*brokerv1.ResumeDeviceResponse, error) {
			d, err := cl.Resume(ctx, bdf)
			return &brokerv1.ResumeDeviceResponse{Device: d}, err
		},
		func(_ string, r *brokerv1.ResumeDeviceResponse) error {
			_, err := fmt.Fprintf(c.stdout, "resumed device %s: the dma-bufs of its %d live lease(s) are accessible again; importers must map them again\n",
				r.GetDevice().GetBdf(), r.GetDevice().GetLiveLeases())
			return err
		})
}

func (c *cli) watch(ctx context.Context, args []string) error {
	fs := c.subcommand("watch", "[-cursor SEQ] [-devices]")
	cursor := fs.Uint64("cursor", 0, "resume after the event with sequence number `SEQ` (0: only new events)")
	devices := fs.Bool("devices", false, "also print device_changed events (a device lost, back, suspended, resumed, TSM state, first error)")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	var opts []client.WatchOption
	if *devices {
		opts = append(opts, client.WithDeviceEvents())
	}
	for e, err := range cl.Watch(ctx, *cursor, opts...) {
		if err != nil {
			return err
		}
		if c.json {
			err = writeJSONLine(c.stdout, e)
		} else {
			err = writeEventLine(c.stdout, e)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// cycle runs cycle BDF.
func (c *cli) cycle(ctx context.Context, args []string) error {
	return deviceCommand(c, ctx, "cycle", args,
		func(ctx context.Context, cl *client.Client, bdf string) (*brokerv1.CycleDeviceResponse, error) {
			return cl.API().CycleDevice(ctx, &brokerv1.CycleDeviceRequest{Bdf: bdf})
		},
		func(bdf string, r *brokerv1.CycleDeviceResponse) error {
			_, err := fmt.Fprintf(c.stdout, "cycled device %s: every dma-buf it exported is dead; %d ended lease(s) lost their live fd, %d live lease(s) were reissued as a new generation\n",
				bdf, r.GetFdRevokedLeases(), r.GetReissuedLeases())
			return err
		})
}

func (c *cli) drain(ctx context.Context, args []string) error {
	fs := c.subcommand("drain", "")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, ctx, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	r, err := cl.Drain(ctx)
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, r)
	}
	fmt.Fprintf(c.stdout, "drained: %d lease(s) ended and revoked, %d device(s) cycled; new leases are refused until the daemon restarts\n",
		r.GetEndedLeases(), r.GetCycledDevices())
	return nil
}
