package x86

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBootMSRs(t *testing.T) {
	got := map[uint32]uint64{}
	for _, m := range BootMSRs() {
		_, dup := got[m.Index]
		require.False(t, dup, "MSR %#x twice", m.Index)
		got[m.Index] = m.Data
	}
	assert.Equal(t, map[uint32]uint64{
		0x174: 0, 0x175: 0, 0x176: 0,
		0xC0000081: 0, 0xC0000082: 0, 0xC0000083: 0, 0xC0000084: 0, 0xC0000102: 0,
		0x10:  0,
		0x1A0: 1,
		0x2FF: 0x806,
	}, got)
}

func TestBootFPU(t *testing.T) {
	f := BootFPU()
	assert.Equal(t, uint16(0x37F), f.FCW)
	assert.Equal(t, uint32(0x1F80), f.MXCSR)
	assert.Equal(t, uint16(0), f.FSW)
}
