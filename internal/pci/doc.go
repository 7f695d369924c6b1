// Package pci discovers PCI devices through sysfs: bus/device/function addresses, the
// vendor/device/class identity, the bound driver, the IOMMU group, the VFIO device object
// (and its character device when the kernel has VFIO cdev support), the BAR layout from the
// "resource" file, and the PCI TSM (TDISP link) state.
//
// All lookups go through [Sysfs], whose Root defaults to "/sys"; tests point it at a fake
// tree under t.TempDir() (see package pcitest). A [Device] is a snapshot: it is read once
// and never refreshed, so re-read it when the answer matters (TSM state, driver).
//
// [Sysfs.BindVFIO] and [Sysfs.RestoreDriver] implement "managed binding": the
// driver_override dance that moves a device to vfio-pci and back, as the kernel's
// tools/testing/selftests/vfio/scripts/setup.sh and cleanup.sh do. They change system
// state and need root.
//
// The package opens no long-lived file descriptors; every read is open-read-close.
package pci
