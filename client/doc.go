// Package client is the Go library a VMM (or any program) uses to lease BAR ranges of
// VFIO devices from mmiobrokerd as dma-buf file descriptors.
//
// A lease is obtained in two steps, which [Client.Allocate] does together: the gRPC call
// AllocateLease on the control socket returns the lease and a one-time claim token, and
// the claim on the claim socket (docs/claim-protocol.md) exchanges the token for the
// dma-buf fd, passed by SCM_RIGHTS. Both steps must come from the same process: the daemon
// identifies callers by their socket peer credentials, not by anything the client sends.
//
//	c, err := client.Dial(client.DefaultSocket)
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	lease, err := c.Allocate(ctx, client.AllocateOptions{BDF: "0000:3b:00.0", BAR: 2, VMName: "vm1"})
//	if err != nil {
//		return err // a gRPC status error: status.Code(err) says which class
//	}
//	defer lease.File.Close()
//	// Import lease.File into iommufd (package client/iommufd) or pass it to the VMM …
//	defer c.Release(context.Background(), lease.ID)
//
// # Fd lifetime and revocation
//
// The caller owns [Lease.File] (opened close-on-exec) and must close it. Releasing a lease
// ([Client.Release]) does not invalidate the fd: close it yourself. An administrator's
// revoke makes the fd dead for good (the kernel stops every access through it). Linux
// cannot revoke one dma-buf alone, so revoking another lease of the same device also kills
// this lease's fd; the daemon then re-exports this lease as a new generation and sends a
// REISSUED event with a new claim token to the holder's event streams ([Client.Watch]):
// claim the new fd with [Client.Claim] and re-import it.
//
// [Client.AllocateAndHold] (or [Client.Hold] for a lease already allocated) does that by
// itself: the returned [HeldLease] follows the process's own event stream, claims every
// reissued generation with the event's token, swaps [HeldLease.File] and calls
// [HoldOptions.OnReissue] with the new fd to re-import, then closes the dead one.
//
// Other ways a lease ends, all reported on the event stream: the process that allocated it
// exits (the daemon notices through a pidfd, releases the lease and revokes its fd); its
// time to live ([AllocateOptions.TTL]) runs out without a [Client.Renew] (revoked,
// EXPIRED); its device goes away (DEVICE_LOST); the daemon stops. An administrator may
// also ask for a lease back with a grace period ([Client.RevokeWithGrace]): the holder sees
// REVOKE_REQUESTED with the deadline and should release the lease before it. While an
// administrator has suspended the device ([Client.Suspend]) the fd is inaccessible; after
// the RESUMED event it works again, but importers that dropped their mappings must map it
// again.
//
// # Importing into iommufd
//
// Package [github.com/mmiobroker/mmiobroker/client/iommufd] maps a lease's fd into the
// caller's iommufd IO address space (IOMMU_IOAS_MAP_FILE), where the VM's VFIO devices
// reach the BAR by DMA. Its IOAS.AllocateAndImport holds the lease as AllocateAndHold does
// and keeps the fd mapped at one IOVA through reissues and resumes, unmapping it at the
// lease's end. iommufd maps only dma-bufs of one range: lease each range on its own.
//
// # Errors
//
// Every error of this package that comes from the daemon carries a gRPC status:
// status.Code(err) gives its class (NotFound, PermissionDenied, FailedPrecondition, …),
// also for refusals on the claim socket ([*ClaimError]).
package client
