#!/usr/bin/env bash
# labfails.sh — reads a `nestlab gotest` log on stdin and prints the failed
# top-level tests as one regexp alternation (A|B). It exits 1 when a failed
# package names no failed test, or also panicked, timed out, failed to
# build or lost its L1: such a failure is not a test to run again.
set -euo pipefail
awk '
	# Failures count until the package result line (ok/FAIL); a run that
	# nestlab resumed in a fresh L1 prints the package tests in two parts.
	/^ok  \t/ { n = 0; pbad = 0 }
	/^--- FAIL: / { cur[++n] = $3 }
	/^panic: / { pbad = 1 }
	/^FAIL\t/ {
		if (n == 0 || pbad || $0 ~ /\[/) { bad = 1 }
		for (i = 1; i <= n; i++) { if (!(cur[i] in seen)) { seen[cur[i]] = 1; out = out (out == "" ? "" : "|") cur[i] } }
		n = 0; pbad = 0
	}
	END {
		if (bad || out == "") { exit 1 }
		print out
	}
'
