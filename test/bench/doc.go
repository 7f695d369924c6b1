// Package bench is mmiobroker's cross-process load generator (command
// test/bench/cmd/mmiobroker-bench): it measures the lease round trip of the real daemon
// wiring from other processes, next to the floor of the same work measured in the same
// run, and writes the results table (docs/benchmarks.md).
//
// It has three modes, each a process:
//
//   - daemon runs the daemon in its process exactly as mmiobrokerd does (daemon.Run, its
//     configuration file, the service manager from the environment), with the fake devices
//     of internal/broker/brokertest behind it, and also serves the floor: a bare gRPC server
//     (the standard health service) on its own unix socket and a bare SOCK_SEQPACKET
//     socket that, per connection, reads one 32-byte request and replies with one small
//     message carrying one fd by SCM_RIGHTS (a dup of a memfd it holds), then closes.
//   - client is one load process: it connects to both and runs its operations,
//     interleaving broker and floor operations so that both see the same machine load,
//     and records every operation's latency.
//   - run is the orchestrator: for each scenario it starts a daemon process under a fake
//     systemd (internal/systemd/systemdtest) with the fd store of
//     deploy/mmiobrokerd.service, so that the daemon runs its lease journal as deployed,
//     then the scenario's client processes together; it gathers their latencies and
//     writes the table with p50/p90/p99/p99.9, throughput, the ratios to the floor and
//     the targets.
//
// # Operations
//
// A broker operation is the lease round trip a VMM makes (client.Client.Allocate):
// AllocateLease over gRPC, then the claim on the claim socket until the dma-buf fd is in
// hand. That is the latency. The fd is then closed and the lease released
// (ReleaseLease), which counts for the throughput but not for the latency. A floor
// operation is one unary gRPC call, a dial of a second unix socket, a 32-byte request and
// a reply carrying one fd (the latency), then one more unary call standing for the
// release. A revoke operation allocates and claims a lease (not timed) and times an
// administrator's RevokeLease of it until the response, which comes once the dma-buf is
// dead; its floor is one bare unary call.
//
// # Fd lifetime
//
// Every fd a client receives is closed by the operation that received it; the daemon
// process's floor keeps one memfd for its lifetime and sends dups of it. A failed
// operation fails its client process, and a failed client fails the run.
package bench
