// Package broker is mmiobroker's domain: the configured devices, the leases of their BAR
// ranges, the policy that decides who may lease what, revocation, and the event stream.
//
// The broker makes no system calls. It reaches the kernel only through the small
// [Device] and [Buffer] interfaces (implemented for real VFIO devices by internal/hostdev
// and in memory by internal/broker/brokertest) and learns about client processes through
// [Process].
//
// # Leases
//
// A lease grants one holder a dma-buf covering 1–16 page-aligned ranges of one memory BAR of
// one device. Its life:
//
//	allocated ──claim──▶ active ──▶ revoked | released
//	    └──── claim token expires ────▶ released (reason claim_expired)
//
// Allocation exports the dma-buf at once (named after the lease with DMA_BUF_SET_NAME) and
// returns a single-use claim token. The holder presents the token on the claim socket
// (internal/fdpass) from the same process that allocated, and receives a duplicate of the
// fd. The broker keeps its own copy until the lease ends.
//
// # Revocation
//
// Linux 7.2 has no per-buffer revoke: a device's dma-bufs die together. Revoking one lease
// therefore revokes every dma-buf of its device (memory decode off, device fd closed and
// reopened, memory decode on; see [Device.Revoke]) and then re-exports the device's other
// live leases as a new generation. Their holders get a reissued event carrying a new claim
// token and claim the new fd; the old one is dead for good.
//
// Releasing a lease ends it without touching the device: the broker closes its copy and
// the holder is expected to close its own.
//
// # Ownership
//
// All lease and device state is owned by one [Broker] value, guarded by one mutex; kernel
// operations on one device are serialized by that device's own lock. The broker owns every
// [Buffer], every [Device] it opened, and the [Process] of every holder it accepted, and
// closes them when the lease, or the broker, ends.
package broker
