package devices

import (
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// Port assignment and layout of ACPIPM.
const (
	// ACPIPMBase is the conventional base of ACPIPM: the PM1a event block
	// (PM1_STS, PM1_EN) at ACPIPMBase and the PM1a control block (PM1_CNT)
	// at ACPIPMBase+4.
	ACPIPMBase = 0x600
	// ACPIPMSize is the number of ports ACPIPM decodes.
	ACPIPMSize = 6
	// ACPIPMEventLen and ACPIPMControlLen are the block lengths a FADT
	// declares (PM1_EVT_LEN, PM1_CNT_LEN).
	ACPIPMEventLen   = 4
	ACPIPMControlLen = 2
)

// PM1 register bits (ACPI specification, "PM1 Control Registers").
const (
	pm1CntSCIEn     = 1 << 0
	pm1CntSlpTypPos = 10
	pm1CntSlpTyp    = 7 << pm1CntSlpTypPos
	pm1CntSlpEn     = 1 << 13
)

// ACPIPM models the PC-compatible ACPI PM1a event and control registers a
// full (not hardware-reduced) FADT points at, which is how an ACPI guest
// powers the machine off: it writes the sleep type of its \_S5 object
// together with SLP_EN to PM1_CNT, and ACPIPM calls the sleep callback with
// that type. The event block never reports events (there is no SCI source):
// PM1_STS is write-one-to-clear and PM1_EN keeps what is written. PM1_CNT
// reads SCI_EN set (the platform is always in ACPI mode, so the FADT needs
// no SMI command port) and the last SLP_TYP written; SLP_EN reads 0.
type ACPIPM struct {
	onSleep func(typ uint8)

	mu  sync.Mutex
	sts uint16
	en  uint16
	cnt uint16 // SLP_TYP only
}

var _ kvm.Device = (*ACPIPM)(nil)

// NewACPIPM returns an ACPIPM that calls onSleep (may be nil) with the
// SLP_TYP value on the writing vCPU's thread whenever the guest sets
// SLP_EN. onSleep must not block for long.
func NewACPIPM(onSleep func(typ uint8)) *ACPIPM {
	return &ACPIPM{onSleep: onSleep}
}

// Read implements kvm.Device.
func (p *ACPIPM) Read(off uint64, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range data {
		data[i] = p.readByte(off + uint64(i))
	}
}

func (p *ACPIPM) readByte(off uint64) byte {
	var r uint16
	switch off &^ 1 {
	case 0:
		r = p.sts
	case 2:
		r = p.en
	case 4:
		r = p.cnt | pm1CntSCIEn
	default:
		return 0xFF
	}
	return byte(r >> (8 * (off & 1)))
}

// Write implements kvm.Device.
func (p *ACPIPM) Write(off uint64, data []byte) {
	sleep, typ := false, uint8(0)
	p.mu.Lock()
	for i, b := range data {
		o := off + uint64(i)
		shift := 8 * (o & 1)
		v := uint16(b) << shift
		mask := uint16(0xFF) << shift
		switch o &^ 1 {
		case 0:
			p.sts &^= v
		case 2:
			p.en = p.en&^mask | v
		case 4:
			p.cnt = (p.cnt&^mask | v) & pm1CntSlpTyp
			if v&pm1CntSlpEn != 0 {
				sleep, typ = true, uint8(p.cnt>>pm1CntSlpTypPos)
			}
		}
	}
	p.mu.Unlock()
	if sleep && p.onSleep != nil {
		p.onSleep(typ)
	}
}
