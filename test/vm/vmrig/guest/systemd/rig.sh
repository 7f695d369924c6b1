#!/bin/sh
# /usr/lib/mmb/rig.sh — mmb-rig.service of the systemd guest (boot mode "systemd"): waits
# for the end of the boot, checks that no unit failed, runs the guest test binaries in
# /usr/lib/mmb/tests with -test.v on the payload channel (the markers of guest/init.sh), and
# powers the VM off with systemctl. mmb-vfio-bind.service has printed the init, check and
# env markers and written MMIOBROKER_VM_* (this unit's EnvironmentFile=).
#
# Kernel command line: mmb.mode=tests|shell, mmb.out, mmb.run, mmb.bench, mmb.benchtime, mmb.tests,
# mmb.timeout as for guest/init.sh; mmb.soak=N exports MMIOBROKER_VM_SOAK=N (the number of
# kill -9 restarts of the soak test; `make soak`).

MODE=tests OUT=console RUN= BENCH= BENCHTIME= ONLY= TIMEOUT=3m
set -f
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	mmb.mode=*) MODE=${kv#*=} ;;
	mmb.out=*) OUT=${kv#*=} ;;
	mmb.run=*) RUN=${kv#*=} ;;
	mmb.bench=*) BENCH=${kv#*=} ;;
	mmb.benchtime=*) BENCHTIME=${kv#*=} ;;
	mmb.tests=*) ONLY=$(echo "${kv#*=}" | tr ',' ' ') ;;
	mmb.timeout=*) TIMEOUT=${kv#*=} ;;
	mmb.soak=*) export MMIOBROKER_VM_SOAK="${kv#*=}" ;;
	esac
done
set +f
if [ "$OUT" = ttyS1 ] && [ -c /dev/ttyS1 ]; then
	exec </dev/null >/dev/ttyS1 2>&1
fi
up() { read -r u _ </proc/uptime; echo "$u"; }
mark() { echo "MMB-RIG: $*"; }
FAILED=0
[ -e /run/mmb/failed ] && FAILED=1

state=$(systemctl is-system-running --wait 2>&1)
failed=$(systemctl list-units --failed --plain --no-legend 2>&1 | awk '{ print $1 }' | tr '\n' ' ')
took=$(systemd-analyze time 2>/dev/null | head -n1)
if [ -z "$failed" ]; then
	mark "check units ok system $state; $took"
else
	FAILED=1
	mark "check units fail system $state; failed units: $failed"
fi
mark "ready uptime=$(up)"

RC=0
case "$MODE" in
tests)
	[ -n "$ONLY" ] || ONLY=$(cat /etc/mmb/tests 2>/dev/null)
	for t in $ONLY; do
		mark "begin $t"
		if [ -x "/usr/lib/mmb/tests/$t.test" ]; then
			mkdir -p "/tmp/t-$t"
			cd "/tmp/t-$t" || cd /
			set -- -test.v -test.timeout="$TIMEOUT"
			[ -n "$RUN" ] && set -- "$@" "-test.run=$RUN"
			[ -n "$BENCH" ] && set -- "$@" "-test.bench=$BENCH" -test.benchmem
			[ -n "$BENCH" ] && [ -n "$BENCHTIME" ] && set -- "$@" "-test.benchtime=$BENCHTIME"
			"/usr/lib/mmb/tests/$t.test" "$@" </dev/null
			rc=$?
			cd /
		else
			echo "no test binary /usr/lib/mmb/tests/$t.test"
			rc=127
		fi
		[ $rc = 0 ] || RC=1
		mark "end $t rc=$rc uptime=$(up)"
	done
	;;
shell)
	echo "mmiobroker rig shell (systemd): kernel $(uname -r); tests in /usr/lib/mmb/tests; exit powers off"
	setsid -w -c /bin/bash -l <>/dev/ttyS0 >&0 2>&1
	;;
*)
	echo "mmb.mode=$MODE is not supported by the systemd boot mode"
	RC=1
	;;
esac

# On failure the journal and the kernel log go to the console (kept in the serial log).
if [ $RC != 0 ] || [ $FAILED != 0 ]; then
	{
		echo "---- mmiobroker rig: journal of this boot ----"
		journalctl -b --no-pager -o short-monotonic
		echo "---- end of journal ----"
	} >/dev/ttyS0 2>&1
fi
mark "done uptime=$(up)"
# drain the payload channel (stty sets modes with TCSADRAIN), then a clean shutdown
[ "$OUT" = ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null
systemctl poweroff --no-block
