package migration

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func TestForEachDataPage(t *testing.T) {
	tests := []struct {
		name    string
		written []uint64 // pages written before the walk
		want    [][2]uint64
		holes   uint64
	}{
		{"untouched", nil, nil, 64},
		{"first and last", []uint64{0, 63}, [][2]uint64{{0, 1}, {63, 64}}, 62},
		{"a run in the middle", []uint64{10, 11, 12}, [][2]uint64{{10, 13}}, 61},
		{"all", func() []uint64 {
			var all []uint64
			for p := range uint64(64) {
				all = append(all, p)
			}
			return all
		}(), [][2]uint64{{0, 64}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem, err := kvm.NewMemory([]kvm.RegionSpec{{GPA: 0, Size: 64 * pageSize}}, kvm.MemoryOptions{Memfd: true, Name: "holes-test"})
			require.NoError(t, err)
			defer mem.Close()
			r := mem.Regions()[0]
			for _, p := range tt.written {
				r.Host[p*pageSize+7] = 1
			}
			var got [][2]uint64
			var holes uint64
			require.NoError(t, forEachDataPage(r.FD, 64, func(first, end uint64) error {
				got = append(got, [2]uint64{first, end})
				return nil
			}, func(n uint64) { holes = n }))
			assert.Equal(t, tt.want, got)
			assert.Equal(t, tt.holes, holes)
		})
	}
}

func TestForEachDataPageAnonymous(t *testing.T) {
	var got [][2]uint64
	require.NoError(t, forEachDataPage(-1, 8, func(first, end uint64) error {
		got = append(got, [2]uint64{first, end})
		return nil
	}, func(uint64) { t.Fatal("no holes without a file") }))
	assert.Equal(t, [][2]uint64{{0, 8}}, got)
}
