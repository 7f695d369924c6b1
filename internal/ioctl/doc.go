// Package ioctl is mmiobroker's single door to ioctl(2).
//
// It has two halves:
//
//   - The request-number encoding of include/uapi/asm-generic/ioctl.h ([IO], [IOR], [IOW],
//     [IOWR] and the underlying [IOC]), as used on x86_64 and arm64. VFIO and iommufd use
//     plain _IO numbers (the argument carries its own argsz/size field); dma-buf and KVM
//     encode the argument size.
//   - The call itself: [Ioctl] for a pointer to a mirrored struct, [Value] for an integer
//     argument, [Bytes] for a variable-length request built in a byte slice. All three reach
//     the descriptor through syscall.Conn (RawConn.Control), never through os.File.Fd, so
//     the file stays in non-blocking mode and cannot be closed underneath the call. They
//     retry EINTR and return errors made by os.NewSyscallError("ioctl NAME", errno), so
//     errors.Is(err, unix.ENOTTY) keeps working through any amount of wrapping.
//
// [WithFD] runs a function while a second file's descriptor number is pinned, for requests
// whose argument names another fd (VFIO_GROUP_SET_CONTAINER, VFIO_DEVICE_BIND_IOMMUFD,
// IOMMU_IOAS_MAP_FILE).
//
// The package owns no descriptors.
package ioctl
