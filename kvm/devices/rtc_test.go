package devices

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a settable clock.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func cmosRead(p port, idx uint8) uint8 {
	p.out(0, idx)
	return p.in(1)
}

func cmosWrite(p port, idx, v uint8) {
	p.out(0, idx)
	p.out(1, v)
}

func TestRTCFormats(t *testing.T) {
	thu := time.Date(2024, 2, 29, 13, 45, 7, 0, time.UTC) // a Thursday
	tests := []struct {
		name string
		when time.Time
		regB uint8
		want map[uint8]uint8
	}{
		{"BCD 24h", thu, 0x02, map[uint8]uint8{
			CMOSSeconds: 0x07, CMOSMinutes: 0x45, CMOSHours: 0x13, CMOSWeekday: 0x05,
			CMOSDayOfMonth: 0x29, CMOSMonth: 0x02, CMOSYear: 0x24, CMOSCentury: 0x20}},
		{"binary 24h", thu, 0x06, map[uint8]uint8{
			CMOSSeconds: 7, CMOSMinutes: 45, CMOSHours: 13, CMOSWeekday: 5,
			CMOSDayOfMonth: 29, CMOSMonth: 2, CMOSYear: 24, CMOSCentury: 20}},
		{"BCD 12h pm", thu, 0x00, map[uint8]uint8{CMOSHours: 0x81}},
		{"binary 12h pm", thu, 0x04, map[uint8]uint8{CMOSHours: 0x81}},
		{"BCD 12h midnight", time.Date(2024, 1, 7, 0, 5, 0, 0, time.UTC), 0x00, map[uint8]uint8{CMOSHours: 0x12, CMOSWeekday: 0x01}},
		{"BCD 12h noon", time.Date(2024, 1, 7, 12, 5, 0, 0, time.UTC), 0x00, map[uint8]uint8{CMOSHours: 0x92}},
		{"binary 12h 11pm", time.Date(2024, 1, 7, 23, 0, 0, 0, time.UTC), 0x04, map[uint8]uint8{CMOSHours: 0x80 | 11}},
		{"century 1999", time.Date(1999, 12, 31, 23, 59, 59, 0, time.UTC), 0x02, map[uint8]uint8{CMOSYear: 0x99, CMOSCentury: 0x19, CMOSHours: 0x23}},
		{"century 2100", time.Date(2100, 3, 1, 0, 0, 0, 0, time.UTC), 0x06, map[uint8]uint8{CMOSYear: 0, CMOSCentury: 21, CMOSMonth: 3}},
		{"zone converted to UTC", time.Date(2024, 2, 29, 13, 45, 7, 0, time.FixedZone("X", 3600)), 0x06, map[uint8]uint8{CMOSHours: 12}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeClock{tc.when}
			p := port{NewRTC(RTCConfig{Now: clk.now})}
			cmosWrite(p, CMOSRegB, tc.regB)
			for idx, want := range tc.want {
				assert.Equal(t, want, cmosRead(p, idx), "register %#x", idx)
			}
		})
	}
}

// linuxReadTime decodes the clock the way mc146818_get_time does.
func linuxReadTime(t *testing.T, p port) time.Time {
	t.Helper()
	require.Zero(t, cmosRead(p, CMOSRegA)&rtcUIP)
	sec, min, hour := cmosRead(p, CMOSSeconds), cmosRead(p, CMOSMinutes), cmosRead(p, CMOSHours)
	day, mon, year := cmosRead(p, CMOSDayOfMonth), cmosRead(p, CMOSMonth), cmosRead(p, CMOSYear)
	cent := cmosRead(p, CMOSCentury)
	b := cmosRead(p, CMOSRegB)
	bcd := func(v uint8) int { return int(v>>4)*10 + int(v&0xF) }
	conv := func(v uint8) int {
		if b&rtcDM == 0 {
			return bcd(v)
		}
		return int(v)
	}
	h := conv(hour & 0x7F)
	if b&rtc24H == 0 {
		h %= 12
		if hour&0x80 != 0 {
			h += 12
		}
	}
	return time.Date(conv(cent)*100+conv(year), time.Month(conv(mon)), conv(day), h, conv(min), conv(sec), 0, time.UTC)
}

func TestRTCGuestSetsTime(t *testing.T) {
	clk := &fakeClock{time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)}
	r := NewRTC(RTCConfig{Now: clk.now})
	p := port{r}
	assert.Equal(t, clk.t, linuxReadTime(t, p))

	// hwclock --systohc: SET, write fields, clear SET.
	cmosWrite(p, CMOSRegB, rtcSET|rtc24H)
	clk.t = clk.t.Add(time.Hour) // frozen while SET
	assert.Equal(t, uint8(0x10), cmosRead(p, CMOSHours))
	cmosWrite(p, CMOSYear, 0x31)
	cmosWrite(p, CMOSMonth, 0x12)
	cmosWrite(p, CMOSDayOfMonth, 0x24)
	cmosWrite(p, CMOSHours, 0x18)
	cmosWrite(p, CMOSMinutes, 0x30)
	cmosWrite(p, CMOSSeconds, 0x00)
	cmosWrite(p, CMOSRegB, rtc24H)
	clk.t = clk.t.Add(90 * time.Second) // runs again from the set time
	assert.Equal(t, time.Date(2031, 12, 24, 18, 31, 30, 0, time.UTC), linuxReadTime(t, p))
	assert.Equal(t, uint8(0x04), cmosRead(p, CMOSWeekday), "Wednesday (Sunday is 1), derived")

	// Without SET a write takes effect at once; 12-hour write with PM bit.
	cmosWrite(p, CMOSRegB, 0x00)
	cmosWrite(p, CMOSHours, 0x80|0x07)
	cmosWrite(p, CMOSRegB, rtc24H)
	assert.Equal(t, uint8(0x19), cmosRead(p, CMOSHours))
	cmosWrite(p, CMOSCentury, 0x20)
	assert.Equal(t, 2031, linuxReadTime(t, p).Year())
}

func TestRTCStatusRegisters(t *testing.T) {
	clk := &fakeClock{time.Date(2024, 5, 1, 10, 0, 0, 500_000_000, time.UTC)}
	p := port{NewRTC(RTCConfig{Now: clk.now})}
	assert.Equal(t, uint8(0x26), cmosRead(p, CMOSRegA))
	clk.t = clk.t.Add(499_900 * time.Microsecond) // 100 µs before the update
	assert.Equal(t, uint8(0xA6), cmosRead(p, CMOSRegA), "UIP just before the update")
	clk.t = clk.t.Add(200 * time.Microsecond)
	assert.Equal(t, uint8(0x26), cmosRead(p, CMOSRegA))
	cmosWrite(p, CMOSRegA, 0xFF)
	assert.Equal(t, uint8(0x7F), cmosRead(p, CMOSRegA), "UIP is read-only")
	assert.Equal(t, uint8(0x02), cmosRead(p, CMOSRegB))
	assert.Equal(t, uint8(0x00), cmosRead(p, CMOSRegC))
	assert.Equal(t, uint8(0x80), cmosRead(p, CMOSRegD), "valid RAM and time")
	cmosWrite(p, CMOSRegD, 0)
	assert.Equal(t, uint8(0x80), cmosRead(p, CMOSRegD))
	cmosWrite(p, CMOSRegB, rtcSET|rtcUIE|rtc24H)
	assert.Equal(t, uint8(rtcSET|rtc24H), cmosRead(p, CMOSRegB), "SET clears UIE")
}

func TestRTCNVRAM(t *testing.T) {
	r := NewRTC(RTCConfig{Now: (&fakeClock{time.Unix(0, 0)}).now})
	p := port{r}
	for idx := 0x0E; idx < CMOSSize; idx++ {
		if idx == CMOSCentury {
			continue
		}
		cmosWrite(p, uint8(idx), uint8(idx)^0xA5)
	}
	for idx := 0x0E; idx < CMOSSize; idx++ {
		if idx == CMOSCentury {
			continue
		}
		assert.Equal(t, uint8(idx)^0xA5, cmosRead(p, uint8(idx)), "index %#x", idx)
	}
	// NMI-mask bit in the index is ignored; the index port reads 0xFF.
	p.out(0, 0x80|0x40)
	assert.Equal(t, uint8(0x40^0xA5), p.in(1))
	assert.Equal(t, uint8(0xFF), p.in(0))
	// Host access for firmware settings.
	r.SetNVRAM(0x34, 0x12)
	assert.Equal(t, uint8(0x12), r.NVRAM(0x34))
	assert.Equal(t, uint8(0x70), r.NVRAM(CMOSYear), "1970 in BCD")
	// A 16-bit write sets index and data together.
	p.d.Write(0, []byte{0x50, 0x77})
	assert.Equal(t, uint8(0x77), r.NVRAM(0x50))
}

// FuzzRTC drives random index/data accesses: nothing may panic.
func FuzzRTC(f *testing.F) {
	f.Add([]byte{0x0B, 0x86, 0x09, 0xFF, 0x32, 0xFF, 0x08, 0x00, 0x0B, 0x00})
	f.Fuzz(func(t *testing.T, ops []byte) {
		clk := &fakeClock{time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)}
		p := port{NewRTC(RTCConfig{Now: clk.now})}
		for i := 0; i+1 < len(ops); i += 2 {
			cmosWrite(p, ops[i], ops[i+1])
			for idx := uint8(0); idx <= CMOSCentury; idx++ {
				cmosRead(p, idx)
			}
			clk.t = clk.t.Add(time.Duration(ops[i+1]) * time.Millisecond)
		}
	})
}
