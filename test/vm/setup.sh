#!/usr/bin/env bash
# test/vm/setup.sh — prepare the real-kernel rig on a Debian host (run as root).
#
# Idempotent and cached. It
#   1. installs the host packages the rig needs with apt (QEMU, busybox-static, cpio, zstd,
#      kmod and the kernel build tools) unless they are already installed;
#   2. downloads Debian's current Linux 7.2 kernel packages (linux-binary, linux-modules and
#      linux-source-7.2) from the "sid" suite with apt-get through a private sources list and
#      lists directory — nothing from sid is ever installed on the host. The mirror is the one
#      this machine's own apt configuration uses;
#   3. unpacks the stock kernel and its modules (the "stock" guest kernel);
#   4. builds the same source with test/vm/kernel/iommufd.config (the "iommufd" guest kernel),
#      once per (version, config) pair;
#   5. debootstraps a Debian trixie root filesystem with systemd (the "systemd" boot mode's
#      guest: real systemd 257 as PID 1, the whole rootfs packed as the initramfs), once per
#      hash of its package list and build steps;
#   6. installs the uapi headers of that source (make headers), once per source version:
#      test/uapi compiles its layout program against them, whichever kernels are asked for;
#   7. writes $CACHE/rig.env, which the Go harness (test/vm, test/uapi) reads.
#
# Everything lives under $CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/mmiobroker/vm),
# keyed by version and config. A warm run does no network access and no rebuild.
#
# Environment:
#   MMIOBROKER_VM_CACHE   cache directory (default above)
#   MMIOBROKER_VM_REFRESH=1  re-resolve the current sid kernel version (network)
#   MMIOBROKER_VM_KERNELS    "stock iommufd" (default) or a subset
#   MMIOBROKER_VM_JOBS       make -j for the kernel build (default: nproc)
#   MMIOBROKER_VM_MODES      "busybox systemd" (default) or "busybox": skip the systemd rootfs
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
CACHE=${MMIOBROKER_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmiobroker/vm}
KERNELS=${MMIOBROKER_VM_KERNELS:-stock iommufd}
JOBS=${MMIOBROKER_VM_JOBS:-$(nproc)}
MODES=${MMIOBROKER_VM_MODES:-busybox systemd}
MODES=${MODES//,/ }
mkdir -p "$CACHE"
log() { printf 'setup: %s\n' "$*" >&2; }
t0=$(date +%s)

# --- 1. host packages -------------------------------------------------------------------
host_pkgs=(qemu-system-x86 busybox-static cpio zstd xz-utils kmod protobuf-compiler libprotobuf-dev
	build-essential flex bison bc libelf-dev libssl-dev)
[[ " $MODES " == *" systemd "* ]] && host_pkgs+=(debootstrap debian-archive-keyring)
missing=()
for p in "${host_pkgs[@]}"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing host packages: ${missing[*]}"
	[ "$(id -u)" = 0 ] || { log "need root to install ${missing[*]}"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. resolve and download the sid kernel ---------------------------------------------
apt_dir=$CACHE/apt
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
	-o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")

# debian_mirror prints the first non-security Debian archive URI of this machine's apt
# configuration (deb822 .sources files first, then one-line sources.list entries).
debian_mirror() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
	done | head -n1 | grep . && return
	cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\// && $i !~ /security/) { print $i; exit } }' |
		head -n1 | grep .
}

resolve() {
	local mirror
	mirror=$(debian_mirror) || { log "no Debian mirror found in the apt configuration"; exit 1; }
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$apt_dir/sources.list"
	log "resolving the current Linux 7.2 kernel in sid (mirror from apt configuration: $mirror)"
	apt-get "${apt_opts[@]}" update -qq
	# linux-source-7.2 names the source version (e.g. 7.2.13-1); the binary packages built
	# from it carry the ABI name (e.g. 7.2.13+deb14-amd64; the -rt- and -cloud- flavours
	# are not what a Debian virtualization host runs).
	local srcver kabi
	srcver=$(apt-cache "${apt_opts[@]}" show linux-source-7.2 | awk '/^Version:/ {print $2}' | sort -V | tail -n1)
	[ -n "$srcver" ] || { log "linux-source-7.2 not found in sid"; exit 1; }
	kabi=$(apt-cache "${apt_opts[@]}" pkgnames linux-binary-7.2 | grep -E -- '^linux-binary-7\.2\.[0-9]+\+deb[0-9]+-amd64$' |
		while read -r p; do
			v=$(apt-cache "${apt_opts[@]}" show "$p" | awk '/^Version:/ {print $2}' | head -n1)
			[ "$v" = "$srcver" ] && echo "${p#linux-binary-}"
		done | sort -V | tail -n1)
	[ -n "$kabi" ] || { log "no linux-binary-*-amd64 of version $srcver in sid"; exit 1; }
	printf 'KVER=%s\nKSRCVER=%s\n' "$kabi" "$srcver" >"$CACHE/resolved.env"
}

if [ ! -f "$CACHE/resolved.env" ] || [ "${MMIOBROKER_VM_REFRESH:-0}" = 1 ]; then
	resolve
fi
# shellcheck disable=SC1091
. "$CACHE/resolved.env"
log "kernel: Debian $KVER (source linux-source-7.2 $KSRCVER)"

dl=$CACHE/dl/$KSRCVER
fetch() { # fetch PKG...: download into $dl unless a .deb of that name is there
	local need=() p
	mkdir -p "$dl"
	for p in "$@"; do compgen -G "$dl/${p}_*.deb" >/dev/null || need+=("$p"); done
	[ ${#need[@]} -eq 0 ] && return
	[ -n "$(ls "$apt_dir/lists" 2>/dev/null | grep Packages)" ] || resolve
	log "downloading ${need[*]}"
	(cd "$dl" && apt-get "${apt_opts[@]}" download -qq "${need[@]/%/=$KSRCVER}")
}

# --- 3. stock kernel --------------------------------------------------------------------
stock=$CACHE/stock/$KVER
if [[ " $KERNELS " == *" stock "* ]] && [ ! -f "$stock/.done" ]; then
	fetch "linux-binary-$KVER" "linux-modules-$KVER"
	rm -rf "$stock" && mkdir -p "$stock/root"
	for p in linux-binary linux-modules; do dpkg -x "$dl/$p-${KVER}"_*.deb "$stock/root"; done
	# the modules package ships no modules.dep; generate it inside the private tree
	depmod -b "$stock/root/usr" "$KVER" 2>/dev/null || depmod -b "$stock/root" "$KVER"
	touch "$stock/.done"
fi
moddir=$(ls -d "$stock"/root/usr/lib/modules/"$KVER" "$stock"/root/lib/modules/"$KVER" 2>/dev/null | head -n1 || true)

# --- 4. iommufd kernel ------------------------------------------------------------------
# The unpacked linux-source-7.2 tree, shared by the iommufd build and the uapi headers.
src=$CACHE/src/$KSRCVER
tree=$src/linux-source-7.2
unpack_source() {
	[ -f "$src/.done" ] && return
	fetch linux-source-7.2
	log "unpacking linux-source-7.2 $KSRCVER"
	rm -rf "$src" && mkdir -p "$src"
	dpkg -x "$dl"/linux-source-7.2_*.deb "$src/deb"
	tar -C "$src" -xJf "$src"/deb/usr/src/linux-source-7.2.tar.xz
	rm -rf "$src/deb"
	touch "$src/.done"
}

frag=$here/kernel/iommufd.config
fraghash=$(sha256sum "$frag" | cut -c1-12)
build=$CACHE/build/$KSRCVER-$fraghash
if [[ " $KERNELS " == *" iommufd "* ]] && [ ! -f "$build/.done" ]; then
	unpack_source
	mkdir -p "$build"
	log "building the iommufd kernel ($KSRCVER + iommufd.config $fraghash) with -j$JOBS; about 14 min on 2 cores"
	b0=$(date +%s)
	make -s -C "$tree" O="$build" defconfig >/dev/null
	"$tree/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$frag" >/dev/null
	make -s -C "$tree" O="$build" olddefconfig >/dev/null
	for s in IOMMUFD VFIO_DEVICE_CDEV VFIO_PCI_DMABUF VFIO_PCI PCI_P2PDMA INTEL_IOMMU; do
		grep -q "^CONFIG_$s=y" "$build/.config" || { log "CONFIG_$s did not end up =y"; exit 1; }
	done
	nice -n 10 make -s -C "$tree" O="$build" -j"$JOBS" bzImage >"$build/build.log" 2>&1 ||
		{ tail -n 40 "$build/build.log" >&2; log "kernel build failed (log: $build/build.log)"; exit 1; }
	touch "$build/.done"
	log "iommufd kernel built in $(($(date +%s) - b0)) s"
fi

# --- 5. systemd root filesystem (boot mode "systemd") -----------------------------------
# Debian trixie minbase with systemd 257 (FileDescriptorStorePreserve=, systemd-analyze
# fdstore), trimmed, and packed as a whole initramfs: the kernel unpacks it into its tmpfs
# rootfs and runs systemd there as PID 1 (no switch_root; /etc/initrd-release is absent, so
# systemd treats it as the real system). The iommufd kernel has no ext4 or 9p, which this
# avoids. The Go harness appends the project's payload and units as a second cpio archive.
sd_suite=trixie
sd_pkgs=systemd,systemd-sysv,udev,kmod,busybox,procps,util-linux

# systemd_finish DIR: make the debootstrapped tree boot fast and quietly as a test guest.
systemd_finish() {
	local r=$1 u
	# the guest needs no apt sources (and must not carry the mirror's name)
	echo "# no sources: mmiobroker rig guest" >"$r/etc/apt/sources.list"
	rm -rf "$r"/etc/apt/sources.list.d/* "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* \
		"$r"/var/log/bootstrap.log "$r"/var/log/*.log "$r"/var/cache/debconf/*-old \
		"$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/locale/* \
		"$r"/usr/lib/udev/hwdb.bin "$r"/usr/lib/udev/hwdb.d "$r"/usr/lib/x86_64-linux-gnu/gconv
	# not a first boot: no firstboot prompts, a fixed machine id
	echo 6d6d696f62726f6b6572726967000001 >"$r/etc/machine-id"
	echo mmb-rig >"$r/etc/hostname"
	# no gettys (the rig's payload channel is ttyS1; the kernel console ttyS0 stays quiet),
	# no firstboot, no timers that only cost boot time
	for u in serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service \
		getty-static.service systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
		dpkg-db-backup.timer systemd-tmpfiles-clean.timer fstrim.timer e2scrub_all.timer; do
		ln -sfn /dev/null "$r/etc/systemd/system/$u"
	done
	# ConditionNeedsUpdate=: /etc and /var are up to date (no ldconfig, hwdb, catalog rebuilds)
	touch "$r/usr" "$r/etc/.updated" "$r/var/.updated"
	ln -sfn /sbin/init "$r/init" # the kernel runs /init of the initramfs
}

sd_key=$({ echo "$sd_suite $sd_pkgs"; declare -f systemd_finish; } | sha256sum | cut -c1-12)
sd_dir=$CACHE/systemd/$sd_suite-$sd_key
if [[ " $MODES " == *" systemd "* ]] && [ ! -f "$sd_dir/.done" ]; then
	[ "$(id -u)" = 0 ] || { log "need root to debootstrap the systemd rootfs"; exit 1; }
	mirror=$(debian_mirror) || { log "no Debian mirror found in the apt configuration"; exit 1; }
	log "debootstrap $sd_suite minbase + $sd_pkgs (mirror from apt configuration; about 30 s)"
	s0=$(date +%s)
	rm -rf "$sd_dir" && mkdir -p "$sd_dir"
	debootstrap --variant=minbase --include="$sd_pkgs" \
		--keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
		"$sd_suite" "$sd_dir/rootfs" "$mirror" >"$sd_dir/debootstrap.log" 2>&1 ||
		{ tail -n 20 "$sd_dir/debootstrap.log" >&2; log "debootstrap failed (log: $sd_dir/debootstrap.log)"; exit 1; }
	chroot "$sd_dir/rootfs" dpkg-query -W systemd udev libc6 kmod busybox util-linux >"$sd_dir/versions.txt"
	systemd_finish "$sd_dir/rootfs"
	(cd "$sd_dir/rootfs" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) |
		zstd -q -3 -T0 -o "$sd_dir/rootfs.cpio.zst.tmp"
	mv "$sd_dir/rootfs.cpio.zst.tmp" "$sd_dir/rootfs.cpio.zst"
	touch "$sd_dir/.done"
	log "systemd rootfs ready in $(($(date +%s) - s0)) s: $(du -sh "$sd_dir/rootfs" | cut -f1) tree," \
		"$(du -h "$sd_dir/rootfs.cpio.zst" | cut -f1) initramfs; $(tr '\n' ' ' <"$sd_dir/versions.txt")"
fi

# --- 6. uapi headers --------------------------------------------------------------------
# The source's own exported headers (include/uapi and arch/x86/include/uapi, sanitized as
# headers_install does), which test/uapi compiles its layout program against. `make headers`
# is headers_install without its final rsync (rsync is not a rig package); cpio copies the
# .h files instead.
uapi=$CACHE/uapi/$KSRCVER
if [ ! -f "$uapi/.done" ]; then
	unpack_source
	log "installing the uapi headers of $KSRCVER (about 30 s)"
	rm -rf "$uapi" && mkdir -p "$uapi"
	make -s -C "$tree" O="$uapi/build" ARCH=x86 -j"$JOBS" headers >"$uapi/headers.log" 2>&1 ||
		{ tail -n 20 "$uapi/headers.log" >&2; log "make headers failed (log: $uapi/headers.log)"; exit 1; }
	(cd "$uapi/build/usr" && find include -name '*.h' -print0 | cpio --null -pdm --quiet "$uapi")
	rm -rf "$uapi/build"
	[ -f "$uapi/include/linux/vfio.h" ] || { log "no linux/vfio.h in $uapi/include"; exit 1; }
	touch "$uapi/.done"
fi

# --- 7. rig.env -------------------------------------------------------------------------
{
	echo "KVER=$KVER"
	echo "KSRCVER=$KSRCVER"
	[ -n "$moddir" ] && echo "STOCK_KERNEL=$moddir/vmlinuz" && echo "STOCK_MODULES=$moddir"
	[ -f "$build/.done" ] && echo "IOMMUFD_KERNEL=$build/arch/x86/boot/bzImage"
	echo "BUSYBOX=$(command -v busybox || echo /bin/busybox)"
	echo "UAPI_INCLUDE=$uapi/include"
	[ -f "$sd_dir/.done" ] && echo "SYSTEMD_ROOTFS=$sd_dir/rootfs" && echo "SYSTEMD_INITRAMFS=$sd_dir/rootfs.cpio.zst"
} >"$CACHE/rig.env"
log "ready in $(($(date +%s) - t0)) s: $CACHE/rig.env"
cat "$CACHE/rig.env"
