// Package tenant decides which tenant a peer of the daemon belongs to.
//
// On real hosts every VMM runs as one uid (libvirt's qemu user, KubeVirt's uid 107), so
// the uid alone lumps all VMs of a host into one tenant. A [Resolver] makes the tenant
// finer, in one of three [Mode]s:
//
//   - [ByUID]: the peer's uid, as before.
//   - [ByCgroup] (the default): the peer's cgroup unit when it runs in one, a VM's or a
//     pod's own cgroup (see [Unit]); the uid alone when it does not.
//   - [ByLabel]: the peer's LSM label ([PeerLabel], SO_PEERSEC), as sVirt gives each VM of
//     one uid its own MCS categories; peers without a label fall back to the ByCgroup
//     identity (see [Resolver.Resolve]).
//
// # Identities
//
// An [ID] is a canonical string that always names the uid first and at most one finer key
// after it:
//
//	uid=107
//	uid=107,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope
//	uid=107,label=system_u:system_r:svirt_t:s0:c10,c20
//
// The "\x2d" above is systemd's own escaping inside the unit name: the four characters are
// part of the cgroup path and of the ID, and the package escapes nothing. The value runs to
// the end of the string, so commas and '=' in paths and labels (MCS category lists) are
// unambiguous. Two peers are the same tenant exactly when their IDs are equal (==); a
// cgroup identity never equals a label identity or a bare uid, and identities of
// different uids never equal each other. [ParseID] validates stored IDs (the journal);
// [ForUID] builds the bare-uid identity of earlier releases.
//
// # Units
//
// A unit is a cgroup that belongs to one VM or pod; every process in it or below it is
// the same tenant. [Unit] recognises, outermost first:
//
//   - the direct children of configured parents ([Resolver.Units], by default
//     [DefaultUnits]: /machine.slice, where libvirt, systemd-machined and systemd-nspawn
//     put VMs and containers);
//   - Kubernetes pods, without configuration: the pod slice of the systemd cgroup driver
//     (…/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice, and the
//     besteffort and guaranteed variants) and the pod directory of the cgroupfs driver
//     (…/kubepods/burstable/pod<uid>), also below a prefix (kind, containerized kubelets,
//     --cgroup-root), where only the first kubepods component of the path counts.
//
// When both kinds match, the unit nearer the root wins: nothing a process does inside its
// unit (creating sub-cgroups named like pods or like configured parents) can split it off
// its unit's tenant.
//
// # Why the identities can be trusted
//
// uid: SO_PEERCRED, set by the kernel at connect(2).
//
// cgroup: a process moves between cgroups by writing a pid to the destination's
// cgroup.procs. Under cgroup v2 a writer whose euid is not 0 needs write access to that
// file and to the cgroup.procs of the common ancestor of source and destination
// (Documentation/admin-guide/cgroup-v2.rst, "Delegation Containment"); with the usual
// permissions a CAP_DAC_OVERRIDE-less process cannot leave a subtree not delegated to it.
// The cgroup.procs files of /machine.slice, of a VM's scope and of /kubepods.slice are
// root's, so an unprivileged VMM cannot enter another VM's scope or pod, nor leave its
// own. (Delegated subtrees, such as a user's user@.service, let their owner move processes
// inside them and create cgroups named like units there. Such a process can split itself
// into several tenants of its own uid, never join another uid's tenant or a unit outside
// its subtree: the ID carries the uid and the full unit path. Quotas that must bound a
// uid should count per [ID.UID] as well.)
//
// The cgroup is read from /proc/<pid>/cgroup when the tenant is resolved, not at connect
// time; a root-owned unit boundary makes that difference moot for unprivileged peers.
// A pid can be reused once its process has been reaped, so the pid must name the pinned
// peer: the caller pins the peer with a pidfd (SO_PEERPIDFD, peercred.FromConn) before
// the read and checks after the read that the pidfd still reports the process alive. If
// it does, the process was alive throughout, the pid was still its own, and the cgroup
// read is the peer's; if it does not, a reused pid may have been read and the result is
// discarded. [Resolver.ResolveProcess] does exactly that for any [Process]
// (*peercred.Process is one); callers of [Resolver.Resolve] with a bare pid own the check.
// The peer's threads may sit in threaded sub-cgroups (qemu's vcpuN below libvirt's
// emulator); /proc/<pid>/cgroup names the thread-group leader's, in the same unit.
//
// label: SO_PEERSEC returns the label the LSM gave the peer's socket when it was created
// and connected (SELinux: the creating process's context, or the setsockcreatecon(3)
// context where policy allows it); a later change of the process's label does not change
// it. sVirt gives each VM's qemu distinct MCS categories, and policy keeps svirt_t from
// changing them. An empty label means no LSM labels the socket (ENOPROTOOPT); such peers
// get the ByCgroup identity, which cannot equal any label identity.
//
// # Deployment requirements
//
// The daemon must see cgroup paths from the init cgroup namespace and /proc of its own pid
// namespace with other users' processes visible: systemd's ProtectControlGroups=private
// (a cgroup namespace of its own) makes other units' paths start with "/..", and
// ProtectProc=invisible or hidepid hide the peers' /proc entries. Resolve refuses such
// paths and unreadable entries rather than fall back to the coarser uid identity. ByCgroup
// needs the unified (v2) hierarchy, mounted alone or in hybrid mode; on a v1-only host
// ReadCgroup fails with errdefs.ErrNotSupported.
//
// An ID names a unit, not one run of it: a VM started again in a scope of the same name
// is the same tenant (libvirt's scope names hold the domain's numeric id, which can
// repeat). Kubernetes pod uids are not reused.
//
// # Examples
//
// libvirt (qemu user uid 107, default configuration, ByCgroup): the qemu process of
// domain vm1, in /machine.slice/machine-qemu\x2d3\x2dvm1.scope/libvirt/emulator, is
//
//	uid=107,cgroup=/machine.slice/machine-qemu\x2d3\x2dvm1.scope
//
// and the qemu of vm2 is another tenant. With SELinux sVirt and ByLabel the same process is
//
//	uid=107,label=system_u:system_r:svirt_t:s0:c10,c20
//
// An operator's shell (uid 0, /user.slice/user-0.slice/session-3.scope) is "uid=0".
//
// KubeVirt (virt-launcher's qemu as uid 107, systemd cgroup driver): the compute container
// of pod 6f1c0d4e-…, in
// /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c0d4e_….slice/cri-containerd-<id>.scope,
// is
//
//	uid=107,cgroup=/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c0d4e_….slice
//
// and with the cgroupfs driver uid=107,cgroup=/kubepods/burstable/pod6f1c0d4e-…. Every
// container of the pod (and qemu's housekeeping sub-cgroup) is that one tenant.
//
// # Files
//
// The package holds no file descriptors. [ReadCgroup] opens <procRoot>/<pid>/cgroup
// (O_CLOEXEC) and closes it before it returns; [PeerLabel] borrows the socket through its
// syscall.RawConn and does not keep it.
package tenant
