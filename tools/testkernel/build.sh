#!/usr/bin/env bash
# build.sh: build kvmkit's small, reproducible Linux test kernel and its
# busybox initramfs.
#
# Output (cached): ${KVMKIT_CACHE:-$HOME/.cache/kvmkit}/testkernel-<hash>/
#   bzImage             compressed kernel (Linux/x86 boot protocol)
#   vmlinux             uncompressed ELF (PVH entry note, for direct ELF boot)
#   initramfs.cpio.gz   gzip newc cpio: busybox-static + /init (see init.sh)
#   config              the final kernel .config
# <hash> covers this script, kvmkit.config and init.sh; an existing output
# dir is reused at once. The kernel itself is cached separately in
# testkernel-kernel-<khash>/ keyed by kvmkit.config and KERNEL_RECIPE only,
# so changing the initramfs (init.sh) takes seconds, not a kernel build.
# The output directory is always the last line printed on stdout.
#
# Environment: KVMKIT_CACHE (cache root), KVMKIT_TESTKERNEL_JOBS (make -j,
# default nproc), KVMKIT_TESTKERNEL_NO_INSTALL=1 (never call apt-get).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
frag="$here/kvmkit.config"
initsh="$here/init.sh"
cache="${KVMKIT_CACHE:-$HOME/.cache/kvmkit}"
# Bump KERNEL_RECIPE when the kernel build steps below change.
KERNEL_RECIPE=1
hash="$(cat "${BASH_SOURCE[0]}" "$frag" "$initsh" | sha256sum | cut -c1-16)"
khash="$( (cat "$frag"; echo "recipe=$KERNEL_RECIPE") | sha256sum | cut -c1-16)"
out="$cache/testkernel-$hash"
kout="$cache/testkernel-kernel-$khash"

log() { echo "testkernel: $*" >&2; }

if [[ -f "$out/bzImage" && -f "$out/vmlinux" && -f "$out/initramfs.cpio.gz" ]]; then
	log "cached"
	echo "$out"
	exit 0
fi

# --- dependencies --------------------------------------------------------
kernel_cached=0
[[ -f "$kout/bzImage" && -f "$kout/vmlinux" ]] && kernel_cached=1
need_pkgs=()
pkgs=(busybox-static cpio gzip)
if ((!kernel_cached)); then
	[[ -f /usr/src/linux-source-6.1.tar.xz ]] || need_pkgs+=(linux-source-6.1)
	pkgs+=(build-essential bc bison flex libelf-dev libssl-dev xz-utils)
fi
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
	if [[ "${KVMKIT_TESTKERNEL_NO_INSTALL:-}" == 1 ]]; then
		log "missing packages: ${need_pkgs[*]} (KVMKIT_TESTKERNEL_NO_INSTALL=1)"
		exit 1
	fi
	log "installing: ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
if ldd /bin/busybox >/dev/null 2>&1; then
	log "/bin/busybox is dynamically linked: install busybox-static"
	exit 1
fi

# --- kernel --------------------------------------------------------------
mkdir -p "$cache"
work="$(mktemp -d "$cache/testkernel-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

build_kernel() {
	log "unpacking linux-source-6.1 into $work"
	tar -C "$work" -xJf /usr/src/linux-source-6.1.tar.xz
	src="$work/linux-source-6.1"

	# Reproducible build metadata.
	export KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC"
	export KBUILD_BUILD_USER=kvmkit
	export KBUILD_BUILD_HOST=kvmkit
	export KBUILD_BUILD_VERSION=1
	export SOURCE_DATE_EPOCH=0
	export ARCH=x86_64
	jobs="${KVMKIT_TESTKERNEL_JOBS:-$(nproc)}"

	log "configuring (tinyconfig + kvmkit.config)"
	make -C "$src" -s tinyconfig >&2
	(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$frag" >&2)
	make -C "$src" -s olddefconfig >&2

	# Every option the fragment asks for must have survived dependency
	# resolution; otherwise the test kernel silently lacks a feature.
	missing=()
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qxF "$line" "$src/.config" || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo unset))")
			;;
		esac
	done <"$frag"
	if ((${#missing[@]})); then
		log "config options lost in the final .config:"
		printf '  %s\n' "${missing[@]}" >&2
		exit 1
	fi

	log "building bzImage with -j$jobs"
	make -C "$src" -s -j"$jobs" bzImage >&2
	kbuild=$(date +%s)
	log "kernel built in $((kbuild - start))s"
	kstage="$work/kernel"
	mkdir -p "$kstage"
	cp "$src/arch/x86/boot/bzImage" "$src/vmlinux" "$kstage/"
	cp "$src/.config" "$kstage/config"
	rm -rf "$kout" "$src"
	mv "$kstage" "$kout"
}

if ((kernel_cached)); then
	log "reusing cached kernel $kout"
else
	build_kernel
fi

# --- initramfs -----------------------------------------------------------
root="$work/initramfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,mnt,root}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list-full); do
	[[ "$applet" == bin/busybox ]] && continue
	mkdir -p "$root/$(dirname "$applet")"
	ln -sf /bin/busybox "$root/$applet"
done
install -m 0755 "$initsh" "$root/init"
cat >"$root/etc/udhcpc.script" <<'EOS'
#!/bin/sh
# udhcpc hook: configure the lease on the interface.
case "$1" in
bound|renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	[ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
	echo "${router%% *}" > /tmp/gateway
	;;
deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
EOS
chmod 0755 "$root/etc/udhcpc.script"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -9n) >"$work/initramfs.cpio.gz"

# --- publish -------------------------------------------------------------
stage="$work/out"
mkdir -p "$stage"
cp "$kout/bzImage" "$kout/vmlinux" "$kout/config" "$work/initramfs.cpio.gz" "$stage/"
(cd "$stage" && sha256sum bzImage vmlinux initramfs.cpio.gz >SHA256SUMS)
rm -rf "$out"
mv "$stage" "$out"
log "done in $(($(date +%s) - start))s"
echo "$out"
