// Package server serves mmiobroker's control API, the gRPC service mmiobroker.v1.Broker
// (api/proto/mmiobroker/v1/broker.proto), on a unix socket, together with the standard
// health service and server reflection.
//
// The package is a thin shell around [broker.Broker]: it converts requests from their
// protobuf form into broker calls and the results back, checks only the shape of requests
// (required fields present, enums known, sizes bounded) and leaves every domain rule to the
// broker, and turns errors into gRPC statuses once, in its interceptors (toStatus), so a status code
// always reflects the errdefs class of the error and its message names the device, BAR and
// range at fault.
//
// # Authentication and authorization
//
// Callers are identified by the peer credentials of their connection (internal/peercred:
// SO_PEERCRED uid, gid and pid, SO_PEERGROUPS, and a pidfd pinning the process). An
// identity is resolved once per RPC by an interceptor. A caller is an admin if its uid is 0
// or its primary or a supplementary group is one of [Options.AdminGroups]. Admins see,
// watch, renew, release and revoke every lease and suspend and resume devices. Everyone else
// sees, watches, renews and releases only the leases held by their own uid (a request about
// another uid's lease fails with PermissionDenied before anything else about the lease is
// revealed), and may not revoke, suspend or resume. Who may allocate on which device is the
// broker's policy.
//
// # Shape checks
//
// Durations are google.protobuf.Duration fields, unset meaning 0. A time to live
// (AllocateLeaseRequest.ttl, RenewLeaseRequest.ttl) must lie within 0 to 366 days and a
// revoke's grace period within 0 to 1 hour; negative, malformed (seconds and nanos of
// different signs or out of range) or longer durations are InvalidArgument.
//
// # File descriptors
//
// The server never touches a dma-buf. AllocateLease pins the calling process (a duplicate
// of the connection's pidfd) and hands that handle to the broker, which owns it from then
// on; the fd itself is delivered by the claim socket (internal/fdpass), whose path the
// server only reports.
//
// # Revocation
//
// RevokeLease revokes every dma-buf of the lease's device, because Linux 7.2 cannot revoke
// one dma-buf; the broker re-exports the device's other live leases and their holders see
// a REISSUED event with a new claim token. The server shows a reissued claim token only on
// event streams of the lease's holder process (same uid and pid). ReleaseLease never revokes
// the holder's fd. With a grace period, RevokeLease only asks: the holder sees
// REVOKE_REQUESTED with the deadline, and the broker revokes the lease at the deadline unless
// the holder released it first.
package server
