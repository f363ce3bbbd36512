#!/usr/bin/env bash
# migrate-hops.sh: one self-checking dirtying guest migrated N times in a
# row over loopback TCP (issue 5's "100 migrations, zero lost writes, every
# downtime under 200 ms"), in one nested-lab boot.
#
# It runs TestLiveMigrateDirtyGuest (migration/machinevm) with
# KVMKIT_MIGRATE_HOPS hops (default 100) over a KVMKIT_MIGRATE_DIRTY_MIB
# range (default 64 MiB, rewritten page by page without pause; the guest
# prints LOST WRITE and exits 1 when a page lost the previous pass's value),
# first with one vCPU, then with two, so 2*N migrations. The test fails on
# a lost write or a guest that stops; this script adds the downtime check
# (tests carry no timed assertions) and prints, per vCPU count, the hops,
# the worst, mean and median downtime and the hops over the budget
# (KVMKIT_BENCH_BUDGET_MS, default 200). It exits 1 when the test failed
# or any hop went over the budget.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
bench_init migrate-hops

hops=${KVMKIT_MIGRATE_HOPS:-100}
mib=${KVMKIT_MIGRATE_DIRTY_MIB:-64}
budget=${KVMKIT_BENCH_BUDGET_MS:-200}

bench_log "building the machinevm test binary"
bench_gotest ./migration/machinevm "$stage/bin/machinevm.test"

cat >"$stage/payload.sh" <<EOF
hops=$hops mib=$mib budget=$budget
EOF
cat >>"$stage/payload.sh" <<'EOF'
out=/tmp/hops.out
KVMKIT_MIGRATE_HOPS=$hops KVMKIT_MIGRATE_DIRTY_MIB=$mib /lab/bench/bin/machinevm.test \
	-test.run '^TestLiveMigrateDirtyGuest$' -test.v -test.timeout 120m >$out 2>&1
rc=$?
grep -E '^(--- |FAIL|PASS)' $out
[ $rc = 0 ] || { echo "the test failed (status $rc); its last lines:"; grep -v ' INFO ' $out | tail -30; }
# "cpus=1 hop 7 at pass 812: downtime 61.07ms (target side ...), total ..."
grep -o 'cpus=[0-9]* hop [0-9]* at pass [0-9]*: downtime [^ ]*' $out | awk -v budget=$budget '
function ms(d) {
	if (d ~ /ms$/) return substr(d, 1, length(d) - 2) + 0
	if (d ~ /µs$/) return substr(d, 1, length(d) - 3) / 1000
	if (d ~ /us$/) return substr(d, 1, length(d) - 2) / 1000
	if (d ~ /ns$/) return substr(d, 1, length(d) - 2) / 1000000
	if (d ~ /s$/) return substr(d, 1, length(d) - 1) * 1000
	return -1
}
{
	split($1, c, "="); k = c[2]; v = ms($8)
	n[k]++; sum[k] += v; all[k, n[k]] = v
	if (v > max[k]) max[k] = v
	if (v > budget || v < 0) over[k]++
}
END {
	printf "%-6s %6s %10s %10s %10s %8s\n", "vcpus", "hops", "max_ms", "mean_ms", "median_ms", "over"
	bad = 0
	for (k in n) {
		# insertion sort for the median
		for (i = 2; i <= n[k]; i++) { x = all[k, i]; j = i - 1; while (j >= 1 && all[k, j] > x) { all[k, j + 1] = all[k, j]; j-- } all[k, j + 1] = x }
		med = (n[k] % 2) ? all[k, (n[k] + 1) / 2] : (all[k, n[k] / 2] + all[k, n[k] / 2 + 1]) / 2
		printf "%-6s %6d %10.1f %10.1f %10.1f %8d\n", k, n[k], max[k], sum[k] / n[k], med, over[k] + 0
		if (over[k] > 0) bad = 1
	}
	exit bad
}'
st=$?
[ $rc = 0 ] && [ $st = 0 ] || exit 1
echo "every hop under ${budget} ms, no lost write"
EOF

bench_log "booting the lab ($hops hops x 2, ${mib} MiB dirtied)"
bench_lab 120m
