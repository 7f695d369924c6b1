// Package host reports what this host offers a VMM that wants brokered MMIO: the kernel
// release, one [Probe] per kernel feature the broker or its clients depend on (each with
// its answer, and the reason when the feature is absent), the VM types KVM creates, and the
// TEE security managers (TSMs) registered under /sys/class/tsm. It is what GetHost
// answers, so that an orchestrator can tell a host that can run a VM with brokered (or,
// one day, private) MMIO from one that cannot, and an operator can see why.
//
// # Probes
//
// [Prober.Report] makes these probes, in this order (the names are stable API):
//
//   - vfio: the VFIO container (<dev>/vfio/vfio, CONFIG_VFIO_CONTAINER) with a type1
//     IOMMU backend: the group/container access path.
//   - vfio_cdev: VFIO device cdevs (<dev>/vfio/devices/vfioN, CONFIG_VFIO_DEVICE_CDEV),
//     seen in sysfs (/sys/class/vfio-dev/vfioN/dev) and in the dev root.
//   - iommufd: <dev>/iommu opens (CONFIG_IOMMUFD): the cdev access path and the importer
//     of brokered dma-bufs (IOMMU_IOAS_MAP_FILE).
//   - dma_buf_export: VFIO_DEVICE_FEATURE_DMA_BUF (Linux 6.19+), from the configured devices
//     the daemon holds open ([Device.DMABuf]); without one, from the kernel config
//     (CONFIG_VFIO_PCI_DMABUF).
//   - dma_buf_revoke: per-buffer revoke (VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE, proposed, not in
//     Linux 7.2), from the open devices ([Device.RevokeBuffers]). Without it a revoke cycles
//     the whole device.
//   - p2pdma: CONFIG_PCI_P2PDMA. Nothing in sysfs shows it for every device (p2pmem/ appears
//     only under devices that publish peer memory), so it is read from the kernel config
//     (/proc/config.gz, else /boot/config-<release>); without one it follows from a device
//     that exports dma-bufs (CONFIG_VFIO_PCI_DMABUF is "def_bool y if VFIO_PCI_CORE &&
//     PCI_P2PDMA && DMA_SHARED_BUFFER", drivers/vfio/pci/Kconfig); failing that, from
//     p2pdma's symbols in /proc/kallsyms (pci_p2pdma_add_resource; drivers/pci/p2pdma.c
//     is built only with the option, and kallsyms lists names even to unprivileged
//     readers).
//   - kvm: <dev>/kvm is KVM (internal/kvm), followed by one probe per check internal/kvm
//     makes, named "kvm." and the check's name: kvm.api_version, kvm.vm_types,
//     kvm.user_memory2, kvm.guest_memfd, kvm.guest_memfd_flags, kvm.memory_attributes,
//     kvm.vfio_device. KVM's answers are reused for [Options.KVMMaxAge]: the probe creates
//     a VM, which callers should not be able to make the daemon do at will.
//   - tsm: a TSM is registered (/sys/class/tsm/tsmN, CONFIG_TSM; Linux 6.19+).
//   - private_mmio: the verdict for a confidential VM that needs private MMIO: a TSM is
//     registered, KVM creates a confidential VM type (snp or tdx), and a configured device
//     that allows private leases is TSM-bound (its TDI LOCKED or RUN), which is what an
//     attested private lease needs. Linux 7.2 binds no TDI (docs/kernel.md §7.2), so it
//     is absent there, with the missing parts as its reason.
//
// A probe that is absent says why in a sentence an operator can act on; when a syscall
// failed, the errno's name ends it ("(ENOENT)"). A node missing from the dev root while
// sysfs shows the kernel has it (a daemon in a private /dev) is reported as such, not as a
// kernel without the feature.
//
// # Paths
//
// Every path is injectable ([Options]: sysfs, dev, proc and boot roots), so tests run on
// fake trees. Nothing is written; the only fds opened are <dev>/iommu and <dev>/kvm (and
// the VM internal/kvm creates), each closed before the probe returns.
package host
