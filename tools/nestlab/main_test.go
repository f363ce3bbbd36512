package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/kvmkit/kvmkit/tools/nestlab/lab"
)

func TestPkgReporter(t *testing.T) {
	var out bytes.Buffer
	pkgs := []lab.TestPackage{{ImportPath: "ex.com/a"}, {ImportPath: "ex.com/b"}, {ImportPath: "ex.com/c"}, {ImportPath: "ex.com/d"}}
	r := newPkgReporter(&out, pkgs)
	now := time.Unix(100, 0)
	r.now = func() time.Time { return now }
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 0})
	now = now.Add(1500 * time.Millisecond)
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 0, Code: 0})
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 1})
	now = now.Add(250 * time.Millisecond)
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 1, Code: 1})
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 1, Code: 0}) // duplicate ignored
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 2})
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 99}) // out of range ignored
	assert.Equal(t, "ok  \tex.com/a\t1.500s\nFAIL\tex.com/b\t0.250s\n", out.String())
	assert.True(t, r.failed)
	out.Reset()
	r.unfinished()
	assert.Equal(t, "FAIL\tex.com/c [did not finish: L1 ended]\nFAIL\tex.com/d [not run: L1 ended]\n", out.String())
}

func TestPkgReporterResume(t *testing.T) {
	var out bytes.Buffer
	pkgs := []lab.TestPackage{{ImportPath: "ex.com/a"}, {ImportPath: "ex.com/b"}, {ImportPath: "ex.com/c"}}
	r := newPkgReporter(&out, pkgs)
	args := []string{"-test.timeout=1m"}
	assert.Equal(t, []lab.PackageRun{{Index: 0, Args: args}, {Index: 1, Args: args}, {Index: 2, Args: args}}, r.remaining(args))

	// First L1: a passes; b finishes two tests (one fails, one is named
	// like a regexp), a subtest line and a line outside any package do not
	// count, then L1 is lost while b runs TestStuck.
	r.line("--- PASS: TestOutside (0.00s)")
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 0})
	r.line("--- PASS: TestA (0.10s)")
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 0, Code: 0})
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 1})
	r.line("--- FAIL: TestB1 (0.20s)")
	r.line("    --- PASS: TestB1/sub (0.10s)")
	r.line("--- SKIP: TestB.2 (0.00s)")
	r.line("=== RUN   TestStuck")
	assert.Equal(t, []lab.PackageRun{
		{Index: 1, Args: []string{"-test.timeout=1m", `-test.skip=^(TestB1|TestB\.2)$`}},
		{Index: 2, Args: args},
	}, r.remaining(args))
	assert.Equal(t, 2, r.skipped())

	// Second L1: b's remaining test passes, but its earlier failure stands.
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 1})
	r.line("--- PASS: TestStuck (1.00s)")
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 1, Code: 0})
	r.marker(lab.Marker{Kind: lab.MarkerPkgStart, Index: 2})
	r.marker(lab.Marker{Kind: lab.MarkerPkgEnd, Index: 2, Code: 0})
	assert.Empty(t, r.remaining(args))
	assert.Contains(t, out.String(), "ok  \tex.com/a\t")
	assert.Contains(t, out.String(), "FAIL\tex.com/b\t")
	assert.Contains(t, out.String(), "ok  \tex.com/c\t")
	assert.True(t, r.failed)
}

func TestRunUsage(t *testing.T) {
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 2, "usage:"},
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{"run"}, 2, "missing command"},
		{[]string{"run", "--nope"}, 2, "flag provided but not defined"},
		{[]string{"run", "--tcg-thread", "both", "--", "true"}, 2, "want multi or single"},
		{[]string{"gotest"}, 2, "no packages"},
		{[]string{"selftest", "extra"}, 2, "takes no arguments"},
		{[]string{"exec"}, 2, "missing BINARY"},
		{[]string{"help"}, 0, ""},
	}
	for _, tt := range tests {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tt.args, &stdout, &stderr)
		assert.Equal(t, tt.code, code, "%v: %s", tt.args, stderr.String())
		assert.Contains(t, stderr.String(), tt.msg, "%v", tt.args)
	}
}
