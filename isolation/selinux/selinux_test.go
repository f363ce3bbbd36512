package selinux

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLabelStrings(t *testing.T) {
	m := MCS{Low: 12, High: 345}
	assert.Equal(t, "system_u:system_r:svirt_t:s0:c12,c345", ProcessLabel(m).String())
	assert.Equal(t, "system_u:object_r:svirt_image_t:s0:c12,c345", ImageLabel(m).String())
	l, err := ParseLabel("system_u:system_r:svirt_t:s0:c345,c12")
	require.NoError(t, err)
	assert.Equal(t, ProcessLabel(m), l)
}

func TestParseLabelErrors(t *testing.T) {
	for _, s := range []string{"", "a:b:c:s0", "a:b:c:s0:c1", "a:b:c:s0:c1,c1", "a::c:s0:c1,c2",
		"a:b:c:s0:c1,c1024", "a:b:c:s0:x1,c2", "a:b:c:s0:c-1,c2"} {
		_, err := ParseLabel(s)
		assert.ErrorIs(t, err, ErrBadLabel, s)
	}
}

func FuzzParseLabel(f *testing.F) {
	f.Add("system_u:system_r:svirt_t:s0:c12,c345")
	f.Add("a:b:c:d:c1,c2:extra")
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseLabel(s)
		if err != nil {
			return
		}
		require.Less(t, l.MCS.Low, l.MCS.High)
		again, err := ParseLabel(l.String())
		require.NoError(t, err)
		require.Equal(t, l, again)
	})
}

func TestAllocatorUniqueAndExhaustion(t *testing.T) {
	a := NewAllocator(10, 13) // 4 categories: 6 pairs
	require.Equal(t, 6, a.Capacity())
	seen := map[MCS]bool{}
	for range 6 {
		m, err := a.Allocate()
		require.NoError(t, err)
		assert.False(t, seen[m], "duplicate %s", m)
		assert.Less(t, m.Low, m.High)
		assert.GreaterOrEqual(t, m.Low, 10)
		assert.LessOrEqual(t, m.High, 13)
		seen[m] = true
	}
	_, err := a.Allocate()
	require.ErrorIs(t, err, ErrExhausted)
	// Reuse after release.
	a.Release(MCS{Low: 11, High: 12})
	m, err := a.Allocate()
	require.NoError(t, err)
	assert.Equal(t, MCS{Low: 11, High: 12}, m)
	assert.Equal(t, 6, a.InUse())
}

func TestAllocatorReserve(t *testing.T) {
	a := NewAllocator(0, 1023)
	require.NoError(t, a.Reserve(MCS{Low: 1, High: 2}))
	assert.ErrorIs(t, a.Reserve(MCS{Low: 1, High: 2}), ErrInUse)
	assert.ErrorIs(t, a.Reserve(MCS{Low: 2, High: 2}), ErrOutOfRange)
	assert.ErrorIs(t, NewAllocator(5, 6).Reserve(MCS{Low: 1, High: 6}), ErrOutOfRange)
	assert.Panics(t, func() { NewAllocator(3, 3) })
}

func TestAllocatorConcurrent(t *testing.T) {
	a := NewAllocator(0, 1023)
	var mu sync.Mutex
	seen := map[MCS]bool{}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 500 {
				m, err := a.Allocate()
				if !assert.NoError(t, err) {
					return
				}
				mu.Lock()
				assert.False(t, seen[m])
				seen[m] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	assert.Len(t, seen, 4000)
}

func TestReserveRunning(t *testing.T) {
	proc := t.TempDir()
	for pid, label := range map[string]string{
		"1":    "system_u:system_r:init_t:s0",
		"42":   "system_u:system_r:svirt_t:s0:c7,c9",
		"43":   "system_u:system_r:svirt_t:s0:c7,c9",
		"self": "system_u:system_r:svirt_t:s0:c1,c2",
	} {
		require.NoError(t, os.MkdirAll(filepath.Join(proc, pid, "attr"), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(proc, pid, "attr", "current"), []byte(label+"\x00"), 0o644))
	}
	a := NewAllocator(0, 1023)
	n, err := a.ReserveRunning(proc)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	assert.ErrorIs(t, a.Reserve(MCS{Low: 7, High: 9}), ErrInUse)
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"auto": ModeAuto, "off": ModeOff, "": ModeOff, "require": ModeRequire, "ON": ModeRequire} {
		got, err := ParseMode(in)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	_, err := ParseMode("permissive")
	assert.ErrorIs(t, err, ErrBadMode)
}

type fakeHost struct {
	enabled bool
	labels  map[string]string
	failSet string
}

func (f *fakeHost) Enabled() bool { return f.enabled }
func (f *fakeHost) FileLabel(p string) (string, error) {
	l, ok := f.labels[p]
	if !ok {
		return "", os.ErrNotExist
	}
	return l, nil
}
func (f *fakeHost) SetFileLabel(p, l string) error {
	if p == f.failSet {
		return errors.New("EPERM")
	}
	f.labels[p] = l
	return nil
}

func TestSetupLabelsAndRestores(t *testing.T) {
	h := &fakeHost{enabled: true, labels: map[string]string{"/img": "system_u:object_r:virt_image_t:s0"}}
	a := NewAllocator(0, 1023)
	s, err := Setup(ModeAuto, h, a, []string{"/img"}, nil)
	require.NoError(t, err)
	require.True(t, s.Active())
	l, err := ParseLabel(s.ExecLabel())
	require.NoError(t, err)
	assert.Equal(t, "svirt_t", l.Type)
	assert.Equal(t, ImageLabel(s.MCS()).String(), h.labels["/img"])
	assert.Equal(t, 1, a.InUse())
	require.NoError(t, s.Close())
	assert.Equal(t, "system_u:object_r:virt_image_t:s0", h.labels["/img"])
	assert.Equal(t, 0, a.InUse())
}

func TestSetupFailureReleases(t *testing.T) {
	h := &fakeHost{enabled: true, labels: map[string]string{"/a": "x", "/b": "y"}, failSet: "/b"}
	a := NewAllocator(0, 1023)
	_, err := Setup(ModeRequire, h, a, []string{"/a", "/b"}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "/b")
	assert.Equal(t, 0, a.InUse())
	assert.Equal(t, "x", h.labels["/a"])
}

func TestSetupDisabled(t *testing.T) {
	h := &fakeHost{enabled: false}
	a := NewAllocator(0, 1023)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	s, err := Setup(ModeAuto, h, a, []string{"/img"}, log)
	require.NoError(t, err)
	assert.False(t, s.Active())
	assert.Empty(t, s.ExecLabel())
	assert.Contains(t, logs.String(), "SELinux is disabled")
	_, err = Setup(ModeRequire, h, a, nil, log)
	assert.ErrorIs(t, err, ErrDisabled)
	s, err = Setup(ModeOff, h, a, nil, log)
	require.NoError(t, err)
	assert.False(t, s.Active())
}

// TestRealHost exercises the opencontainers/selinux path on this host:
// where selinuxfs exists it labels a real file; elsewhere it checks that
// the host is reported as disabled.
func TestRealHost(t *testing.T) {
	h := RealHost{}
	if !h.Enabled() {
		_, err := Setup(ModeRequire, h, NewAllocator(0, 1023), nil, nil)
		require.ErrorIs(t, err, ErrDisabled)
		t.Log("SELinux disabled on this host: enforcement path not exercised")
		return
	}
	f := filepath.Join(t.TempDir(), "img")
	require.NoError(t, os.WriteFile(f, nil, 0o644))
	s, err := Setup(ModeRequire, h, NewAllocator(0, 1023), []string{f}, nil)
	require.NoError(t, err)
	got, err := h.FileLabel(f)
	require.NoError(t, err)
	assert.Equal(t, ImageLabel(s.MCS()).String(), got)
	require.NoError(t, s.Close())
}

func ExampleSetup() {
	alloc := NewAllocator(0, 1023)
	s, err := Setup(ModeAuto, RealHost{}, alloc, nil, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Close()
	fmt.Println(ProcessLabel(MCS{Low: 12, High: 345}))
	// Output: system_u:system_r:svirt_t:s0:c12,c345
}
