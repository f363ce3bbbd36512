package main

import (
	"fmt"
	"io"
	"time"

	"github.com/kvmkit/kvmkit/tools/nestlab/lab"
)

// pkgReporter turns gotest PKG-START/PKG-END markers into `go test` style
// result lines, timed on the host.
type pkgReporter struct {
	w       io.Writer
	pkgs    []lab.TestPackage
	started map[int]time.Time
	done    map[int]bool
	failed  bool
	now     func() time.Time
}

func newPkgReporter(w io.Writer, pkgs []lab.TestPackage) *pkgReporter {
	return &pkgReporter{w: w, pkgs: pkgs, started: map[int]time.Time{}, done: map[int]bool{}, now: time.Now}
}

func (r *pkgReporter) marker(m lab.Marker) {
	if m.Index < 0 || m.Index >= len(r.pkgs) {
		return
	}
	switch m.Kind {
	case lab.MarkerPkgStart:
		r.started[m.Index] = r.now()
	case lab.MarkerPkgEnd:
		if r.done[m.Index] {
			return
		}
		r.done[m.Index] = true
		d := r.now().Sub(r.started[m.Index]).Seconds()
		if m.Code == 0 {
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
