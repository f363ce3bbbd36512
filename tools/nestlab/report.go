package main

import (
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/kvmkit/kvmkit/tools/nestlab/lab"
)

// pkgReporter turns gotest PKG-START/PKG-END markers into `go test` style
// result lines, timed on the host, and remembers which top-level tests
// each package has finished so that a run cut short by a lost L1 can
// resume in a fresh one (remaining).
type pkgReporter struct {
	w          io.Writer
	pkgs       []lab.TestPackage
	started    map[int]time.Time
	done       map[int]bool
	failed     bool
	now        func() time.Time
	current    int              // package running now; -1 between packages
	ran        map[int][]string // top-level tests that finished, per package
	testFailed map[int]bool     // a top-level test of the package failed
}

func newPkgReporter(w io.Writer, pkgs []lab.TestPackage) *pkgReporter {
	return &pkgReporter{w: w, pkgs: pkgs, started: map[int]time.Time{}, done: map[int]bool{}, now: time.Now,
		current: -1, ran: map[int][]string{}, testFailed: map[int]bool{}}
}

// topLevelResult matches `go test -v` result lines of top-level tests
// (subtests are indented).
var topLevelResult = regexp.MustCompile(`^--- (PASS|FAIL|SKIP): (\S+) \(`)

// line records a finished top-level test of the running package.
func (r *pkgReporter) line(s string) {
	if r.current < 0 {
		return
	}
	m := topLevelResult.FindStringSubmatch(s)
	if m == nil {
		return
	}
	r.ran[r.current] = append(r.ran[r.current], m[2])
	if m[1] == "FAIL" {
		r.testFailed[r.current] = true
	}
}

// remaining returns the package runs still to do, each with args; a
// package that was cut short skips (-test.skip) the top-level tests it
// already finished. The test that was running when L1 was lost runs again.
func (r *pkgReporter) remaining(args []string) []lab.PackageRun {
	var runs []lab.PackageRun
	for i := range r.pkgs {
		if r.done[i] {
			continue
		}
		a := append([]string(nil), args...)
		if names := r.ran[i]; len(names) > 0 {
			q := make([]string, len(names))
			for j, n := range names {
				q[j] = regexp.QuoteMeta(n)
			}
			a = append(a, "-test.skip=^("+strings.Join(q, "|")+")$")
		}
		runs = append(runs, lab.PackageRun{Index: i, Args: a})
	}
	return runs
}

// skipped says how many finished tests remaining skips.
func (r *pkgReporter) skipped() int {
	n := 0
	for i, names := range r.ran {
		if !r.done[i] {
			n += len(names)
		}
	}
	return n
}

func (r *pkgReporter) marker(m lab.Marker) {
	if m.Index < 0 || m.Index >= len(r.pkgs) {
		return
	}
	switch m.Kind {
	case lab.MarkerPkgStart:
		r.started[m.Index] = r.now()
		r.current = m.Index
	case lab.MarkerPkgEnd:
		r.current = -1
		if r.done[m.Index] {
			return
		}
		r.done[m.Index] = true
		d := r.now().Sub(r.started[m.Index]).Seconds()
		if m.Code == 0 && !r.testFailed[m.Index] {
			fmt.Fprintf(r.w, "ok  \t%s\t%.3fs\n", r.pkgs[m.Index].ImportPath, d)
		} else {
			r.failed = true
			fmt.Fprintf(r.w, "FAIL\t%s\t%.3fs\n", r.pkgs[m.Index].ImportPath, d)
		}
	}
}

// unfinished reports packages that never finished (L1 died or timed out).
func (r *pkgReporter) unfinished() {
	for i, p := range r.pkgs {
		if r.done[i] {
			continue
		}
		r.failed = true
		why := "not run"
		if _, ok := r.started[i]; ok {
			why = "did not finish"
		}
		fmt.Fprintf(r.w, "FAIL\t%s [%s: L1 ended]\n", p.ImportPath, why)
	}
}
