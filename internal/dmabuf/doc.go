// Package dmabuf wraps one dma-buf file descriptor: its identity (the inode number, unique
// per dma-buf for the whole boot), its size, its name (DMA_BUF_SET_NAME) and what the kernel
// reports about it in /proc/PID/fdinfo.
//
// # File descriptor lifetime
//
// A [Buffer] owns exactly one descriptor, taken over by [New]. [Buffer.File] lends it out
// (valid until Close); [Buffer.Dup] makes an independent O_CLOEXEC descriptor of the same
// open file description, for sending with SCM_RIGHTS, which the caller owns and closes;
// [Buffer.Disown] hands the descriptor itself over (e.g. to the systemd fd store).
// [Buffer.Close] is idempotent. Every descriptor of a dma-buf, in any process, is a
// reference to the same struct file; the buffer lives until the last one is closed.
//
// # Revocation
//
// Closing the daemon's copy revokes nothing: a client that received a dup keeps the
// dma-buf, and an importer that mapped it (iommufd IOMMU_IOAS_MAP_FILE) keeps its mapping.
// Revocation of a vfio-pci dma-buf is device-wide and done through the VFIO device fd
// (memory decode off, reset, or the last close of the device fd), never through this
// package (docs/kernel.md §3.4); Linux 7.2 has no per-dma-buf revoke.
package dmabuf
