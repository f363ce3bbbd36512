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
