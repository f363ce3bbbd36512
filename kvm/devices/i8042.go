package devices

import (
	"log/slog"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// I8042 port window: 0x60 data, 0x61 system control port B, 0x64
// status/command. Register the I8042 once at I8042Base with I8042Size.
const (
	I8042Base = 0x60
	I8042Size = 5
	PortBPort = 0x61
	KbdIRQ    = 1
	AuxIRQ    = 12
)

// i8042 status register bits.
const (
	kbdOBF     = 0x01 // output buffer full
	kbdSYS     = 0x04 // system flag (self-test passed)
	kbdCMD     = 0x08 // last write was a command
	kbdUnlock  = 0x10 // keyboard not inhibited
	kbdAUXData = 0x20 // output buffer holds AUX data
	kbdTimeout = 0x40 // device did not answer
)

// Controller configuration byte (CTR) bits.
const (
	ctrKbdInt = 0x01
	ctrAuxInt = 0x02
	ctrSys    = 0x04
	ctrKbdDis = 0x10
	ctrAuxDis = 0x20
	ctrXlate  = 0x40
)

// Output port bits.
const (
	outReset = 0x01 // active low: 0 resets the CPU
	outA20   = 0x02
)

// maxOutQueue bounds queued output bytes. A real 8042 has one output byte;
// a short queue keeps multi-byte command answers in order.
const maxOutQueue = 16

// I8042Config configures an I8042.
type I8042Config struct {
	// OnReset is called (on the vCPU thread) when the guest pulses the
	// reset line: command 0xFE, any 0xF0-0xFF pulse with bit 0 clear, or an
	// output-port write with bit 0 clear. Linux's "reboot=k" path.
	OnReset func()
	// KbdIRQ and AuxIRQ, if set, are driven while keyboard or AUX data
	// waits in the output buffer and the CTR enables that interrupt (ISA
	// IRQ 1 and 12). Without them the guest can only poll.
	KbdIRQ, AuxIRQ kvm.IRQ
	// PortB serves port 0x61 inside the window; nil means a built-in
	// PortB.
	PortB kvm.Device
	// Logger receives IRQ failures; nil means slog.Default().
	Logger *slog.Logger
}

type kbdByte struct {
	v       uint8
	aux     bool
	timeout bool
}

// I8042 is the PS/2 keyboard controller, modelled far enough for a guest
// to reset the machine through it and for Linux's i8042 driver to probe it
// without stalling: self-test (0xAA answers 0x55), CTR read/write (0x20 and
// 0x60, and the rest of the 32-byte internal RAM), interface tests
// (0xAB and 0xA9 answer 0x00), port enable/disable (0xAD/0xAE/0xA7/0xA8),
// output port read/write (0xD0/0xD1), A20 (0xDD/0xDF), input port (0xC0),
// and the loop-back commands 0xD2/0xD3 that echo a byte as keyboard or AUX
// data (Linux's AUX probe). No keyboard or mouse is attached: a byte sent
// to either answers 0xFE with the status timeout bit set, which the guest
// treats as "no device".
type I8042 struct {
	onReset  func()
	kbdIRQ   kvm.IRQ
	auxIRQ   kvm.IRQ
	portB    kvm.Device
	log      *slog.Logger
	mu       sync.Mutex
	status   uint8
	ram      [32]uint8 // ram[0] is the CTR
	outPort  uint8
	pending  uint8 // command waiting for its data byte, or 0
	out      []kbdByte
	last     uint8
	kbdLine  bool
	auxLine  bool
	reset    bool // set under lock, callback run after unlock
	resets   uint64
	irqError bool
}

var _ kvm.Device = (*I8042)(nil)

// NewI8042 returns a controller in the state firmware leaves it: self-test
// passed, translation on, both ports enabled.
func NewI8042(cfg I8042Config) *I8042 {
	k := &I8042{
		onReset: cfg.OnReset,
		kbdIRQ:  cfg.KbdIRQ,
		auxIRQ:  cfg.AuxIRQ,
		portB:   cfg.PortB,
		log:     cfg.Logger,
		status:  kbdSYS | kbdUnlock,
		outPort: outReset | outA20,
	}
	k.ram[0] = ctrKbdInt | ctrAuxInt | ctrSys | ctrXlate
	if k.kbdIRQ == nil {
		k.kbdIRQ = kvm.NoIRQ{}
	}
	if k.auxIRQ == nil {
		k.auxIRQ = kvm.NoIRQ{}
	}
	if k.portB == nil {
		k.portB = &PortB{}
	}
	if k.log == nil {
		k.log = slog.Default()
	}
	return k
}

// Read implements kvm.Device.
func (k *I8042) Read(off uint64, data []byte) {
	if off == PortBPort-I8042Base {
		k.portB.Read(0, data)
		return
	}
	readBytes(&k.mu, k, I8042Size, off, data)
}

// Write implements kvm.Device.
func (k *I8042) Write(off uint64, data []byte) {
	if off == PortBPort-I8042Base {
		k.portB.Write(0, data)
		return
	}
	writeBytes(&k.mu, k, I8042Size, off, data)
	k.mu.Lock()
	reset := k.reset
	k.reset = false
	k.mu.Unlock()
	if reset && k.onReset != nil {
		k.onReset()
	}
}

// Resets returns how many times the guest pulsed the reset line.
func (k *I8042) Resets() uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.resets
}

func (k *I8042) readReg(reg uint64) uint8 {
	switch reg {
	case 0:
		if len(k.out) > 0 {
			k.last = k.out[0].v
			k.out = k.out[1:]
			if len(k.out) == 0 {
				k.out = nil
			}
			k.updateIRQ()
		}
		return k.last
	case 4:
		v := k.status
		if len(k.out) > 0 {
			v |= kbdOBF
			if k.out[0].aux {
				v |= kbdAUXData
			}
			if k.out[0].timeout {
				v |= kbdTimeout
			}
		}
		return v
	}
	return 0xFF
}

func (k *I8042) writeReg(reg uint64, v uint8) {
	switch reg {
	case 0:
		k.status &^= kbdCMD
		k.data(v)
	case 4:
		k.status |= kbdCMD
		k.command(v)
	}
}

func (k *I8042) command(c uint8) {
	k.pending = 0
	switch {
	case c >= 0x20 && c <= 0x3F:
		k.queue(k.ram[c&0x1F], false, false)
	case c >= 0x60 && c <= 0x7F:
		k.pending = c
	case c == 0xA7:
		k.ram[0] |= ctrAuxDis
	case c == 0xA8:
		k.ram[0] &^= ctrAuxDis
	case c == 0xA9, c == 0xAB: // AUX / keyboard interface test: no error
		k.queue(0x00, false, false)
	case c == 0xAA: // controller self-test
		k.status |= kbdSYS
		k.queue(0x55, false, false)
	case c == 0xAD:
		k.ram[0] |= ctrKbdDis
	case c == 0xAE:
		k.ram[0] &^= ctrKbdDis
	case c == 0xC0: // input port: keyboard not inhibited
		k.queue(0x80, false, false)
	case c == 0xD0:
		k.queue(k.outPort, false, false)
	case c == 0xD1, c == 0xD2, c == 0xD3, c == 0xD4:
		k.pending = c
	case c == 0xDD:
		k.outPort &^= outA20
	case c == 0xDF:
		k.outPort |= outA20
	case c >= 0xF0: // pulse output lines whose bit is 0; bit 0 is reset
		if c&outReset == 0 {
			k.pulseReset()
		}
	}
}

func (k *I8042) data(v uint8) {
	c := k.pending
	k.pending = 0
	switch {
	case c >= 0x60 && c <= 0x7F:
		k.ram[c&0x1F] = v
		if c == 0x60 {
			if v&ctrSys != 0 {
				k.status |= kbdSYS
			} else {
				k.status &^= kbdSYS
			}
			k.updateIRQ()
		}
	case c == 0xD1:
		k.outPort = v
		if v&outReset == 0 {
			k.pulseReset()
			k.outPort |= outReset
		}
	case c == 0xD2:
		k.queue(v, false, false)
	case c == 0xD3:
		k.queue(v, true, false)
	case c == 0xD4: // to the AUX device: none attached
		k.queue(0xFE, true, true)
	default: // to the keyboard: none attached
		k.queue(0xFE, false, true)
	}
}

func (k *I8042) pulseReset() {
	k.reset = true
	k.resets++
}

func (k *I8042) queue(v uint8, aux, timeout bool) {
	if len(k.out) >= maxOutQueue {
		return
	}
	k.out = append(k.out, kbdByte{v: v, aux: aux, timeout: timeout})
	k.updateIRQ()
}

func (k *I8042) updateIRQ() {
	var kbd, aux bool
	if len(k.out) > 0 {
		if k.out[0].aux {
			aux = k.ram[0]&ctrAuxInt != 0
		} else {
			kbd = k.ram[0]&ctrKbdInt != 0
		}
	}
	k.drive(k.kbdIRQ, &k.kbdLine, kbd)
	k.drive(k.auxIRQ, &k.auxLine, aux)
}

func (k *I8042) drive(irq kvm.IRQ, cur *bool, want bool) {
	if *cur == want {
		return
	}
	if err := irq.SetLevel(want); err != nil {
		if !k.irqError {
			k.irqError = true
			k.log.Warn("i8042: cannot drive interrupt line", "err", err)
		}
		return
	}
	*cur = want
}

// PortB is system control port B (0x61). Bits 0-3 (PIT channel 2 gate,
// speaker enable, parity/IOCHK enables) are read/write. Bit 4 (refresh
// detect) toggles on every read, so refresh-based delay loops finish. Bit 5
// is PIT channel 2's output: from OUT2 if set, otherwise it also toggles on
// every read, so a guest polling for it (Linux's PIT TSC calibration) never
// hangs, though such a calibration then fails and the guest falls back to
// another clock. With an in-kernel PIT, KVM serves this port itself.
// The zero value is ready to use.
type PortB struct {
	// OUT2 reports PIT channel 2's output level, if the VMM emulates it.
	OUT2 func() bool

	mu    sync.Mutex
	ctl   uint8
	reads uint64
}

var _ kvm.Device = (*PortB)(nil)

// Read implements kvm.Device.
func (p *PortB) Read(off uint64, data []byte) {
	fillOnes(data)
	if off != 0 || len(data) == 0 {
		return
	}
	p.mu.Lock()
	v := p.ctl
	toggle := p.reads&1 != 0
	p.reads++
	p.mu.Unlock()
	if toggle {
		v |= 0x10
	}
	if p.OUT2 != nil {
		if p.OUT2() {
			v |= 0x20
		}
	} else if toggle {
		v |= 0x20
	}
	data[0] = v
}

// Write implements kvm.Device.
func (p *PortB) Write(off uint64, data []byte) {
	if off != 0 || len(data) == 0 {
		return
	}
	p.mu.Lock()
	p.ctl = data[0] & 0x0F
	p.mu.Unlock()
}
