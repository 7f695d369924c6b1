#!/bin/sh
# /usr/lib/mmb/vfio-bind.sh — mmb-vfio-bind.service of the systemd guest (boot mode
# "systemd"). It does what guest/init.sh does before its tests: loads the stock kernel's
# VFIO modules (listed in load order in /etc/mmb/modules by the host), writes the ivshmem
# nonce, binds every edu, ivshmem, pci-testdev and e1000e to vfio-pci, and prints the same
# markers on the payload channel (see guest/init.sh). It also writes
#   /run/mmb/vm.env                      MMIOBROKER_VM_* for the runner (mmb-rig.service)
#   /etc/mmiobroker/mmiobrokerd.toml     the daemon's configuration: the rig's devices
# A failed check is reported (and /run/mmb/failed created), never an exit status: the
# runner must still run and power the VM off.

KERNEL= TOPOLOGY= NONCE= OUT=console
set -f
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	mmb.out=*) OUT=${kv#*=} ;;
	mmb.kernel=*) KERNEL=${kv#*=} ;;
	mmb.topology=*) TOPOLOGY=${kv#*=} ;;
	mmb.nonce=*) NONCE=${kv#*=} ;;
	esac
done
set +f
mkdir -p /run/mmb
if [ "$OUT" = ttyS1 ] && [ -c /dev/ttyS1 ]; then
	stty -F /dev/ttyS1 raw -echo 2>/dev/null
	exec </dev/null >/dev/ttyS1 2>&1
fi

up() { read -r u _ </proc/uptime; echo "$u"; }
mark() { echo "MMB-RIG: $*"; }
check() { # check NAME ok|fail|skip DETAIL...
	[ "$2" = fail ] && : >/run/mmb/failed
	mark "check $*"
}
# when PID 1 (systemd) started, in seconds since boot: the "/init" time of this boot mode
pid1=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", $22 / hz }' /proc/1/stat)
mark "init kernel=$(uname -r) uptime=$(up) pid1=$pid1 boot=systemd"

# --- modules (stock kernel) ------------------------------------------------------------------
mods=$(cat /etc/mmb/modules 2>/dev/null)
if [ -n "$mods" ]; then
	bad=
	for m in $mods; do
		[ -e "/sys/module/$(echo "$m" | tr - _)" ] && continue
		out=$(insmod "/usr/lib/mmb/modules/$m.ko" 2>&1) || bad="$bad $m($out)"
	done
	if [ -z "$bad" ]; then
		check modules ok "loaded:" $mods
	else
		check modules fail "insmod failed:$bad"
	fi
else
	check modules skip "no modules to load (built-in kernel)"
fi

# --- devices -----------------------------------------------------------------------------------
EDU1= EDU2= IVSHMEM= TESTDEV= PCIE= DEVS= nedu=0
for d in /sys/bus/pci/devices/*; do
	b=${d##*/}
	case "$(cat "$d/vendor"):$(cat "$d/device")" in
	0x1234:0x11e8)
		nedu=$((nedu + 1))
		[ $nedu = 1 ] && EDU1=$b
		[ $nedu = 2 ] && EDU2=$b
		;;
	0x1af4:0x1110) [ -z "$IVSHMEM" ] && IVSHMEM=$b ;;
	0x1b36:0x0005) [ -z "$TESTDEV" ] && TESTDEV=$b ;;
	0x8086:0x10d3) [ -z "$PCIE" ] && PCIE=$b ;;
	*) continue ;;
	esac
	DEVS="$DEVS $b"
done
if [ -n "$EDU1" ] && [ -n "$EDU2" ] && [ -n "$IVSHMEM" ] && [ -n "$TESTDEV" ] && [ -n "$PCIE" ]; then
	check devices ok "edu $EDU1 $EDU2, ivshmem $IVSHMEM, pci-testdev $TESTDEV, e1000e (PCIe) $PCIE"
else
	check devices fail "want 2 edu, ivshmem, pci-testdev, e1000e; found edu '$EDU1' '$EDU2', ivshmem '$IVSHMEM', pci-testdev '$TESTDEV', e1000e '$PCIE'"
fi

# The nonce goes into ivshmem BAR2 through /dev/mem while no driver owns the device.
if [ -n "$NONCE" ] && [ -n "$IVSHMEM" ]; then
	d=/sys/bus/pci/devices/$IVSHMEM
	bar2=$(sed -n 3p "$d/resource" | cut -d' ' -f1)
	if [ -n "$bar2" ] && [ $((bar2)) -ne 0 ] && echo 1 >"$d/enable" 2>/dev/null; then
		if busybox devmem $((bar2 + 0xff000)) 32 "0x$NONCE" 2>/dev/null; then
			check ivshmem-write ok "wrote 0x$NONCE at BAR2 ($bar2) + 0xff000"
		else
			check ivshmem-write fail "devmem write to BAR2 ($bar2) + 0xff000 failed"
		fi
		echo 0 >"$d/enable"
	else
		check ivshmem-write fail "cannot enable $IVSHMEM or BAR2 is unassigned ($bar2)"
	fi
fi

for b in $DEVS; do
	d=/sys/bus/pci/devices/$b
	echo vfio-pci >"$d/driver_override"
	[ -e "$d/driver" ] && echo "$b" >"$d/driver/unbind"
	echo "$b" >/sys/bus/pci/drivers_probe 2>/dev/null
	drv=$(readlink "$d/driver"); drv=${drv##*/}
	grp=$(readlink "$d/iommu_group"); grp=${grp##*/}
	rm=$(cat "$d/reset_method" 2>/dev/null)
	vdev=$(ls "$d/vfio-dev" 2>/dev/null)
	if [ "$drv" = vfio-pci ] && [ -n "$grp" ]; then
		check "bind-$b" ok "driver=vfio-pci iommu_group=$grp reset_method='$rm' vfio-dev='$vdev'"
	else
		check "bind-$b" fail "driver='$drv' iommu_group='$grp' (want vfio-pci with an IOMMU group)"
	fi
	if [ "$TOPOLOGY" = rootport ]; then
		case " $rm " in
		*" bus "*) check "reset-$b" ok "reset_method='$rm'" ;;
		*) check "reset-$b" fail "reset_method='$rm': no bus reset behind the root port, VFIO_DEVICE_RESET will fail" ;;
		esac
	fi
done

if [ "$KERNEL" = iommufd ]; then
	if [ -c /dev/iommu ] && [ -n "$(ls /dev/vfio/devices 2>/dev/null)" ]; then
		check iommufd ok "/dev/iommu and /dev/vfio/devices/: $(ls /dev/vfio/devices | tr '\n' ' ')"
	else
		check iommufd fail "/dev/iommu or /dev/vfio/devices/vfioN missing"
	fi
fi

# --- the runner's environment and the daemon's configuration ---------------------------------
{
	for v in EDU1=$EDU1 EDU2=$EDU2 IVSHMEM=$IVSHMEM TESTDEV=$TESTDEV PCIE=$PCIE KERNEL=$KERNEL TOPOLOGY=$TOPOLOGY BOOT=systemd; do
		echo "MMIOBROKER_VM_$v"
	done
} >/run/mmb/vm.env
mkdir -p /etc/mmiobroker
# The sockets come from deploy/mmiobrokerd{,-claim}.socket (mode 0660, group mmiobroker);
# root, which runs the guest tests, is an administrator. uid 1000 may lease every device.
cat >/etc/mmiobroker/mmiobrokerd.toml <<TOML
# written by the mmiobroker rig (mmb-vfio-bind.service)
[daemon]
control_socket = "/run/mmiobroker/control.sock"
claim_socket = "/run/mmiobroker/fd.sock"
log_level = "debug"

[limits]
claim_timeout = "20s"
# Released leases stay ended-but-live for an hour and tenants' cycles are not rate-limited:
# the restart tests and the soak count every reissue of a holder's lease as a revocation,
# so only admins' revokes and the 1024-per-device cap cycle devices here. Ended-but-live
# leases count against the holder's limits, hence the raised limits. The bounds R and C
# have their own test with their own daemon configuration.
revoke_within = "1h"
tenant_cycle_interval = "0s"
min_ttl = "0s"
max_leases_per_holder = 16384
max_leases = 16384

[[device]]
address = "$EDU1"
allow_uids = [1000]

[[device]]
address = "$EDU2"
allow_uids = [1000]

[[device]]
address = "$IVSHMEM"
bars = [2]
kinds = ["shared", "private"]
allow_uids = [1000]
allow_unattested_private = true

[[device]]
address = "$TESTDEV"
allow_uids = [1000]

[[device]]
address = "$PCIE"
allow_uids = [1000]
TOML
while read -r kv; do
	mark "env $kv"
done </run/mmb/vm.env
exit 0
