#!/bin/busybox sh
# /init of the mmiobroker rig guest. test/vm/vmrig embeds this file into every initramfs.
#
# It mounts the pseudo file systems, loads the stock kernel's VFIO modules (listed in
# /etc/mmb/modules in load order by the host), binds every edu (1234:11e8), ivshmem
# (1af4:1110) and pci-testdev (1b36:0005) to vfio-pci, exports their addresses as
# MMIOBROKER_VM_*, runs what it was asked to, and powers off.
#
# Kernel command line (the host sets these; all optional):
#   mmb.mode=tests|demo|shell   run the test binaries in /tests (default), /etc/mmb/demo.sh,
#                               or a shell on the console
#   mmb.out=ttyS1               write the payload channel (markers and test output) to the
#                               second serial port, keeping it apart from kernel messages on
#                               the console (default: the console)
#   mmb.kernel=stock|iommufd    exported as MMIOBROKER_VM_KERNEL
#   mmb.topology=rootport|flat  exported as MMIOBROKER_VM_TOPOLOGY; with rootport every device
#                               must offer a bus reset (checked)
#   mmb.run=REGEX               passed as -test.run to every test binary
#   mmb.bench=REGEX             passed as -test.bench to every test binary
#   mmb.benchtime=T             passed as -test.benchtime with mmb.bench (e.g. 3x, 2s)
#   mmb.tests=a,b               run only these test binaries (default: /etc/mmb/tests)
#   mmb.timeout=DURATION        -test.timeout of every test binary (default 3m)
#   mmb.nonce=XXXXXXXX          written (32-bit) to ivshmem BAR2 at 0xff000 before binding,
#                               so the host can check the BAR really is its backing file
#
# Payload channel markers (one line each; the host parses them):
#   MMB-RIG: init kernel=<release> uptime=<s>
#   MMB-RIG: check <name> ok|fail|skip <detail>
#   MMB-RIG: env <NAME>=<value>
#   MMB-RIG: ready uptime=<s>
#   MMB-RIG: begin <name>
#   MMB-RIG: end <name> rc=<exit status> uptime=<s>
#   MMB-RIG: done uptime=<s>

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
# cgroup v2, as on every systemd host: the daemon reads its callers' cgroups for their
# tenant ([tenants] by = "cgroup", the default) and refuses to start without it.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

MODE=tests OUT=console KERNEL= TOPOLOGY= RUN= BENCH= BENCHTIME= ONLY= TIMEOUT=3m NONCE=
set -f # REGEX may hold glob characters
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	mmb.mode=*) MODE=${kv#*=} ;;
	mmb.out=*) OUT=${kv#*=} ;;
	mmb.kernel=*) KERNEL=${kv#*=} ;;
	mmb.topology=*) TOPOLOGY=${kv#*=} ;;
	mmb.run=*) RUN=${kv#*=} ;;
	mmb.bench=*) BENCH=${kv#*=} ;;
	mmb.benchtime=*) BENCHTIME=${kv#*=} ;;
	mmb.tests=*) ONLY=$(echo "${kv#*=}" | tr ',' ' ') ;;
	mmb.timeout=*) TIMEOUT=${kv#*=} ;;
	mmb.nonce=*) NONCE=${kv#*=} ;;
	esac
done
set +f

if [ "$OUT" = ttyS1 ]; then
	if [ -c /dev/ttyS1 ]; then
		stty -F /dev/ttyS1 raw -echo 2>/dev/null
		exec </dev/null >/dev/ttyS1 2>&1
	else
		echo "MMB-RIG: check payload-channel fail /dev/ttyS1 is missing; using the console"
	fi
fi

up() { read -r u _ </proc/uptime; echo "$u"; }
mark() { echo "MMB-RIG: $*"; }
FAILED=0
check() { # check NAME ok|fail|skip DETAIL...
	[ "$2" = fail ] && FAILED=1
	mark "check $*"
}

mark "init kernel=$(uname -r) uptime=$(up)"

# --- modules (stock kernel): /etc/mmb/modules lists them dependencies first ---------------
mods=$(cat /etc/mmb/modules 2>/dev/null)
if [ -n "$mods" ]; then
	bad=
	for m in $mods; do
		out=$(insmod "/lib/modules/$m.ko" 2>&1) || bad="$bad $m($out)"
	done
	if [ -z "$bad" ]; then
		check modules ok "loaded:" $mods
	else
		check modules fail "insmod failed:$bad"
	fi
else
	check modules skip "no modules to load (built-in kernel)"
fi

# --- devices -------------------------------------------------------------------------------
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

# The host reads the ivshmem backing file: put a nonce into BAR2 through /dev/mem while no
# driver owns the device (enable turns memory decoding on for the write).
if [ -n "$NONCE" ] && [ -n "$IVSHMEM" ]; then
	d=/sys/bus/pci/devices/$IVSHMEM
	bar2=$(sed -n 3p "$d/resource" | cut -d' ' -f1)
	if [ -n "$bar2" ] && [ $((bar2)) -ne 0 ] && echo 1 >"$d/enable" 2>/dev/null; then
		if devmem $((bar2 + 0xff000)) 32 "0x$NONCE" 2>/dev/null; then
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

export MMIOBROKER_VM_EDU1=$EDU1 MMIOBROKER_VM_EDU2=$EDU2 MMIOBROKER_VM_IVSHMEM=$IVSHMEM \
	MMIOBROKER_VM_TESTDEV=$TESTDEV MMIOBROKER_VM_PCIE=$PCIE MMIOBROKER_VM_KERNEL=$KERNEL MMIOBROKER_VM_TOPOLOGY=$TOPOLOGY
for v in EDU1 EDU2 IVSHMEM TESTDEV PCIE KERNEL TOPOLOGY; do
	eval "mark env MMIOBROKER_VM_$v=\$MMIOBROKER_VM_$v"
done
mark "ready uptime=$(up)"

# --- payload ---------------------------------------------------------------------------------
RC=0
case "$MODE" in
tests)
	[ -n "$ONLY" ] || ONLY=$(cat /etc/mmb/tests 2>/dev/null)
	for t in $ONLY; do
		mark "begin $t"
		if [ -x "/tests/$t.test" ]; then
			mkdir -p "/tmp/t-$t"
			cd "/tmp/t-$t" || cd /
			set -- -test.v -test.timeout="$TIMEOUT"
			[ -n "$RUN" ] && set -- "$@" "-test.run=$RUN"
			[ -n "$BENCH" ] && set -- "$@" "-test.bench=$BENCH" -test.benchmem
			[ -n "$BENCH" ] && [ -n "$BENCHTIME" ] && set -- "$@" "-test.benchtime=$BENCHTIME"
			"/tests/$t.test" "$@" </dev/null
			rc=$?
			cd /
		else
			echo "no test binary /tests/$t.test"
			rc=127
		fi
		[ $rc = 0 ] || RC=1
		mark "end $t rc=$rc uptime=$(up)"
	done
	;;
demo)
	mark "begin demo"
	sh /etc/mmb/demo.sh
	rc=$?
	[ $rc = 0 ] || RC=1
	mark "end demo rc=$rc uptime=$(up)"
	;;
shell)
	echo
	echo "mmiobroker rig shell: kernel $(uname -r) ($KERNEL), topology $TOPOLOGY"
	echo "devices (bound to vfio-pci): edu $EDU1 $EDU2, ivshmem $IVSHMEM, pci-testdev $TESTDEV, e1000e $PCIE"
	echo "tests: $(ls /tests 2>/dev/null | tr '\n' ' ')  programs: $(cd /bin && ls mmiobroker* 2>/dev/null | tr '\n' ' ')"
	echo "demo: sh /etc/mmb/demo.sh     leave: exit (or Ctrl-A x)"
	setsid cttyhack sh -l
	;;
*)
	echo "unknown mmb.mode=$MODE"
	RC=1
	;;
esac

# On failure the whole kernel log goes to the console (the host keeps it in the serial log).
if [ $RC != 0 ] || [ $FAILED != 0 ]; then
	{
		echo "---- mmiobroker rig: full kernel log ----"
		dmesg
		echo "---- end of kernel log ----"
	} >/dev/console 2>&1
fi
mark "done uptime=$(up)"
# Wait until the serial ports have sent everything (stty sets modes with TCSADRAIN):
# poweroff does not flush them.
[ "$OUT" = ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/console -echo 2>/dev/null
sync
poweroff -f
echo o >/proc/sysrq-trigger
