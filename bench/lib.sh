# lib.sh: helpers shared by the bench/*.sh scripts (sourced, not run).
#
# Every script prepares a staging directory on the host (static binaries,
# QEMU with its shared libraries and firmware, guest images, a payload
# script), then boots the nested lab once with the staging directory packed
# at /lab/bench and runs the payload there. The payload prints the results
# table; the host only relays it.
#
# Variables a script may set before calling the functions:
#   stage     staging directory (bench_init creates it)
#   root      repository root (bench_init sets it)
# Environment understood by all scripts:
#   KVMKIT_BENCH_KEEP=1     keep the staging directory (its path is printed)
#   KVMKIT_BENCH_TIMEOUT    lab timeout (default per script)
#   KVMKIT_BENCH_LABFLAGS   extra nestlab flags, e.g. "--mem 8G -v"

# bench_log prints a progress line on stderr.
bench_log() { printf '%s: %s\n' "${bench_name:-bench}" "$*" >&2; }

# bench_die prints a one-line reason and exits 1.
bench_die() {
	bench_log "$*"
	exit 1
}

# bench_init NAME: sets root, bench_name and a fresh staging directory.
bench_init() {
	bench_name=$1
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	stage=$(mktemp -d "${TMPDIR:-/tmp}/kvmkit-$bench_name.XXXXXX")
	if [ "${KVMKIT_BENCH_KEEP:-0}" = 1 ]; then
		bench_log "staging directory kept: $stage"
	else
		trap 'rm -rf "$stage"' EXIT
	fi
	mkdir -p "$stage/bin" "$stage/sys"
}

# bench_gobuild PKG OUT: a static Go binary.
bench_gobuild() {
	(cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$2" "$1") ||
		bench_die "go build $1 failed"
}

# bench_gotest PKG OUT: a static Go test binary.
bench_gotest() {
	(cd "$root" && CGO_ENABLED=0 go test -c -o "$2" "$1") ||
		bench_die "go test -c $1 failed"
}

# bench_pack_elf HOSTPATH: copy a dynamically linked program's interpreter
# and libraries (as ldd resolves them) under $stage/sys at their own paths,
# so that packing $stage/sys/<top> at /<top> makes them resolvable in L1.
bench_pack_elf() {
	local lib
	for lib in $(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
		mkdir -p "$stage/sys$(dirname "$lib")"
		cp -L "$lib" "$stage/sys$lib"
	done
}

# bench_pack_qemu: qemu-system-x86_64 at /usr/bin/qemu-system-x86_64 in
# L1 (QEMU looks for firmware relative to its binary: ../share/qemu,
# ../share/seabios, ../lib/ipxe/qemu) with its libraries and the x86
# firmware and option ROMs (SeaBIOS, qboot, the linuxboot/multiboot/pvh
# ROMs, kvmvapic, iPXE ROMs) at their host paths.
bench_pack_qemu() {
	local qemu
	qemu=$(command -v qemu-system-x86_64) || bench_die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
	mkdir -p "$stage/sys/usr/bin"
	cp -L "$qemu" "$stage/sys/usr/bin/qemu-system-x86_64"
	bench_pack_elf "$qemu"
	local d f
	for d in /usr/share/seabios /usr/lib/ipxe/qemu; do
		[ -d "$d" ] || continue
		mkdir -p "$stage/sys$d"
		cp -rL "$d/." "$stage/sys$d/"
	done
	mkdir -p "$stage/sys/usr/share/qemu"
	for f in /usr/share/qemu/*.bin /usr/share/qemu/*.rom /usr/share/qemu/*.img /usr/share/qemu/trace-events-all; do
		case $f in */openbios* | */s390* | */hppa* | */skiboot* | */slof* | */opensbi* | */palcode* | */npcm*) continue ;; esac
		[ -e "$f" ] && cp -L "$f" "$stage/sys/usr/share/qemu/"
	done
	# QEMU loads optional modules (display, audio...) from here; the
	# scripts use -nodefaults, but a missing directory costs nothing.
	if [ -d /usr/lib/x86_64-linux-gnu/qemu ]; then
		mkdir -p "$stage/sys/usr/lib/x86_64-linux-gnu/qemu"
		cp -rL /usr/lib/x86_64-linux-gnu/qemu/. "$stage/sys/usr/lib/x86_64-linux-gnu/qemu/"
	fi
}

# bench_testkernel: prints the test kernel's directory. While another
# tools/testkernel/build.sh runs it waits (polling each minute, up to
# KVMKIT_BENCH_KERNEL_WAIT seconds, default 3600) instead of starting a
# second build; then build.sh returns its cached output (or builds it).
# $KVMKIT_TEST_KERNEL_DIR, if set, is used as is.
bench_testkernel() {
	if [ -n "${KVMKIT_TEST_KERNEL_DIR:-}" ]; then
		echo "$KVMKIT_TEST_KERNEL_DIR"
		return 0
	fi
	local waited=0 limit=${KVMKIT_BENCH_KERNEL_WAIT:-3600}
	while pgrep -f 'tools/testkernel/build.sh' >/dev/null 2>&1; do
		[ "$waited" -ge "$limit" ] && bench_die "a test kernel build still runs after ${limit}s"
		bench_log "waiting for the running test kernel build (${waited}s)"
		sleep 60
		waited=$((waited + 60))
	done
	bash "$root/tools/testkernel/build.sh" | tail -n 1
}

# bench_lab TIMEOUT [NESTLAB FLAGS...]: boot the lab once with $stage/bin
# at /lab/bench/bin, $stage/sys/* at /*, $stage/data at /lab/bench/data
# and run /lab/bench/payload.sh. Returns the payload's status.
bench_lab() {
	local timeout=$1
	shift
	local args=(--timeout "${KVMKIT_BENCH_TIMEOUT:-$timeout}" --file "$stage/bin:/lab/bench/bin"
		--file "$stage/payload.sh:/lab/bench/payload.sh")
	[ -d "$stage/data" ] && args+=(--file "$stage/data:/lab/bench/data")
	local top
	for top in "$stage"/sys/*; do
		[ -e "$top" ] && args+=(--file "$top:/${top##*/}")
	done
	# shellcheck disable=SC2086 # word splitting of extra flags is intended
	(cd "$root" && go run ./tools/nestlab run "${args[@]}" "$@" ${KVMKIT_BENCH_LABFLAGS:-} -- sh /lab/bench/payload.sh)
}
