// Package vmrig is mmiobroker's real-kernel test rig: it boots Linux guests in QEMU (TCG,
// q35, an emulated Intel IOMMU with interrupt remapping, two edu devices, an ivshmem-plain
// device whose BAR2 is a host file, and a pci-testdev), binds the devices to vfio-pci and
// runs the project's `vmtest` test binaries, its daemon and its CLI against them.
//
// The pieces, in the order a run uses them:
//
//   - [LoadEnv] reads rig.env, written by test/vm/setup.sh: the guest kernels ("stock",
//     Debian's own, and "iommufd", the same source with iommufd and the VFIO cdev built in)
//     and a static busybox.
//   - [BuildPayload] compiles static binaries of the [Programs] (the daemon, the CLI and the
//     rig's helpers), static gcc builds of the [CPrograms] (the C claim client of
//     examples/c, -Wall -Wextra -Werror) and a `go test -c -tags vmtest` binary for every
//     package that has a *_vm_test.go file (-tags vmsystemd and *_vmsd_test.go for the
//     systemd boot mode).
//   - [BuildImage] writes the initramfs (newc cpio, [CPIOWriter], compressed with zstd):
//     busybox, the init (guest/init.sh), the demo script (guest/demo.sh), the payload and, for
//     the modular stock kernel, the VFIO modules in modules.dep order ([ModuleDB]). Images are
//     cached by content hash.
//   - [Boot] runs QEMU. The kernel console goes to the first serial port; the init's
//     payload channel (markers and test output) goes to the second, so kernel messages
//     never split a test's output line. [GoTestParser] turns each binary's -test.v output
//     into [TestCase] results; a kernel panic, a hang or a missing result is a failure, and
//     [Outcome.InfraFailure] tells a guest that never got to run anything from a test
//     failure.
//   - Boot mode [Systemd] instead boots real systemd (setup.sh's Debian trixie rootfs) as
//     PID 1: [BuildSystemdImage] appends the payload, deploy/'s units and the rig's units
//     (guest/systemd: mmb-vfio-bind.service binds the devices, mmb-rig.service runs the
//     `vmsystemd` binaries, *_vmsd_test.go) to that rootfs archive. The markers on the
//     payload channel are the same, so everything below applies to both modes.
//   - [Rig] glues it together, with one retry on infrastructure failure and the serial
//     logs kept under bin/vm-logs.
package vmrig
