package devices

import (
	"sync"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
)

// RTC port window: 0x70 is the index register, 0x71 the data register.
const (
	RTCBase = 0x70
	RTCSize = 2
)

// CMOS register indexes of the MC146818 clock.
const (
	CMOSSeconds    = 0x00
	CMOSMinutes    = 0x02
	CMOSHours      = 0x04
	CMOSWeekday    = 0x06
	CMOSDayOfMonth = 0x07
	CMOSMonth      = 0x08
	CMOSYear       = 0x09
	CMOSRegA       = 0x0A
	CMOSRegB       = 0x0B
	CMOSRegC       = 0x0C
	CMOSRegD       = 0x0D
	CMOSCentury    = 0x32
	CMOSSize       = 128
)

// Register A/B/D bits.
const (
	rtcUIP     = 0x80 // A: update in progress
	rtcDivMask = 0x70 // A: divider select
	rtcDivNorm = 0x20 // A: 32.768 kHz time base, clock running
	rtcSET     = 0x80 // B: stop updates so the clock can be set
	rtcUIE     = 0x10 // B: update-ended interrupt enable
	rtcDM      = 0x04 // B: binary (1) or BCD (0)
	rtc24H     = 0x02 // B: 24-hour (1) or 12-hour (0)
	rtcVRT     = 0x80 // D: valid RAM and time
	rtcPM      = 0x80 // hours bit 7 in 12-hour mode

	// uipWindow is how long before each second's update UIP reads set, as
	// on the MC146818 (244 µs): a reader rarely sees it.
	uipWindow = 244 * time.Microsecond
)

// RTCConfig configures an RTC.
type RTCConfig struct {
	// Now is the host clock; nil means time.Now. Inject a fixed clock in
	// tests.
	Now func() time.Time
	// Location is the zone the guest expects the RTC to keep; nil means
	// UTC (what Linux assumes on x86).
	Location *time.Location
}

// RTC is the MC146818-compatible CMOS real-time clock at ports 0x70/0x71.
// The date and time registers (0x00-0x09 and the century at 0x32) are read
// from the host clock plus an offset the guest sets by writing them, in BCD
// or binary and 12- or 24-hour form as register B selects (changing the
// format later re-renders the same time, unlike the chip, which does not
// convert stored bytes). Setting register B's SET bit freezes the clock
// until it is cleared, so a guest can set the time field by field. The
// day of week is derived from the date; writes to it are ignored.
//
// Register A's UIP bit reads set only during the last 244 µs of each second,
// register C reads 0 (no periodic, alarm or update interrupts are
// generated), register D reports valid RAM, and the NMI-mask bit of the
// index port is ignored. All other indexes are plain CMOS RAM. The index
// port reads 0xFF (it is write-only on a PC).
type RTC struct {
	now func() time.Time
	loc *time.Location

	mu       sync.Mutex
	index    uint8
	ram      [CMOSSize]byte
	offset   time.Duration // guest time minus host time
	frozen   bool          // register B SET
	frozenAt time.Time     // the held time while frozen
}

var _ kvm.Device = (*RTC)(nil)

// NewRTC returns an RTC showing the host's time in 24-hour BCD mode, as PC
// firmware leaves it.
func NewRTC(cfg RTCConfig) *RTC {
	r := &RTC{now: cfg.Now, loc: cfg.Location}
	if r.now == nil {
		r.now = time.Now
	}
	if r.loc == nil {
		r.loc = time.UTC
	}
	r.ram[CMOSRegA] = rtcDivNorm | 0x06 // 32.768 kHz, 1024 Hz periodic rate
	r.ram[CMOSRegB] = rtc24H
	r.ram[CMOSRegD] = rtcVRT
	return r
}

// Read implements kvm.Device.
func (r *RTC) Read(off uint64, data []byte) { readBytes(&r.mu, r, RTCSize, off, data) }

// Write implements kvm.Device.
func (r *RTC) Write(off uint64, data []byte) { writeBytes(&r.mu, r, RTCSize, off, data) }

func (r *RTC) readReg(reg uint64) uint8 {
	if reg == 0 {
		return 0xFF
	}
	return r.get(r.index)
}

func (r *RTC) writeReg(reg uint64, v uint8) {
	if reg == 0 {
		r.index = v & 0x7F // bit 7 masks NMI; ignored
		return
	}
	r.set(r.index, v)
}

// NVRAM returns CMOS byte idx (0..127) as the guest would read it.
func (r *RTC) NVRAM(idx uint8) uint8 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.get(idx & 0x7F)
}

// SetNVRAM stores v at CMOS index idx (0..127) as a guest write would, for
// a VMM that fills in firmware settings such as memory sizes.
func (r *RTC) SetNVRAM(idx, v uint8) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.set(idx&0x7F, v)
}

func (r *RTC) current() time.Time {
	if r.frozen {
		return r.frozenAt
	}
	return r.now().Add(r.offset).In(r.loc)
}

func (r *RTC) get(idx uint8) uint8 {
	switch idx {
	case CMOSSeconds, CMOSMinutes, CMOSHours, CMOSWeekday, CMOSDayOfMonth, CMOSMonth, CMOSYear, CMOSCentury:
		return r.encodeField(idx, r.current())
	case CMOSRegA:
		v := r.ram[CMOSRegA] &^ rtcUIP
		if !r.frozen && v&rtcDivMask == rtcDivNorm {
			if t := r.current(); time.Duration(t.Nanosecond()) >= time.Second-uipWindow {
				v |= rtcUIP
			}
		}
		return v
	case CMOSRegC:
		return 0
	case CMOSRegD:
		return rtcVRT
	}
	return r.ram[idx]
}

func (r *RTC) set(idx, v uint8) {
	switch idx {
	case CMOSSeconds, CMOSMinutes, CMOSHours, CMOSDayOfMonth, CMOSMonth, CMOSYear, CMOSCentury:
		t := r.decodeField(idx, v, r.current())
		if r.frozen {
			r.frozenAt = t
		} else {
			r.offset = t.Sub(r.now())
		}
	case CMOSWeekday, CMOSRegC, CMOSRegD:
		// Derived or read-only.
	case CMOSRegA:
		r.ram[CMOSRegA] = v &^ rtcUIP
	case CMOSRegB:
		if v&rtcSET != 0 {
			v &^= rtcUIE
			if !r.frozen {
				r.frozenAt = r.current()
				r.frozen = true
			}
		} else if r.frozen {
			r.offset = r.frozenAt.Sub(r.now())
			r.frozen = false
		}
		r.ram[CMOSRegB] = v
	default:
		r.ram[idx] = v
	}
}

func (r *RTC) toReg(v int) uint8 {
	if r.ram[CMOSRegB]&rtcDM != 0 {
		return uint8(v)
	}
	return uint8((v/10%10)<<4 | v%10)
}

func (r *RTC) fromReg(v uint8) int {
	if r.ram[CMOSRegB]&rtcDM != 0 {
		return int(v)
	}
	return int(v>>4)*10 + int(v&0x0F)
}

func (r *RTC) encodeField(idx uint8, t time.Time) uint8 {
	switch idx {
	case CMOSSeconds:
		return r.toReg(t.Second())
	case CMOSMinutes:
		return r.toReg(t.Minute())
	case CMOSHours:
		h := t.Hour()
		if r.ram[CMOSRegB]&rtc24H != 0 {
			return r.toReg(h)
		}
		h12 := h % 12
		if h12 == 0 {
			h12 = 12
		}
		v := r.toReg(h12)
		if h >= 12 {
			v |= rtcPM
		}
		return v
	case CMOSWeekday:
		return r.toReg(int(t.Weekday()) + 1) // Sunday is 1
	case CMOSDayOfMonth:
		return r.toReg(t.Day())
	case CMOSMonth:
		return r.toReg(int(t.Month()))
	case CMOSYear:
		return r.toReg(t.Year() % 100)
	case CMOSCentury:
		return r.toReg(t.Year() / 100)
	}
	return 0
}

// decodeField returns t with the field at idx replaced by register value v.
// Out-of-range values are normalised by time.Date, never rejected.
func (r *RTC) decodeField(idx, v uint8, t time.Time) time.Time {
	y, mo, d := t.Date()
	h, mi, s := t.Clock()
	switch idx {
	case CMOSSeconds:
		s = r.fromReg(v)
	case CMOSMinutes:
		mi = r.fromReg(v)
	case CMOSHours:
		if r.ram[CMOSRegB]&rtc24H != 0 {
			h = r.fromReg(v)
		} else {
			h = r.fromReg(v&^rtcPM) % 12
			if v&rtcPM != 0 {
				h += 12
			}
		}
	case CMOSDayOfMonth:
		d = r.fromReg(v)
	case CMOSMonth:
		mo = time.Month(r.fromReg(v))
	case CMOSYear:
		y = y/100*100 + r.fromReg(v)
	case CMOSCentury:
		y = r.fromReg(v)*100 + y%100
	}
	return time.Date(y, mo, d, h, mi, s, t.Nanosecond(), t.Location())
}
