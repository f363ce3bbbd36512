package boot

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func TestBuildE820(t *testing.T) {
	const gib = 1 << 30
	tests := []struct {
		name     string
		ram      []kvm.RegionSpec
		reserved []E820Entry
		want     []E820Entry
	}{
		{
			name: "single region",
			ram:  []kvm.RegionSpec{{GPA: 0, Size: 256 * testMiB}},
			want: []E820Entry{{0, 0x9FC00, E820RAM}, {0x9FC00, 0x60400, E820Reserved}, {0x100000, 255 * testMiB, E820RAM}},
		},
		{
			name: "32-bit hole and high RAM",
			ram:  []kvm.RegionSpec{{GPA: 4 * gib, Size: gib}, {GPA: 0, Size: 3 * gib}},
			reserved: []E820Entry{
				{Addr: 0xFEC00000, Size: 0x1000},              // IOAPIC
				{Addr: 0xE0000000, Size: 0x10000000, Type: 0}, // MMCONFIG, type 0 = reserved
			},
			want: []E820Entry{
				{0, 0x9FC00, E820RAM}, {0x9FC00, 0x60400, E820Reserved}, {0x100000, 3*gib - 0x100000, E820RAM},
				{0xE0000000, 0x10000000, E820Reserved}, {0xFEC00000, 0x1000, E820Reserved}, {4 * gib, gib, E820RAM},
			},
		},
		{
			name:     "ACPI type kept",
			ram:      []kvm.RegionSpec{{GPA: 0, Size: 2 * testMiB}},
			reserved: []E820Entry{{Addr: 0xE0000, Size: 0x10000, Type: E820ACPI}},
			want:     []E820Entry{{0, 0x9FC00, E820RAM}, {0x9FC00, 0x60400, E820Reserved}, {0xE0000, 0x10000, E820ACPI}, {0x100000, testMiB, E820RAM}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ram, err := ramOf(nil, tt.ram)
			require.NoError(t, err)
			got, err := BuildE820(ram, tt.reserved)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
	_, err := BuildE820([]kvm.RegionSpec{{GPA: 0, Size: testMiB}}, make([]E820Entry, 200))
	var le *LayoutError
	require.ErrorAs(t, err, &le)
	assert.Equal(t, "e820", le.What)
	_, err = BuildE820([]kvm.RegionSpec{{GPA: 0, Size: testMiB}}, make([]E820Entry, maxE820Entries))
	require.ErrorAs(t, err, &le, "zero-size reserved entry")
}

func TestRAMOfRejectsOverlap(t *testing.T) {
	_, err := ramOf(nil, []kvm.RegionSpec{{GPA: 0, Size: 2 * testMiB}, {GPA: testMiB, Size: testMiB}})
	var le *LayoutError
	require.ErrorAs(t, err, &le)
	assert.Equal(t, "RAM", le.What)
}

func TestPlaceInitrd(t *testing.T) {
	const gib = 1 << 30
	split := []kvm.RegionSpec{{GPA: 0, Size: 3 * gib}, {GPA: 4 * gib, Size: 4 * gib}}
	tests := []struct {
		name       string
		ram        []kvm.RegionSpec
		size       uint64
		low, limit uint64
		want       uint64
		fail       bool
	}{
		{"top of RAM", []kvm.RegionSpec{{GPA: 0, Size: 64 * testMiB}}, 5000, testMiB, 1 << 32, 64*testMiB - 8192, false},
		{"below limit", []kvm.RegionSpec{{GPA: 0, Size: 64 * testMiB}}, 4096, testMiB, 32 * testMiB, 32*testMiB - 4096, false},
		{"below the 3 GiB hole, not above 4 GiB", split, testMiB, testMiB, 1 << 32, 3*gib - testMiB, false},
		{"exactly at low", []kvm.RegionSpec{{GPA: 0, Size: 2 * testMiB}}, testMiB, testMiB, 1 << 32, testMiB, false},
		{"does not fit above low", []kvm.RegionSpec{{GPA: 0, Size: 2 * testMiB}}, testMiB + 1, testMiB, 1 << 32, 0, true},
		{"limit below low", []kvm.RegionSpec{{GPA: 0, Size: 64 * testMiB}}, 4096, 32 * testMiB, 16 * testMiB, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := placeInitrd(tt.ram, tt.size, tt.low, tt.limit)
			if tt.fail {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.Zero(t, got%4096)
			assert.LessOrEqual(t, got+tt.size, tt.limit)
			assert.GreaterOrEqual(t, got, tt.low)
		})
	}
}

func TestDescriptors(t *testing.T) {
	tests := []struct {
		kind gdtKind
		want uint64
	}{
		{gdtNull, 0},
		{gdtCode64, 0x00AF9B000000FFFF},
		{gdtCode32, 0x00CF9B000000FFFF},
		{gdtData, 0x00CF93000000FFFF},
		{gdtTSS, 0x00008B0000000067},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, descriptor(tt.kind), "kind %d", tt.kind)
	}
}
