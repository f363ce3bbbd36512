package devices

import (
	"sync"
	"sync/atomic"

	"github.com/kvmkit/kvmkit/kvm"
)

// Conventional port assignments for the small devices in this file.
const (
	ExitPortBase  = 0xF4  // ExitPort (QEMU's isa-debug-exit port)
	PVPanicPort   = 0x505 // PVPanic
	PostCodePort  = 0x80  // PostCode, the POST / I/O-delay port
	DelayPort     = 0xED  // alternative I/O-delay port, usually a Null
	PITBase       = 0x40  // i8254 PIT, a Null when there is no PIT
	PITSize       = 4
	PVPanicEvents = PVPanicPanicked | PVPanicCrashLoaded
)

// pvpanic event bits, as defined by the pvpanic device specification.
const (
	PVPanicPanicked    uint8 = 1 << 0 // the guest kernel panicked
	PVPanicCrashLoaded uint8 = 1 << 1 // the guest is about to run a crash kernel
)

// ExitPort is a one-byte port through which a guest reports an exit code:
// a write records the byte and calls the exit callback, which a VMM uses to
// stop the VM. Unlike QEMU's isa-debug-exit the byte is the code as written
// (no shift). Only the first byte of a wider write counts.
//
// Reads return the last code written, or 0xFF before any write, so a guest
// can tell that the port exists and a test can read the code back.
type ExitPort struct {
	onExit func(code uint8)
	code   atomic.Uint32 // 0x100|code once written
}

var _ kvm.Device = (*ExitPort)(nil)

// NewExitPort returns an ExitPort that calls onExit (may be nil) on the
// writing vCPU's thread for every write. onExit must not block for long.
func NewExitPort(onExit func(code uint8)) *ExitPort {
	return &ExitPort{onExit: onExit}
}

// Read implements kvm.Device.
func (e *ExitPort) Read(off uint64, data []byte) {
	fillOnes(data)
	if off == 0 && len(data) > 0 {
		if c, ok := e.Code(); ok {
			data[0] = c
		}
	}
}

// Write implements kvm.Device.
func (e *ExitPort) Write(off uint64, data []byte) {
	if off != 0 || len(data) == 0 {
		return
	}
	c := data[0]
	e.code.Store(0x100 | uint32(c))
	if e.onExit != nil {
		e.onExit(c)
	}
}

// Code returns the last exit code written and whether one was written.
func (e *ExitPort) Code() (uint8, bool) {
	v := e.code.Load()
	return uint8(v), v&0x100 != 0
}

// PVPanic is the pvpanic ISA device (Linux's pvpanic driver, "pvpanic" on
// port 0x505). Reads return the events the device supports (PVPanicEvents);
// a write reporting any supported event calls the event callback with just
// the supported bits. Unsupported bits are ignored.
type PVPanic struct {
	onEvent func(event uint8)
	seen    atomic.Uint32
}

var _ kvm.Device = (*PVPanic)(nil)

// NewPVPanic returns a PVPanic that calls onEvent (may be nil) on the
// writing vCPU's thread.
func NewPVPanic(onEvent func(event uint8)) *PVPanic {
	return &PVPanic{onEvent: onEvent}
}

// Read implements kvm.Device.
func (p *PVPanic) Read(off uint64, data []byte) {
	fillOnes(data)
	if off == 0 && len(data) > 0 {
		data[0] = PVPanicEvents
	}
}

// Write implements kvm.Device.
func (p *PVPanic) Write(off uint64, data []byte) {
	if off != 0 || len(data) == 0 {
		return
	}
	ev := data[0] & PVPanicEvents
	if ev == 0 {
		return
	}
	for {
		old := p.seen.Load()
		if p.seen.CompareAndSwap(old, old|uint32(ev)) {
			break
		}
	}
	if p.onEvent != nil {
		p.onEvent(ev)
	}
}

// Events returns every event bit the guest has reported so far.
func (p *PVPanic) Events() uint8 { return uint8(p.seen.Load()) }

// PostCode is the POST-code port 0x80. Linux writes it as an I/O delay
// ("outb_p"), so writes are only counted and the last value kept; reads
// return 0xFF.
type PostCode struct {
	writes atomic.Uint64
	last   atomic.Uint32
}

var _ kvm.Device = (*PostCode)(nil)

// Read implements kvm.Device.
func (p *PostCode) Read(_ uint64, data []byte) { fillOnes(data) }

// Write implements kvm.Device.
func (p *PostCode) Write(_ uint64, data []byte) {
	if len(data) > 0 {
		p.last.Store(uint32(data[0]))
	}
	p.writes.Add(1)
}

// Writes returns how many writes the port has absorbed.
func (p *PostCode) Writes() uint64 { return p.writes.Load() }

// Last returns the last byte written (the last POST code).
func (p *PostCode) Last() uint8 { return uint8(p.last.Load()) }

// Null absorbs a port range silently: reads return all ones (as for a port
// with nothing behind it) and writes are dropped. Accesses are counted. The
// zero value is ready to use. Use it for ranges a guest pokes that the VMM
// deliberately does not model, e.g. the PIT at 0x40-0x43 without an
// in-kernel PIT, or the 0xED delay port.
type Null struct {
	reads, writes atomic.Uint64
}

var _ kvm.Device = (*Null)(nil)

// Read implements kvm.Device.
func (n *Null) Read(_ uint64, data []byte) {
	n.reads.Add(1)
	fillOnes(data)
}

// Write implements kvm.Device.
func (n *Null) Write(uint64, []byte) { n.writes.Add(1) }

// Accesses returns how many reads and writes the range absorbed.
func (n *Null) Accesses() (reads, writes uint64) { return n.reads.Load(), n.writes.Load() }

func fillOnes(data []byte) {
	for i := range data {
		data[i] = 0xFF
	}
}

// byteRegs dispatches a multi-byte access as byte accesses to consecutive
// registers, the way an ISA bus splits it. Registers at or past n read as
// 0xFF and ignore writes.
type byteRegs interface {
	readReg(reg uint64) uint8
	writeReg(reg uint64, v uint8)
}

func readBytes(mu *sync.Mutex, d byteRegs, n, off uint64, data []byte) {
	mu.Lock()
	for i := range data {
		r := off + uint64(i)
		if r < off || r >= n {
			data[i] = 0xFF
			continue
		}
		data[i] = d.readReg(r)
	}
	mu.Unlock()
}

func writeBytes(mu *sync.Mutex, d byteRegs, n, off uint64, data []byte) {
	mu.Lock()
	for i, v := range data {
		r := off + uint64(i)
		if r < off || r >= n {
			continue
		}
		d.writeReg(r, v)
	}
	mu.Unlock()
}
