// Package bench is mmiobroker's cross-process load generator (command
// test/bench/cmd/mmiobroker-bench): it measures the lease round trip of the real daemon
// wiring from other processes, next to the floor of the same work measured in the same
// run, and writes the results table (docs/benchmarks.md).
//
// It has five modes, each a process:
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
//   - holder and watcher are the scale scenario's processes (see below): a holder
//     allocates, claims and holds leases, their fds open, as told on its standard input;
//     a watcher keeps event streams open and counts what they deliver.
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
// # The scale scenario
//
// The scale scenario (-scale-leases, 100,000 by default; 0 skips it) fills a daemon on
// many fake devices with live leases held by holder processes of several uids (as root;
// RLIMIT_NOFILE bounds the fds of each process, so at most -scale-per-process leases
// each), level by level (1%, 10%, 50% and all of them). At each level the orchestrator,
// an administrator, samples the daemon (RSS, Go heap, open fds), walks ListLeases a page
// of 1000 at a time, and times GetLease and AllocateLease + claim; the report fits their
// p50 against the number of leases (the slope). At the top level it also walks
// ListLeases with filters, then opens -scale-watchers WatchEvents streams in watcher
// processes while it renews leases at -scale-rate events per second, and counts what
// every stream received (a stream the daemon cut for falling behind misses events; at a
// rate where streams lost events, it tries half the rate). Last it stops the daemon
// keeping every lease and starts a new daemon process on the same journal and fd store,
// with every holder still running, times the start until READY=1 (and the journal
// replay, from the daemon's log), and checks that every lease came back as it was: the
// same live leases, per holder process, and no event. Its fake devices (keptDevice) keep
// a marker in the fd store, as a real device keeps its VFIO fd, so that the new process
// finds them kept. The daemon's start-up check of its fd budget is told a limit
// (scaleFDLimit) that lets max_leases reach 100,000 under this machine's RLIMIT_NOFILE;
// the scenario measures the daemon's real open fds instead.
//
// A failure (an error, a lease lost across the restart, streams that lose events even at
// an eighth of the rate) fails the run; missing a target never does.
//
// # Fd lifetime
//
// Every fd a client receives is closed by the operation that received it; the daemon
// process's floor keeps one memfd for its lifetime and sends dups of it. A holder process
// keeps the fds of its leases until its standard input closes, then closes them. A failed
// operation fails its client process, and a failed client fails the run.
package bench
