// Package kvm reads the KVM facts a broker and its clients need, from /dev/kvm with ioctls
// (include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h, Linux 7.2).
//
// [Probe] opens the device node, checks KVM_GET_API_VERSION (12), asks
// KVM_CHECK_EXTENSION on the system fd about KVM_CAP_VM_TYPES (which VM types
// KVM_CREATE_VM accepts: default, SEV, SNP, TDX, …), KVM_CAP_USER_MEMORY2,
// KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS and KVM_CAP_MEMORY_ATTRIBUTES, and
// creates one short-lived default VM to ask KVM_CREATE_DEVICE, with KVM_CREATE_DEVICE_TEST,
// whether the kvm-vfio pseudo device exists. It returns [Facts]: typed answers plus one
// [Check] per probe with its value, and the reason when the feature is absent, for the
// daemon to report as they are. The system-wide answers are the most KVM supports for any
// VM type (kvm_vm_ioctl_check_extension_generic with no VM); a VM of one type may support
// less, which its VMM asks on its own VM fd.
//
// # Why the broker only reports
//
// The broker cannot act on a client's VM, even holding its fds. Every ioctl on a VM fd,
// vCPU fd or KVM device fd starts with
//
//	if (kvm->mm != current->mm || kvm->vm_dead)
//		return -EIO;
//
// in kvm_vm_ioctl (virt/kvm/kvm_main.c:5177 in Linux 7.2.13), kvm_vm_compat_ioctl
// (:5441), kvm_vcpu_ioctl (:4437) and kvm_device_ioctl (:4752): only the process whose
// address space created the VM may drive it. A VM fd passed to the broker over SCM_RIGHTS
// answers every request — KVM_SET_USER_MEMORY_REGION2, KVM_CREATE_DEVICE, and
// KVM_SET_DEVICE_ATTR on the kvm-vfio device — with EIO. Only the system ioctls on
// /dev/kvm itself (kvm_dev_ioctl, :5545) have no such check, and a VM the broker creates
// is its own. So the broker reports facts, and the VMM does the KVM work in its own
// process: it maps BAR MMIO into the guest by mmap()ing the VFIO device fd at the region
// offset and passing that address to KVM_SET_USER_MEMORY_REGION(2), and it adds its VFIO
// group or device fd to its VM's kvm-vfio device (KVM_SET_DEVICE_ATTR, KVM_DEV_VFIO_FILE
// ADD; for a VFIO cdev before VFIO_DEVICE_BIND_IOMMUFD). kvm-vfio takes only VFIO files
// (EINVAL otherwise), and in Linux 7.2 no memslot takes a dma-buf: check_memory_region_flags
// (kvm_main.c:1573) rejects any flag but LOG_DIRTY_PAGES, READONLY and GUEST_MEMFD with
// EINVAL, and guest_memfd holds only page-allocator memory. A brokered dma-buf therefore
// reaches IOMMUs (iommufd IOMMU_IOAS_MAP_FILE), not guests, on 7.2.
//
// # What dma-buf memslots would add
//
// The seed RFC is Xu Yilun's "[RFC PATCH 00/12] Private MMIO support for private assigned
// dev" (2025-01-07, lore Message-Id 20250107142719.179636-1-yilun.xu@linux.intel.com),
// reposted as patch 07/30 "KVM: Support vfio_dmabuf backed MMIO region" of the May 2025
// TDISP host series (20250529053513.1592088-8-yilun.xu@linux.intel.com). It adds
// KVM_MEM_VFIO_DMABUF (flag bit 3) to KVM_SET_USER_MEMORY_REGION2, with the dma-buf fd in
// the guest_memfd field and guest_memfd_offset 0: KVM attaches to the vfio-pci dma-buf as
// a dynamic importer, takes the PFNs of the BAR from the exporter
// (dma_buf_get_pfn_unlocked, a new kAPI) instead of from a host mapping, and zaps the
// guest's mappings when the exporter revokes (move_notify). The memslot needs no host
// mapping at all, so it may become private (Secure EPT for a TDISP device's MMIO, which
// the host must never touch); the RFC accepts the flag only in VMs with private memory
// (kvm_arch_has_private_mem). None of it is merged in Linux 7.2. Where a kernel has it, a
// VMM could put a leased BAR range into its guest from the brokered dma-buf alone, without
// the VFIO device fd, and the broker's revocation (memory decode off, reset, device close)
// would reach the guest through the importer's invalidation. The VMM would still make
// that ioctl itself (the mm rule above does not change); this package would grow a check
// for the kernel's capability then.
//
// # Descriptor lifetime
//
// Probe owns every fd it opens (/dev/kvm, the VM) and closes them before returning; the
// KVM_CREATE_DEVICE_TEST probe creates no device fd. Creating and destroying the VM makes
// the kernel send KVM's create and destroy uevents (kvm_uevent_notify_change) and, with
// kvm.enable_virt_at_load=0, briefly turns hardware virtualization on.
//
// # Errors
//
// Errors are *[Error] values naming the device node and operation
// ("kvm /dev/kvm: open: …"). They keep the errno (errors.Is(err, unix.ENOENT)) and match
// exactly one errdefs class: a missing node is errdefs.ErrNotSupported, a node this
// process may not open errdefs.ErrPermissionDenied, a file that is not KVM (ENOTTY)
// errdefs.ErrNotSupported.
package kvm
