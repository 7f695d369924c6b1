// Package dravm holds the VM rig's end-to-end test of the DRA kubelet plugin
// (internal/dra): the guest's real mmiobrokerd, the plugin in the test process, a pod's
// cgroup, and a "container" whose VMM, an unprivileged uid as KubeVirt's, claims the fd
// from the CDI spec alone (its environment and mounts, and the claim socket's group as a
// supplementary group) and does a P2P DMA through it (dravm_vm_test.go, build tag vmtest;
// test/vm runs it in the guest). It is a
// package of its own so that its guest binary links only the plugin and a small fake API
// server, not the host tests' daemon wiring: the rig's guest holds every test binary in
// RAM.
package dravm
