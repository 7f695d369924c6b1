// Package dra is mmiobroker's Kubernetes DRA kubelet plugin (driver mmio.mmiobroker.dev),
// built on k8s.io/dynamic-resource-allocation's kubeletplugin and resourceslice helpers.
// cmd/mmiobroker-dra is its thin main; docs/kubernetes.md describes the whole flow for
// operators.
//
// The plugin talks to mmiobrokerd only through its gRPC control API, as an admin of the
// daemon; it never opens a VFIO device, a dma-buf or the claim socket itself (the daemon
// stays their only owner). It reads the host's sysfs (read-only) for the two device
// attributes the daemon does not report: the NUMA node and the PCIe root.
//
// # Devices
//
// Every (device, BAR) the daemon may lease — a memory BAR of a configured device that its
// policy allows — is one DRA device of the node's pool (named after the node), or, with a
// [Partition], N devices of one equal range each. [DeviceName] names them
// (0000-3b-00-0-bar2, 0000-3b-00-0-bar2-p1of4). Their attributes (the Attr* constants, in
// the driver's domain, and resource.kubernetes.io/pciBusID, pcieRoot and numaNode) and
// their capacity "size" are what a DeviceClass or a claim selects with CEL. A device is
// published while the daemon can grant leases of it (usable, exporting dma-bufs, not
// suspended) and withdrawn otherwise (lost, failed to open, suspended): the scheduler
// must not place new pods on it. The devices are listed every Resync and whenever the
// daemon's event stream reports a device event (DEVICE_LOST, SUSPENDED, RESUMED, a
// private lease ended by a TSM unbind); a TSM state change without leases shows at the
// next Resync. While the daemon does not answer, the published devices stay (a
// restarting daemon keeps its leases).
//
// # Health
//
// DRA v0.37 reports device health to the kubelet over its DRAResourceHealth service
// ([Driver.WatchHealthStatus]); the kubelet shows it in the status of the pods that use
// the device. Every device of every leasable BAR the daemon lists is reported, published
// or not: Unhealthy when it is lost, failed, suspended, cannot export dma-bufs or raised
// errors (AER) since the daemon opened it, Healthy otherwise, Unknown while the daemon
// does not answer. Reports are re-sent after every device list, well within the
// kubelet's HealthCheckTimeout.
//
// # Preparing a claim: delegated leases
//
// [Driver.PrepareResourceClaims] gives each device of this driver allocated to a claim a
// delegated lease: AllocateLease with claimant {pod_uid} — the one pod in the claim's
// status.reservedFor — and the labels resource.kubernetes.io/claim-uid (the claim's uid),
// mmio.mmiobroker.dev/request, /device and /claim. The daemon lets only a process in that
// pod's cgroup claim the fd, and that process becomes the lease's holder. Then it writes
// one CDI spec per claim, CDISpecPath (<cdi dir>/mmio.mmiobroker.dev-<claim uid>.json,
// mode 0600), with one CDI device per DRA device, CDIDeviceID
// (mmio.mmiobroker.dev/bar=<claim uid>-<device>), whose edits bind-mount the daemon's claim
// socket into the container (read-only, at [Options].ClaimSocketContainer), add the
// socket's group as a supplementary group when group members may connect to it (the
// shipped units make it root:mmiobroker 0660; KubeVirt's QEMU runs as uid 107), and set
//
//	MMIO_CLAIM_SOCKET               the claim socket in the container
//	MMIO_LEASE_ID_<S>               the lease id        (S: EnvSuffix of the device name,
//	MMIO_CLAIM_TOKEN_<S>            its claim token      e.g. 0000_3B_00_0_BAR2)
//	MMIO_BDF_<S>, MMIO_BAR_<S>      the device and BAR
//	MMIO_OFFSET_<S>, MMIO_SIZE_<S>  the range of the BAR the lease covers
//	MMIO_REQUEST_<S>                the claim's request the device was allocated for
//	MMIO_LEASE_ID, MMIO_CLAIM_TOKEN only in a claim with exactly one device of this driver
//
// The CDI types are the CDI project's own (tags.cncf.io/container-device-interface/
// specs-go), which k8s.io/dynamic-resource-allocation already depends on.
//
// # Idempotency and restarts: no state of the plugin's own
//
// A claim token is returned once, at allocation; the daemon keeps no copy a client can
// read. The CDI spec file is therefore where the plugin keeps it, and the file plus the
// daemon's leases (ListLeases by the claim-uid label) are all the state there is. A
// prepare lists the claim's live leases and reads its spec: a lease that matches a device
// of the claim (device, request, range, kind, pod) is kept if the spec holds its token or
// the pod has claimed it already (ACTIVE: its token is spent, the spec is rewritten
// without one, and the running VMM keeps its fd); any other lease of the claim is
// released (an unclaimed lease whose token is lost — a prepare that failed before writing
// the spec, a deleted spec — or one for another pod or device); missing leases are
// allocated; the spec is rewritten with all of them. So a repeated prepare
// (kubelet retry or restart, plugin restart) returns the same CDI devices with the same
// leases and tokens, and a prepare that fails releases the leases it allocated and
// leaves no spec. A delegated lease's token stays valid until it is claimed, across
// reissues, and a claimed lease stays with its holder: the spec is right for the
// container that claims it either way.
//
// [Driver.UnprepareResourceClaims] releases every live lease labelled with the claim's
// uid (ReleaseLease: its fd dies within the daemon's revoke_within R, or at once if it
// was never claimed) and deletes the spec; leases that ended already (the pod's VMM
// exited: HOLDER_EXITED) are not listed. A claim with nothing left is unprepared.
//
// # Fd lifetime
//
// The plugin never holds a lease's fd. The fd lives in the pod's VMM, which claimed it:
// it ends with the VMM (the daemon sees the holder exit), with the unprepare (release),
// or when the daemon revokes it (admin revoke, device lost, TSM unbind). A claim token is
// single use: a VMM that restarts inside a running pod (container restart) cannot claim
// the lease again — its old holder's exit ended it — until the pod is prepared anew.
package dra
