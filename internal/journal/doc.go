// Package journal is mmiobrokerd's durable lease state: a restart or a crash (kill -9) of
// the daemon loses no lease.
//
// # What is stored
//
// One bbolt file, normally /run/mmiobroker/journal.db, with three buckets:
//
//   - "leases": one record per lease, live or ended, keyed by lease id ([Lease]);
//   - "events": the last Options.EventBacklog lease transitions ([Event]), keyed by their
//     seq as 8 bytes big-endian, for replay to watchers that resume after a restart (a
//     commit trims a batch of the oldest once an eighth more are stored, not one per
//     commit; [Journal.Load] returns the backlog's newest);
//   - "meta": schema_version and last_seq (8 bytes big-endian), boot_id and created (text).
//     The last seq is the last stored event's; meta last_seq holds it only where the
//     events bucket does not (after [Journal.Reset]), so a commit does not rewrite meta.
//
// Records are protocol buffers (recordpb/record.proto, schema version 2), decoded strictly
// (unknown fields are refused). Version 1 stored JSON objects: at 15 µs to decode one
// lease record, a journal of 100,000 leases took 1.5 s to replay, and JSON encoding was a
// fifth of a commit; [Open] migrates a version-1 journal in place, so an upgrade restart
// keeps every lease. Every decode of stored bytes is fuzzed, and a record that does not
// decode is an error naming its key ([RecordError], [ErrCorrupt]), never a panic. The
// records are this package's own plain types; the broker converts its domain types, and
// this package does not import it.
//
// Lease records hold only the SHA-256 of a claim token. Event records of reissued leases
// hold the new token itself, so that its holder can still collect it after a restart; the
// file is created mode 0600 in the daemon's runtime directory.
//
// # When it is written
//
// The broker calls [Journal.Commit] under its lock, after deciding a transition and before
// anyone hears of it: before a reply is sent, a claim fd is handed out or an event is
// published. A transition that was never committed was therefore never observed; one that
// was committed survives any later crash. Commit writes events, lease upserts and drops in
// one bbolt transaction: all or nothing.
//
// # The boot-id rule
//
// Leases are dma-buf fds and die with the boot, so the journal lives on tmpfs and meta
// holds the boot id (/proc/sys/kernel/random/boot_id). [Open] discards a journal from
// another boot, and one with an unknown schema version, and starts clean;
// [Journal.Fresh] reports that and why. A file that is not a readable bbolt database is
// renamed to path+".corrupt-<unix time>" and the journal starts clean, so that the daemon
// still starts (and then revokes what it cannot account for). That includes a damaged page
// tree under valid meta pages, on which bbolt would panic in a goroutine of its own while
// rebuilding its free list: Open first reads every page of an existing file read-only, in
// its own goroutine with faults turned into panics, and treats a panic there as
// corruption. [Journal.Reset] drops all leases and events (for "drain") but keeps the boot
// id and LastSeq, so sequence numbers never go back within a boot.
//
// # Crash model
//
// The crash to survive is a crash of the process (kill -9, a panic, OOM kill, a watchdog
// abort), not a power loss: the file is on tmpfs and a power loss ends every lease
// anyway. So the journal opens bbolt with NoSync (and NoFreelistSync, NoGrowSync); no
// fdatasync is ever issued. That keeps every commit atomic and durable for a process
// crash, because:
//
//   - bbolt writes a commit with pwrite(2) into the page cache, never through its
//     read-only map: first the new, copy-on-write pages (never pages that the last
//     committed tree uses), then one meta page. A write that returned is in the
//     page cache, which belongs to the kernel and survives the process, and the next
//     open reads it back (on tmpfs the page cache is the file). NoSync only skips the
//     fdatasync calls between and after these writes, which order them for a disk, not
//     for the page cache: program order already does that for a process crash.
//   - The commit point is the meta page write. bbolt keeps two meta pages, writes
//     transaction n's meta to page n%2 and, when opening, uses the valid meta (magic,
//     version, checksum) with the highest txid. A crash before the meta write leaves the
//     previous meta and its intact tree in charge; a meta page torn by a crash in the
//     middle of its write fails its checksum and the other meta (the previous commit) is
//     used. (The in-flight commit may already have reused pages of the tree before the
//     last one, whose meta sits in the slot being written; that meta has the lower txid
//     and is never chosen while the last one is valid.) Either way the store is the
//     state after the last Commit that returned, or after the one in flight, never a
//     mixture.
//   - NoFreelistSync stores no free list: Open rebuilds it from the pages reachable from
//     the chosen meta, so a free list from an unfinished commit cannot exist.
//
// A test re-executes the test binary as a child that commits in a loop, SIGKILLs it at a
// random point and checks that LastSeq is the last seq whose Commit returned or the next
// one, never less, and that the file loads. If the file is ever moved to a disk file
// system, this reasoning does not cover power loss; the boot-id rule discards such a
// journal after the reboot anyway, and a torn file is moved aside.
//
// # Single instance
//
// bbolt holds an exclusive flock on the file while it is open. [Open] waits at most
// Options.Timeout (default one second) for it and then fails with [ErrLocked], so a
// second daemon on the same file fails fast with a clear error instead of corrupting it.
package journal
