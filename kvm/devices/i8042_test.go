package devices

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	i8042Data   = 0
	i8042Status = 4
)

// i8042Command mimics Linux's __i8042_command: wait for IBF clear, write the
// command and its parameters, then poll OBF for each answer byte. The poll
// is bounded like I8042_CTL_TIMEOUT; ok is false on a timeout.
func i8042Command(p port, cmd uint8, params []uint8, nIn int) (out []uint8, status []uint8, ok bool) {
	waitWrite := func() bool {
		for i := 0; i < 10000; i++ {
			if p.in(i8042Status)&0x02 == 0 {
				return true
			}
		}
		return false
	}
	if !waitWrite() {
		return nil, nil, false
	}
	p.out(i8042Status, cmd)
	for _, v := range params {
		if !waitWrite() {
			return nil, nil, false
		}
		p.out(i8042Data, v)
	}
	for n := 0; n < nIn; n++ {
		got := false
		for i := 0; i < 10000; i++ {
			if st := p.in(i8042Status); st&kbdOBF != 0 {
				status = append(status, st)
				got = true
				break
			}
		}
		if !got {
			return out, status, false
		}
		out = append(out, p.in(i8042Data))
	}
	return out, status, true
}

func TestI8042LinuxProbe(t *testing.T) {
	resets := 0
	k := NewI8042(I8042Config{OnReset: func() { resets++ }})
	p := port{k}

	// i8042_flush: nothing pending, and the status is not the 0xFF of an
	// absent controller.
	st := p.in(i8042Status)
	assert.NotEqual(t, uint8(0xFF), st)
	assert.Zero(t, st&kbdOBF)

	tests := []struct {
		name   string
		cmd    uint8
		params []uint8
		want   []uint8
		ctr    int // expected CTR after, -1 to skip
	}{
		{"self test", 0xAA, nil, []uint8{0x55}, -1},
		{"read CTR", 0x20, nil, []uint8{0x47}, 0x47},
		{"write CTR, ints off", 0x60, []uint8{0x44}, nil, 0x44},
		{"keyboard interface test", 0xAB, nil, []uint8{0x00}, -1},
		{"disable keyboard", 0xAD, nil, nil, 0x54},
		{"enable keyboard", 0xAE, nil, nil, 0x44},
		{"disable aux", 0xA7, nil, nil, 0x64},
		{"enable aux", 0xA8, nil, nil, 0x44},
		{"aux interface test", 0xA9, nil, []uint8{0x00}, -1},
		{"internal RAM byte", 0x61, []uint8{0x9C}, nil, -1},
		{"read internal RAM byte", 0x21, nil, []uint8{0x9C}, -1},
		{"read output port", 0xD0, nil, []uint8{0x03}, -1},
		{"A20 off", 0xDD, nil, nil, -1},
		{"read output port again", 0xD0, nil, []uint8{0x01}, -1},
		{"keyboard loopback", 0xD2, []uint8{0x3C}, []uint8{0x3C}, -1},
	}
	for _, tc := range tests {
		got, _, ok := i8042Command(p, tc.cmd, tc.params, len(tc.want))
		require.True(t, ok, "%s: timed out", tc.name)
		assert.Equal(t, tc.want, got, tc.name)
		if tc.ctr >= 0 {
			ctr, _, ok := i8042Command(p, 0x20, nil, 1)
			require.True(t, ok)
			assert.Equal(t, []uint8{uint8(tc.ctr)}, ctr, "%s: CTR", tc.name)
		}
	}

	// AUX loop (i8042_check_aux) must come back flagged as AUX data.
	got, status, ok := i8042Command(p, 0xD3, []uint8{0x5A}, 1)
	require.True(t, ok)
	assert.Equal(t, []uint8{0x5A}, got)
	assert.NotZero(t, status[0]&kbdAUXData)
	assert.Zero(t, resets)
	assert.Zero(t, p.in(i8042Status)&kbdOBF, "nothing left over")
}

func TestI8042Reset(t *testing.T) {
	tests := []struct {
		name  string
		cmd   uint8
		data  []uint8 // written to port 0x60 after the command
		reset bool
	}{
		{"pulse reset 0xFE", 0xFE, nil, true},
		{"pulse all lines 0xF0", 0xF0, nil, true},
		{"pulse without bit 0 0xFF", 0xFF, nil, false},
		{"pulse 0xFD (A20 line only)", 0xFD, nil, false},
		{"output port reset bit low", 0xD1, []uint8{0x02}, true},
		{"output port reset bit high", 0xD1, []uint8{0x03}, false},
		{"self test does not reset", 0xAA, nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			k := NewI8042(I8042Config{OnReset: func() { calls++ }})
			p := port{k}
			p.out(i8042Status, tc.cmd)
			for _, d := range tc.data {
				p.out(i8042Data, d)
			}
			want := 0
			if tc.reset {
				want = 1
			}
			assert.Equal(t, want, calls)
			assert.Equal(t, uint64(want), k.Resets())
		})
	}
}

func TestI8042NoDevicesAndIRQs(t *testing.T) {
	kbd, aux := &recIRQ{}, &recIRQ{}
	k := NewI8042(I8042Config{KbdIRQ: kbd, AuxIRQ: aux})
	p := port{k}

	// A byte for the (absent) keyboard: 0xFE with the timeout bit, IRQ 1.
	p.out(i8042Data, 0xFF)
	st := p.in(i8042Status)
	assert.Equal(t, uint8(kbdOBF|kbdTimeout), st&(kbdOBF|kbdTimeout|kbdAUXData))
	assert.Equal(t, []bool{true}, kbd.take())
	assert.Equal(t, uint8(0xFE), p.in(i8042Data))
	assert.Equal(t, []bool{false}, kbd.take())

	// A byte for the (absent) mouse: the same on the AUX side, IRQ 12.
	p.out(i8042Status, 0xD4)
	p.out(i8042Data, 0xF4)
	assert.Equal(t, uint8(kbdOBF|kbdTimeout|kbdAUXData), p.in(i8042Status)&(kbdOBF|kbdTimeout|kbdAUXData))
	assert.Equal(t, []bool{true}, aux.take())
	assert.Equal(t, uint8(0xFE), p.in(i8042Data))
	assert.Equal(t, []bool{false}, aux.take())

	// With the AUX interrupt disabled in the CTR the loop test stays silent.
	p.out(i8042Status, 0x60)
	p.out(i8042Data, ctrKbdInt|ctrSys)
	p.out(i8042Status, 0xD3)
	p.out(i8042Data, 0xA5)
	assert.Empty(t, aux.take())
	assert.Equal(t, uint8(0xA5), p.in(i8042Data))
	assert.Zero(t, p.in(i8042Status)&kbdOBF)

	// Reading with an empty buffer repeats the last byte; the system flag
	// follows the CTR.
	assert.Equal(t, uint8(0xA5), p.in(i8042Data))
	p.out(i8042Status, 0x60)
	p.out(i8042Data, 0)
	assert.Zero(t, p.in(i8042Status)&kbdSYS)
}

func TestI8042OutputQueueBounded(t *testing.T) {
	k := NewI8042(I8042Config{})
	p := port{k}
	for i := 0; i < 100; i++ {
		p.out(i8042Status, 0x20)
	}
	n := 0
	for p.in(i8042Status)&kbdOBF != 0 {
		p.in(i8042Data)
		n++
	}
	assert.Equal(t, maxOutQueue, n)
}

func TestPortB(t *testing.T) {
	k := NewI8042(I8042Config{})
	p := port{k}
	const off = PortBPort - I8042Base
	p.out(off, 0xFF)
	seen := map[uint8]bool{}
	for i := 0; i < 4; i++ {
		v := p.in(off)
		assert.Equal(t, uint8(0x0F), v&0x0F, "control bits read back")
		assert.Zero(t, v&0xC0)
		seen[v&0x30] = true
	}
	assert.True(t, seen[0x30] && seen[0x00], "refresh and OUT2 toggle: %v", seen)

	// Linux's pit_calibrate_tsc loop: gate on, poll until OUT2 is high.
	p.out(off, (p.in(off)&^0x02)|0x01)
	polls := 0
	for p.in(off)&0x20 == 0 {
		polls++
		require.Less(t, polls, 10)
	}

	high := false
	pb := &PortB{OUT2: func() bool { return high }}
	q := port{pb}
	assert.Zero(t, q.in(0)&0x20)
	assert.Zero(t, q.in(0)&0x20)
	high = true
	assert.NotZero(t, q.in(0)&0x20)
}

// FuzzI8042 drives random port accesses: nothing may panic, and the
// output queue stays bounded.
func FuzzI8042(f *testing.F) {
	f.Add([]byte{4, 0xAA, 0x84, 0, 0x80, 0, 4, 0x60, 0, 0x03, 4, 0xD3, 0, 0x5A, 1, 0x03, 0x81, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		k := NewI8042(I8042Config{KbdIRQ: &recIRQ{}, AuxIRQ: &recIRQ{}, OnReset: func() {}})
		for i := 0; i+1 < len(ops); i += 2 {
			off := uint64(ops[i] & 0x07)
			if ops[i]&0x80 != 0 {
				b := make([]byte, 1+int(ops[i]>>4&0x3))
				k.Read(off, b)
			} else {
				k.Write(off, []byte{ops[i+1]})
			}
			k.mu.Lock()
			n := len(k.out)
			k.mu.Unlock()
			require.LessOrEqual(t, n, maxOutQueue)
		}
	})
}
