package main

import (
	"context"
	"fmt"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

func (c *cli) devices(ctx context.Context, args []string) error {
	fs := c.subcommand("devices", "")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := c.rpcContext(ctx)
	defer cancel()
	resp, err := cl.API().ListDevices(ctx, &brokerv1.ListDevicesRequest{})
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, resp)
	}
	return writeDevices(c.stdout, resp.GetDevices())
}

func (c *cli) device(ctx context.Context, args []string) error {
	fs := c.subcommand("device", "BDF")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	bdf, err := parseBDF(pos[0])
	if err != nil {
		return err
	}
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := c.rpcContext(ctx)
	defer cancel()
	resp, err := cl.API().GetDevice(ctx, &brokerv1.GetDeviceRequest{Bdf: bdf})
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, resp)
	}
	return writeDevice(c.stdout, resp.GetDevice())
}

func (c *cli) leases(ctx context.Context, args []string) error {
	fs := c.subcommand("leases", "[-all] [-device BDF] [-uid UID]")
	all := fs.Bool("all", false, "include recently ended leases")
	device := fs.String("device", "", "only leases of the device at `BDF`")
	uid := fs.Int64("uid", -1, "only leases held by `UID` (admins; others see only their own)")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	req := &brokerv1.ListLeasesRequest{LiveOnly: !*all}
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
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := c.rpcContext(ctx)
	defer cancel()
	resp, err := cl.API().ListLeases(ctx, req)
	if err != nil {
		return err
	}
	if c.json {
		return writeJSON(c.stdout, resp)
	}
	return writeLeases(c.stdout, resp.GetLeases())
}

// endLease runs revoke or release.
func (c *cli) endLease(ctx context.Context, verb string, args []string) error {
	fs := c.subcommand(verb, "LEASE_ID")
	pos, _, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	id := pos[0]
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := c.rpcContext(ctx)
	defer cancel()
	var l *brokerv1.Lease
	if verb == "revoke" {
		l, err = cl.Revoke(ctx, id)
	} else {
		l, err = cl.Release(ctx, id)
	}
	if err != nil {
		return err
	}
	if c.json {
		if verb == "revoke" {
			return writeJSON(c.stdout, &brokerv1.RevokeLeaseResponse{Lease: l})
		}
		return writeJSON(c.stdout, &brokerv1.ReleaseLeaseResponse{Lease: l})
	}
	if verb == "revoke" {
		fmt.Fprintf(c.stdout, "revoked lease %s (%s)\n", l.GetId(), leaseSummary(l))
		fmt.Fprintf(c.stdout, "every other dma-buf of %s was revoked too; its live leases were reissued as a new generation\n", l.GetBdf())
		return nil
	}
	fmt.Fprintf(c.stdout, "released lease %s (%s)\n", l.GetId(), leaseSummary(l))
	fmt.Fprintln(c.stdout, "the holder's fd is not revoked: the holder should close it")
	return nil
}

func (c *cli) watch(ctx context.Context, args []string) error {
	fs := c.subcommand("watch", "[-cursor SEQ]")
	cursor := fs.Uint64("cursor", 0, "resume after the event with sequence number `SEQ` (0: only new events)")
	if _, _, err := parse(fs, args, 0); err != nil {
		return err
	}
	cl, err := c.dial()
	if err != nil {
		return err
	}
	defer cl.Close()
	for e, err := range cl.Watch(ctx, *cursor) {
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
