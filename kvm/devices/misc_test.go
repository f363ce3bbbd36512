package devices

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestExitPort(t *testing.T) {
	tests := []struct {
		name   string
		writes [][]byte
		off    uint64
		codes  []uint8
		read   uint8
	}{
		{"no write", nil, 0, nil, 0xFF},
		{"success", [][]byte{{0}}, 0, []uint8{0}, 0},
		{"failure code", [][]byte{{3}}, 0, []uint8{3}, 3},
		{"wide write uses the low byte", [][]byte{{0x21, 0x43, 0x65, 0x87}}, 0, []uint8{0x21}, 0x21},
		{"last code wins", [][]byte{{1}, {0xFE}}, 0, []uint8{1, 0xFE}, 0xFE},
		{"other offset ignored", [][]byte{{7}}, 1, nil, 0xFF},
		{"empty write ignored", [][]byte{{}}, 0, nil, 0xFF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var codes []uint8
			e := NewExitPort(func(c uint8) { codes = append(codes, c) })
			for _, w := range tc.writes {
				e.Write(tc.off, w)
			}
			assert.Equal(t, tc.codes, codes)
			assert.Equal(t, tc.read, port{e}.in(0))
			c, ok := e.Code()
			assert.Equal(t, len(tc.codes) > 0, ok)
			if ok {
				assert.Equal(t, tc.codes[len(tc.codes)-1], c)
			}
		})
	}
	NewExitPort(nil).Write(0, []byte{1}) // nil callback is allowed
}

func TestPVPanic(t *testing.T) {
	tests := []struct {
		name   string
		writes []uint8
		events []uint8
		seen   uint8
	}{
		{"panicked", []uint8{0x01}, []uint8{PVPanicPanicked}, 0x01},
		{"crash loaded", []uint8{0x02}, []uint8{PVPanicCrashLoaded}, 0x02},
		{"unsupported bits masked", []uint8{0xFD}, []uint8{PVPanicPanicked}, 0x01},
		{"nothing supported", []uint8{0x04, 0x00}, nil, 0},
		{"accumulates", []uint8{0x02, 0x01}, []uint8{0x02, 0x01}, 0x03},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var events []uint8
			p := NewPVPanic(func(ev uint8) { events = append(events, ev) })
			assert.Equal(t, uint8(0x03), port{p}.in(0), "supported events")
			for _, w := range tc.writes {
				port{p}.out(0, w)
			}
			assert.Equal(t, tc.events, events)
			assert.Equal(t, tc.seen, p.Events())
		})
	}
}

func TestPostCodeAndNull(t *testing.T) {
	var pc PostCode
	for _, v := range []uint8{0x10, 0x20, 0x30} {
		port{&pc}.out(0, v)
	}
	assert.Equal(t, uint64(3), pc.Writes())
	assert.Equal(t, uint8(0x30), pc.Last())
	assert.Equal(t, uint8(0xFF), port{&pc}.in(0))

	var n Null
	b := []byte{1, 2, 3, 4}
	n.Read(2, b)
	assert.Equal(t, []byte{0xFF, 0xFF, 0xFF, 0xFF}, b)
	n.Write(0, []byte{0x34})
	n.Write(3, []byte{0x12})
	r, w := n.Accesses()
	assert.Equal(t, uint64(1), r)
	assert.Equal(t, uint64(2), w)
}
