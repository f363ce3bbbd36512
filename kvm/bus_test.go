package kvm

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type recDevice struct {
	name   string
	writes []string
}

func (d *recDevice) Read(off uint64, data []byte) {
	for i := range data {
		data[i] = byte(off) + byte(i)
	}
}

func (d *recDevice) Write(off uint64, data []byte) {
	d.writes = append(d.writes, fmt.Sprintf("%s+%d=%x", d.name, off, data))
}

func TestBusDispatch(t *testing.T) {
	b := NewBus()
	a, c := &recDevice{name: "a"}, &recDevice{name: "c"}
	require.NoError(t, b.Register(0x3f8, 8, a))
	require.NoError(t, b.Register(0x1000, 0x100, c))

	cases := []struct {
		addr uint64
		want string // device name, "" for none
		off  uint64
	}{
		{0x3f7, "", 0}, {0x3f8, "a", 0}, {0x3ff, "a", 7}, {0x400, "", 0},
		{0x1000, "c", 0}, {0x10ff, "c", 0xff}, {0x1100, "", 0}, {0, "", 0}, {^uint64(0), "", 0},
	}
	for _, tc := range cases {
		d, off, ok := b.Lookup(tc.addr)
		if tc.want == "" {
			assert.False(t, ok, "%#x", tc.addr)
			continue
		}
		require.True(t, ok, "%#x", tc.addr)
		assert.Equal(t, tc.want, d.(*recDevice).name)
		assert.Equal(t, tc.off, off)
	}

	data := []byte{0, 0}
	b.Read(0x3f9, data)
	assert.Equal(t, []byte{1, 2}, data)
	b.Write(0x3fa, []byte{0xab})
	assert.Equal(t, []string{"a+2=ab"}, a.writes)

	b.Read(0x500, data)
	assert.Equal(t, []byte{0xff, 0xff}, data, "unhandled reads return all ones")
	b.Write(0x500, data)
	r, w := b.Unhandled()
	assert.Equal(t, uint64(1), r)
	assert.Equal(t, uint64(1), w)
}

func TestBusRegisterErrors(t *testing.T) {
	b := NewBus()
	require.NoError(t, b.Register(0x100, 0x10, &recDevice{}))
	var oe *OverlapError
	assert.ErrorAs(t, b.Register(0x10f, 1, &recDevice{}), &oe)
	assert.ErrorAs(t, b.Register(0xf0, 0x11, &recDevice{}), &oe)
	assert.Error(t, b.Register(0x200, 0, &recDevice{}))
	assert.Error(t, b.Register(^uint64(0), 2, &recDevice{}))
	assert.NoError(t, b.Register(0x110, 1, &recDevice{}))
	assert.True(t, b.Unregister(0x100))
	assert.False(t, b.Unregister(0x100))
	_, _, ok := b.Lookup(0x105)
	assert.False(t, ok)
}

func BenchmarkBusLookup(b *testing.B) {
	bus := NewBus()
	for i := range 32 {
		_ = bus.Register(uint64(i)*0x100, 0x10, &recDevice{})
	}
	data := make([]byte, 1)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		bus.Read(uint64(i%32)*0x100+1, data)
	}
}
