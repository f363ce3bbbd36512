#!/bin/sh
# kvm-exit.sh: compare kvmkit's Go run-loop benchmarks with the C reference
# (bench/c/kvmbench.c) on the same guests and print Go/C ratios (target
# <= 1.10).
#
# Environment (all optional):
#   KVMKIT_BENCH_CBIN       pre-built kvmbench binary (else built with gcc -O2)
#   KVMKIT_BENCH_GOTEST     pre-built `go test -c ./kvm` binary (else go test)
#   KVMKIT_BENCH_GUESTS     directory with pioloop.bin, mmioloop.bin,
#                           exit42_16.bin (default: kvm/guests of this repo)
#   KVMKIT_BENCH_ITERS      exits per C loop measurement (default 100000)
#   KVMKIT_BENCH_REPEATS    VM creations per C create measurement (default 200)
#   KVMKIT_BENCH_COUNT      runs of each side; the minimum is used (default 3)
#   KVMKIT_BENCH_BENCHTIME  go test -benchtime (default 1s)
#   KVMKIT_BENCH_STRICT=1   exit 1 if a ratio exceeds the target
#   KVMKIT_BENCH_CRESULTS + KVMKIT_BENCH_GORESULTS
#                           files holding a previous run's kvmbench and
#                           go test output: only print the table (no KVM
#                           needed), e.g. for results copied out of a lab.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
target=1.10
count=${KVMKIT_BENCH_COUNT:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

if [ -n "${KVMKIT_BENCH_CRESULTS:-}" ] && [ -n "${KVMKIT_BENCH_GORESULTS:-}" ]; then
	cp "$KVMKIT_BENCH_CRESULTS" "$tmp/c.out"
	cp "$KVMKIT_BENCH_GORESULTS" "$tmp/go.out"
else
	if [ ! -e /dev/kvm ]; then
		echo "kvm-exit: /dev/kvm not present; skipping the KVM exit benchmarks"
		exit 0
	fi
	guests=${KVMKIT_BENCH_GUESTS:-$root/kvm/guests}
	cbin=${KVMKIT_BENCH_CBIN:-}
	if [ -z "$cbin" ]; then
		cbin=$tmp/kvmbench
		gcc -O2 -Wall -o "$cbin" "$root/bench/c/kvmbench.c"
	fi
	echo "kvm-exit: running C reference $cbin" >&2
	"$cbin" -n "${KVMKIT_BENCH_ITERS:-100000}" -r "${KVMKIT_BENCH_REPEATS:-200}" -k "$count" \
		-p "$guests/pioloop.bin" -m "$guests/mmioloop.bin" -c "$guests/exit42_16.bin" \
		>"$tmp/c.out"
	benchre='BenchmarkPIOExit|BenchmarkMMIOExit|BenchmarkCreateToFirstExit'
	benchtime=${KVMKIT_BENCH_BENCHTIME:-1s}
	echo "kvm-exit: running Go benchmarks" >&2
	if [ -n "${KVMKIT_BENCH_GOTEST:-}" ]; then
		"$KVMKIT_BENCH_GOTEST" -test.run '^$' -test.bench "$benchre" \
			-test.benchtime "$benchtime" -test.count "$count" >"$tmp/go.out"
	else
		(cd "$root" && go test -run '^$' -bench "$benchre" \
			-benchtime "$benchtime" -count "$count" ./kvm/...) >"$tmp/go.out"
	fi
fi

# Table: one row per benchmark; Go = minimum ns/op over the runs (the C
# side already prints its minimum).
awk -v target="$target" '
FNR == 1 { file++ }
file == 1 && NF == 2 { c[$1] = $2 }
file == 2 && $1 ~ /^Benchmark/ {
	for (i = 3; i < NF; i++) if ($(i + 1) == "ns/op") {
		name = $1; sub(/-[0-9]+$/, "", name); sub(/\/.*/, "", name)
		if (!(name in g) || $i + 0 < g[name]) g[name] = $i + 0
	}
}
END {
	n = split("BenchmarkPIOExit pio_exit_ns BenchmarkMMIOExit mmio_exit_ns BenchmarkCreateToFirstExit create_to_first_exit_ns", m, " ")
	printf "%-28s %12s %12s %8s  %s\n", "benchmark", "Go ns/op", "C ns", "Go/C", "target<=" target
	over = 0
	for (i = 1; i < n; i += 2) {
		gn = (m[i] in g) ? sprintf("%.1f", g[m[i]]) : "-"
		cn = (m[i + 1] in c) ? sprintf("%.1f", c[m[i + 1]]) : "-"
		ratio = "-"; verdict = "missing"
		if ((m[i] in g) && (m[i + 1] in c) && c[m[i + 1]] > 0) {
			r = g[m[i]] / c[m[i + 1]]
			ratio = sprintf("%.2f", r)
			verdict = (r <= target) ? "ok" : "OVER"
			if (r > target) over = 1
		}
		printf "%-28s %12s %12s %8s  %s\n", m[i], gn, cn, ratio, verdict
	}
	exit over ? 3 : 0
}' "$tmp/c.out" "$tmp/go.out" || {
	rc=$?
	if [ "$rc" -eq 3 ] && [ "${KVMKIT_BENCH_STRICT:-0}" != 1 ]; then
		exit 0
	fi
	exit "$rc"
}
