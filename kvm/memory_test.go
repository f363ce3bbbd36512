package kvm

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestMemoryBounds(t *testing.T) {
	for _, memfd := range []bool{false, true} {
		m, err := NewMemory([]RegionSpec{{GPA: 0, Size: 2 * PageSize}, {GPA: 2 * PageSize, Size: PageSize}, {GPA: 0x10000, Size: PageSize}}, MemoryOptions{Memfd: memfd})
		require.NoError(t, err)
		defer m.Close()
		assert.Equal(t, uint64(4*PageSize), m.Size())

		cases := []struct {
			name string
			gpa  int64
			n    int
			ok   bool
		}{
			{"start", 0, 8, true},
			{"spans adjacent regions", 2*PageSize - 4, 8, true},
			{"end of contiguous RAM", 3*PageSize - 8, 8, true},
			{"crosses into hole", 3*PageSize - 4, 8, false},
			{"in hole", 0x8000, 1, false},
			{"last region", 0x10000, PageSize, true},
			{"past last region", 0x10000, PageSize + 1, false},
			{"negative", -1, 1, false},
			{"huge", 1 << 62, 16, false},
			{"wraps", int64(^uint64(0) >> 1), 16, false},
		}
		for _, c := range cases {
			buf := make([]byte, c.n)
			_, werr := m.WriteAt(buf, c.gpa)
			_, rerr := m.ReadAt(buf, c.gpa)
			if c.ok {
				assert.NoError(t, werr, c.name)
				assert.NoError(t, rerr, c.name)
			} else {
				assert.ErrorIs(t, werr, ErrOutOfBounds, c.name)
				assert.ErrorIs(t, rerr, ErrOutOfBounds, c.name)
				var ae *AddressError
				assert.True(t, errors.As(rerr, &ae), c.name)
			}
		}
	}
}

func TestMemoryReadWriteAndSlice(t *testing.T) {
	m, err := SingleRegion(16*PageSize, MemoryOptions{Memfd: true})
	require.NoError(t, err)
	defer m.Close()
	require.GreaterOrEqual(t, m.Regions()[0].FD, 0)

	_, err = m.WriteAt([]byte("kvmkit"), 0x1234)
	require.NoError(t, err)
	s, err := m.Slice(0x1234, 6)
	require.NoError(t, err)
	assert.Equal(t, "kvmkit", string(s))
	s[0] = 'K'
	got := make([]byte, 6)
	_, err = m.ReadAt(got, 0x1234)
	require.NoError(t, err)
	assert.Equal(t, "Kvmkit", string(got))

	_, err = m.Slice(16*PageSize-1, 2)
	assert.ErrorIs(t, err, ErrOutOfBounds)
	_, err = m.Slice(^uint64(0), 2)
	assert.ErrorIs(t, err, ErrOutOfBounds)
}

func TestMemoryRejectsBadSpecs(t *testing.T) {
	cases := []struct {
		name  string
		specs []RegionSpec
	}{
		{"unaligned size", []RegionSpec{{GPA: 0, Size: 100}}},
		{"unaligned base", []RegionSpec{{GPA: 1, Size: PageSize}}},
		{"empty", []RegionSpec{{GPA: 0, Size: 0}}},
		{"overlap", []RegionSpec{{GPA: 0, Size: 2 * PageSize}, {GPA: PageSize, Size: PageSize}}},
	}
	for _, c := range cases {
		_, err := NewMemory(c.specs, MemoryOptions{})
		assert.Error(t, err, c.name)
	}
}

func FuzzMemoryAccess(f *testing.F) {
	m, err := NewMemory([]RegionSpec{{GPA: 0, Size: 4 * PageSize}, {GPA: 8 * PageSize, Size: PageSize}}, MemoryOptions{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(int64(0), uint16(8), uint64(0), uint16(8))
	f.Add(int64(4*PageSize-1), uint16(2), uint64(8*PageSize), uint16(4096))
	f.Fuzz(func(t *testing.T, gpa int64, n uint16, sgpa uint64, sn uint16) {
		buf := make([]byte, n)
		if _, err := m.ReadAt(buf, gpa); err != nil && !errors.Is(err, ErrOutOfBounds) {
			t.Fatalf("unexpected error type: %v", err)
		}
		if _, err := m.WriteAt(buf, gpa); err != nil && !errors.Is(err, ErrOutOfBounds) {
			t.Fatalf("unexpected error type: %v", err)
		}
		if s, err := m.Slice(sgpa, uint64(sn)); err == nil && len(s) != int(sn) {
			t.Fatalf("slice len %d, want %d", len(s), sn)
		}
	})
}

func TestMemoryMoveFrom(t *testing.T) {
	specs := []RegionSpec{{GPA: 0, Size: 4 * PageSize}, {GPA: 1 << 20, Size: 2 * PageSize}}
	fill := func(m *Memory, b byte) {
		for _, r := range m.Regions() {
			for i := range r.Host {
				r.Host[i] = b
			}
		}
	}
	for _, memfd := range []bool{false, true} {
		dst, err := NewMemory(specs, MemoryOptions{Memfd: true})
		require.NoError(t, err)
		fill(dst, 0xAA)
		src, err := NewMemory(specs, MemoryOptions{Memfd: memfd})
		require.NoError(t, err)
		fill(src, 0x55)
		before := dst.Regions()[1].Host
		srcHost, srcFD := src.Regions()[1].Host, src.Regions()[1].FD

		require.NoError(t, dst.MoveFrom(src))
		after := dst.Regions()[1].Host
		assert.Equal(t, &before[0], &after[0], "memfd=%v: the host address stays", memfd)
		for _, r := range dst.Regions() {
			assert.Equal(t, bytes.Repeat([]byte{0x55}, len(r.Host)), r.Host, "memfd=%v: region %#x holds the source's pages", memfd, r.GPA)
		}
		assert.Equal(t, srcFD, dst.Regions()[1].FD, "memfd=%v: the source's memfd is taken over", memfd)
		assert.Empty(t, src.Regions())
		assert.ErrorIs(t, unix.Munmap(srcHost), unix.EINVAL, "memfd=%v: the moved mapping is no longer recorded", memfd)
		require.NoError(t, src.Close())
		require.NoError(t, dst.Close())
	}
}

func TestMemoryMoveFromRejectsOtherLayouts(t *testing.T) {
	dst, err := NewMemory([]RegionSpec{{GPA: 0, Size: 2 * PageSize}}, MemoryOptions{})
	require.NoError(t, err)
	defer dst.Close()
	for name, specs := range map[string][]RegionSpec{
		"size":    {{GPA: 0, Size: PageSize}},
		"address": {{GPA: PageSize, Size: 2 * PageSize}},
		"count":   {{GPA: 0, Size: 2 * PageSize}, {GPA: 1 << 20, Size: PageSize}},
	} {
		src, err := NewMemory(specs, MemoryOptions{})
		require.NoError(t, err)
		assert.Error(t, dst.MoveFrom(src), name)
		assert.Len(t, src.Regions(), len(specs), "%s: the source keeps its memory", name)
		require.NoError(t, src.Close())
	}
}
