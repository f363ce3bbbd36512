#!/usr/bin/env bash
# test.sh — kvmkit's test command (the one the README and .ci/run use).
#
#  1. gofmt and go vet over the module;
#  2. go test ./... on this host (tests that need /dev/kvm run when it
#     exists and skip with a one-line reason when it does not);
#  3. every fuzz target for a few seconds (KVMKIT_FUZZTIME, default 4s);
#  4. where this host has no /dev/kvm, the KVM tests again inside the
#     nested lab (tools/nestlab: QEMU TCG with emulated AMD SVM, an L1
#     Linux with a real /dev/kvm), including the Linux guest tests with the
#     test kernel from tools/testkernel. A lab test that fails is run
#     once more in a fresh L1 (printed as LAB FLAKE when it then passes).
#
# It fails when any step fails. KVMKIT_SKIP_LAB=1 skips step 4,
# KVMKIT_FUZZTIME=0 skips step 3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "gofmt"
bad="$(gofmt -l .)"
if [[ -n "$bad" ]]; then
	echo "gofmt needed on:"; echo "$bad"; exit 1
fi

step "go vet"
go vet ./...

step "go test (host)"
go test -count=1 ./...

fuzztime="${KVMKIT_FUZZTIME:-4s}"
if [[ "$fuzztime" != 0 ]]; then
	step "fuzz targets, $fuzztime each"
	grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r f; do
		pkg="./$(dirname "${f#./}")"
		for name in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | cut -d' ' -f2); do
			echo "fuzz $pkg $name"
			fuzz1() { go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -fuzzminimizetime 10x "$pkg" >/tmp/kvmkit-fuzz.log 2>&1; }
			if ! fuzz1; then
				# The fuzzing engine itself sometimes stops at its deadline
				# with "context deadline exceeded" and no crasher on a loaded
				# machine; that (and only that) is run once more.
				if grep -q 'context deadline exceeded' /tmp/kvmkit-fuzz.log && ! grep -q 'Failing input written' /tmp/kvmkit-fuzz.log; then
					echo "  (fuzzing engine timed out without a finding; once more)"
					fuzz1 || { cat /tmp/kvmkit-fuzz.log; echo "FAIL: fuzz $pkg $name"; exit 1; }
				else
					cat /tmp/kvmkit-fuzz.log; echo "FAIL: fuzz $pkg $name"; exit 1
				fi
			fi
		done
	done
fi

if [[ -c /dev/kvm ]]; then
	step "KVM tests ran on this host's /dev/kvm above"
elif [[ "${KVMKIT_SKIP_LAB:-}" == 1 ]]; then
	step "no /dev/kvm and KVMKIT_SKIP_LAB=1: KVM tests skipped"
else
	step "KVM tests in the nested lab (no /dev/kvm on this host)"
	# Two L1 boots keep each one short. When L1 itself hangs, stalls (its
	# console and heartbeat silent for 2 minutes) or dies, nestlab boots a
	# fresh one and goes on with the unfinished tests (--resume: QEMU's
	# software emulation of nested SVM is not perfectly stable). When tests
	# fail (status 1), exactly those top-level tests run once more in a
	# fresh L1 and the first failure is printed as a LAB FLAKE; a test that
	# fails twice fails the run, and so does a package that failed without
	# naming a test (a panic, a timeout).
	nestlab="$(mktemp -d)/nestlab"
	go build -o "$nestlab" ./tools/nestlab # go run would turn every status into 1
	boot() {
		"$nestlab" gotest --testkernel --timeout 25m --pkgtimeout 12m --stall 2m --resume 3 "$@"
	}
	lab() {
		local log rc=0
		log="$(mktemp)"
		boot "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
		((rc == 1)) || return "$rc"
		local names
		names="$(bash tools/labfails.sh <"$log")" || {
			echo "tools/test.sh: a lab package failed without a failing test to name; not retried"
			return 1
		}
		echo
		echo "LAB FLAKE? these lab tests failed once; running them again in a fresh L1: $names"
		boot --run "^(${names})\$" "$@" || return $?
		echo "LAB FLAKE: $names failed once and passed when run again (see the first run above)"
	}
	lab ./kvm ./kvm/machine ./migration/machinevm ./examples/testlab
	lab ./examples/vmm
fi
echo
echo "tools/test.sh: all steps passed"
