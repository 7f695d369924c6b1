#!/bin/sh
# The mmiobroker demo, run inside the rig VM by the init (mmb.mode=demo) and printed on the
# host by `make demo` / `rig demo`. It shows a VMM's view of the broker: list the devices,
# lease the ivshmem BAR2 (1 MiB) as a dma-buf that another process receives, look at the
# fd, list the leases, revoke, and show the event stream. On the iommufd kernel the VMM
# also imports the fd into iommufd and sees the revoke kill the import.
#
# The init exports MMIOBROKER_VM_{EDU1,EDU2,IVSHMEM,TESTDEV,KERNEL}, all bound to vfio-pci.
#
# ---- adjust here when the CLI changes -------------------------------------------------
CONFIG=/etc/mmiobroker/mmiobrokerd.toml        # the daemon's default config path
DAEMON="mmiobrokerd -config $CONFIG"
CTL="mmiobrokerctl"                             # default socket /run/mmiobroker/control.sock
ALLOCATE="allocate -vm demo-vm -exec $MMIOBROKER_VM_IVSHMEM 2 --"  # whole BAR2; then COMMAND
LEASE_ID_VAR=MMIO_LEASE_ID                      # set by `allocate -exec` in COMMAND's env
# ----------------------------------------------------------------------------------------

step() { echo; echo "== $*"; }
show() { echo "\$ $*"; "$@"; }
die() { echo "demo: $*"; exit 1; }
dev=$MMIOBROKER_VM_IVSHMEM
[ -n "$dev" ] || die "no ivshmem device in the VM"

step "The VM: Linux $(uname -r) ($MMIOBROKER_VM_KERNEL kernel), devices bound to vfio-pci"
for b in $MMIOBROKER_VM_EDU1 $MMIOBROKER_VM_EDU2 $MMIOBROKER_VM_IVSHMEM $MMIOBROKER_VM_TESTDEV; do
	d=/sys/bus/pci/devices/$b
	drv=$(readlink "$d/driver"); grp=$(readlink "$d/iommu_group")
	echo "  $b  $(cat "$d/vendor"):$(cat "$d/device")  driver ${drv##*/}  iommu group ${grp##*/}"
done
if [ -c /dev/iommu ]; then
	echo "  /dev/iommu present: VFIO cdevs $(ls /dev/vfio/devices | tr '\n' ' ')(iommufd path)"
else
	echo "  no /dev/iommu (Debian's kernel has CONFIG_IOMMUFD off): VFIO group/container path"
fi

missing=
for p in mmiobrokerd mmiobrokerctl; do
	command -v $p >/dev/null || missing="$missing $p"
done
if [ -n "$missing" ]; then
	step "Cannot continue: missing from the guest image:$missing"
	echo "  The rig builds cmd/mmiobrokerd and cmd/mmiobrokerctl when they exist in the tree;"
	echo "  they do not exist (or did not compile) yet. Everything else is ready: the devices"
	echo "  above are bound to vfio-pci and waiting for the daemon."
	exit 3
fi

step "Start the broker"
mkdir -p "${CONFIG%/*}" /run/mmiobroker
cat >"$CONFIG" <<TOML
[daemon]
access_mode = "auto"
log_level = "info"

[[device]]
address = "$MMIOBROKER_VM_IVSHMEM"

[[device]]
address = "$MMIOBROKER_VM_EDU1"
TOML
show cat "$CONFIG"
echo "\$ $DAEMON &"
$DAEMON >/tmp/mmiobrokerd.log 2>&1 &
daemon=$!
# wait (bounded) until the control socket answers
i=0
until $CTL devices >/dev/null 2>&1; do
	kill -0 $daemon 2>/dev/null || { cat /tmp/mmiobrokerd.log; die "mmiobrokerd exited"; }
	i=$((i + 1))
	[ $i -lt 300 ] || { cat /tmp/mmiobrokerd.log; die "mmiobrokerd did not answer within 30 s"; }
	sleep 0.1
done
echo "  (mmiobrokerd pid $daemon is serving /run/mmiobroker/control.sock and fd.sock)"

$CTL watch >/tmp/events.txt 2>&1 &
watcher=$!

step "What a VMM sees: the devices"
show $CTL devices
show $CTL device "$dev"

step "Allocate a lease on $dev BAR2 (1 MiB); the dma-buf fd goes to a separate VMM process"
mkfifo /tmp/vmm.up /tmp/vmm.cue
cat >/tmp/vmm.sh <<'VMM'
# The "VMM": it inherited the lease's dma-buf as fd 3 from `mmiobrokerctl allocate -exec`.
say() { echo "  [vmm] $*"; }
say "pid $$ received fd 3: $(readlink /proc/$$/fd/3)"
env | grep '^MMIO_LEASE_' | sort | while read -r kv; do say "env $kv"; done
say "fdinfo of fd 3:"
sed 's/^/  [vmm]   /' /proc/$$/fdinfo/3
if [ -c /dev/iommu ] && command -v iommufd-import >/dev/null; then
	# import into iommufd, then report the lease id on vmm.up and wait for the cue
	exec iommufd-import -fd 3 -ready /tmp/vmm.up -ready-env "$LEASE_ID_VAR" -wait /tmp/vmm.cue
fi
eval "echo \"\$$LEASE_ID_VAR\"" >/tmp/vmm.up
read -r cue </tmp/vmm.cue
say "cue from the demo: $cue"
say "fd 3 is still open (a dma-buf cannot be taken from a process), but its exporter revoked it:"
sed 's/^/  [vmm]   /' /proc/$$/fdinfo/3
VMM
echo "\$ $CTL $ALLOCATE sh /tmp/vmm.sh &"
LEASE_ID_VAR=$LEASE_ID_VAR $CTL $ALLOCATE sh /tmp/vmm.sh &
alloc=$!
lease=$(timeout 30 cat /tmp/vmm.up) || die "the VMM process did not report its lease (allocate failed?)"
[ -n "$lease" ] || die "the VMM got no \$$LEASE_ID_VAR"

step "The leases"
show $CTL leases

step "Revoke lease $lease (memory decode off, device fd cycled: the dma-buf is dead for good)"
show $CTL revoke "$lease"
echo revoked >/tmp/vmm.cue
wait $alloc
show $CTL leases -all

step "The event stream (mmiobrokerctl watch, started before the allocation)"
i=0
until grep -qi revoked /tmp/events.txt; do
	i=$((i + 1))
	[ $i -lt 100 ] || break
	sleep 0.1
done
kill $watcher 2>/dev/null
cat /tmp/events.txt

step "Daemon log"
kill $daemon
wait $daemon
cat /tmp/mmiobrokerd.log
echo
echo "demo: done"
