package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func TestParseSpec(t *testing.T) {
	good := `[{"name":"a","guest":"hello64","expect":{"output":"Hello"}},
	          {"guest":"exit42","timeout":"5s","expect":{"exit_code":42}},
	          {"name":"k","kernel":"bz","mem":"256M","cpus":2,"expect":{"crash":"panic"}}]`
	cases, err := ParseSpec(strings.NewReader(good))
	require.NoError(t, err)
	require.Len(t, cases, 3)
	assert.Equal(t, "case2", cases[1].Name)
	bad := []struct{ spec, msg string }{
		{`[]`, "0 cases"},
		{`{}`, "spec"},
		{`[{"name":"a"}]`, "exactly one"},
		{`[{"guest":"nope"}]`, "nope"},
		{`[{"guest":"hello64","mode":"x"}]`, "mode"},
		{`[{"guest":"hello64","mem":"lots"}]`, "size"},
		{`[{"guest":"hello64","cpus":99}]`, "cpus"},
		{`[{"guest":"hello64","expect":{"exit_code":300}}]`, "exit_code"},
		{`[{"guest":"hello64","bogus":1}]`, "unknown field"},
		{`[{"name":"x","guest":"hello64"},{"name":"x","guest":"exit42"}]`, "twice"},
		{`[{"guest":"hello64","timeout":"soon"}]`, "duration"},
	}
	for _, b := range bad {
		_, err := ParseSpec(strings.NewReader(b.spec))
		require.Error(t, err, b.spec)
		assert.Contains(t, err.Error(), b.msg, b.spec)
	}
}

func FuzzParseSpec(f *testing.F) {
	f.Add(`[{"name":"a","guest":"hello64","expect":{"output":"Hello"}}]`)
	f.Add(`[{"kernel":"k","timeout":"1s","cpus":3}]`)
	f.Fuzz(func(t *testing.T, s string) {
		cases, err := ParseSpec(strings.NewReader(s))
		if err == nil {
			assert.NotEmpty(t, cases)
		}
	})
}

// TestBuiltinSuite runs the built-in suite four VMs at a time: the
// crashing and hung guests fail only their own cases as expected, and
// every case passes.
func TestBuiltinSuite(t *testing.T) {
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"-parallel", "4"}, &out, &errb)
	t.Log(out.String())
	assert.Equal(t, 0, code, "stdout: %s\nstderr: %s", out.String(), errb.String())
	assert.Contains(t, out.String(), "8 passed, 0 failed")
}

// TestFailuresAreReported: wrong expectations fail their cases with a
// reason, and the run still reports every case.
func TestFailuresAreReported(t *testing.T) {
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
	cases := []Case{
		{Name: "wrong code", Guest: "exit42", Expect: Expect{ExitCode: 1}},
		{Name: "unexpected crash", Guest: "triple"},
		{Name: "missing output", Guest: "hello64", Expect: Expect{Output: "goodbye"}},
		{Name: "fine", Guest: "hello16", Expect: Expect{Output: "real-mode"}},
	}
	res := RunAll(context.Background(), cases, 2)
	require.Len(t, res, 4)
	assert.False(t, res[0].Passed)
	assert.Contains(t, res[0].Reason, "exit code 42, want 1")
	assert.False(t, res[1].Passed)
	assert.Contains(t, res[1].Outcome, "triple fault")
	assert.False(t, res[2].Passed)
	assert.Contains(t, res[2].Reason, "goodbye")
	assert.True(t, res[3].Passed, res[3].Reason)
	// All four share a shape: the pool had two VMs ready before the
	// first case started.
	prebuilt := 0
	for _, r := range res {
		if r.PrebuiltVM {
			prebuilt++
		}
	}
	assert.GreaterOrEqual(t, prebuilt, 2)
}
