package devices

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// Standard PC serial port bases and ISA IRQs.
const (
	COM1Base = 0x3F8
	COM2Base = 0x2F8
	COM3Base = 0x3E8
	COM4Base = 0x2E8
	UARTSize = 8 // ports per UART
	COM1IRQ  = 4
	COM2IRQ  = 3
	COM3IRQ  = 4
	COM4IRQ  = 3
)

// DefaultUARTBuffer is the default size of a UART's host-side transmit and
// receive buffers.
const DefaultUARTBuffer = 64 << 10

// minUARTBuffer keeps room for a full 16-byte FIFO load.
const minUARTBuffer = 256

// UART register offsets.
const (
	uartRBR = 0 // receive buffer (read), THR (write), DLL with DLAB
	uartIER = 1 // interrupt enable, DLM with DLAB
	uartIIR = 2 // interrupt identification (read), FCR (write)
	uartLCR = 3
	uartMCR = 4
	uartLSR = 5
	uartMSR = 6
	uartSCR = 7
)

// Register bits.
const (
	ierRDI  = 0x01 // received data available
	ierTHRI = 0x02 // transmitter holding register empty
	ierRLSI = 0x04 // receiver line status
	ierMSI  = 0x08 // modem status

	iirNoInt = 0x01
	iirMSI   = 0x00
	iirTHRI  = 0x02
	iirRDI   = 0x04
	iirRLSI  = 0x06
	iirFIFO  = 0xC0 // FIFOs enabled (16550A)

	fcrEnable   = 0x01
	fcrClearRcv = 0x02

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLoop = 0x10

	lsrDR    = 0x01
	lsrOE    = 0x02
	lsrPE    = 0x04
	lsrFE    = 0x08
	lsrBI    = 0x10
	lsrTHRE  = 0x20
	lsrTEMT  = 0x40
	lsrError = lsrOE | lsrPE | lsrFE | lsrBI

	msrDCTS = 0x01
	msrDDSR = 0x02
	msrTERI = 0x04
	msrDDCD = 0x08
	msrCTS  = 0x10
	msrDSR  = 0x20
	msrRI   = 0x40
	msrDCD  = 0x80

	fifoLoad = 16 // bytes a driver writes per THRE with the FIFO on
)

// UARTConfig configures a UART.
type UARTConfig struct {
	// Name labels logs and errors, e.g. "COM1".
	Name string
	// Out is the serial sink that receives what the guest transmits. Nil
	// discards output.
	Out io.Writer
	// IRQ is the interrupt line (ISA IRQ 4 for COM1). Nil means none.
	IRQ kvm.IRQ
	// OutBuffer bounds the transmit buffer between the guest and Out, in
	// bytes; 0 means DefaultUARTBuffer. At least 256.
	OutBuffer int
	// InBuffer bounds the receive buffer, in bytes; 0 means
	// DefaultUARTBuffer. At least 256.
	InBuffer int
	// Logger receives sink and IRQ failures; nil means slog.Default().
	Logger *slog.Logger
}

// UARTStats counts what passed through a UART.
type UARTStats struct {
	TxBytes    uint64 // bytes handed to the sink (or discarded without one)
	TxDropped  uint64 // THR writes dropped: buffer full or sink failed
	RxBytes    uint64 // bytes placed in the receive buffer
	RxOverruns uint64 // received bytes lost to a full receive buffer (OE)
	IRQErrors  uint64 // failed IRQ.SetLevel calls
}

// UART is a 16550A serial port, modelled on the registers Linux's 8250
// driver uses: the driver identifies it as a 16550A (scratch, loopback and
// FIFO probes pass), polls LSR for the console and runs interrupt driven
// for the tty.
//
// Transmit: THR writes never block the vCPU on the sink. They go into a
// bounded host-side buffer that a goroutine (started on the first byte)
// drains into Out; that way a slow terminal or a full pipe costs the guest
// nothing until the buffer is full. The buffer sits "beyond the wire": while
// it has room for a FIFO load the chip looks as if it transmitted instantly
// (LSR.THRE and LSR.TEMT set). When the sink falls a whole buffer behind,
// THRE and TEMT drop, so a polling driver waits (back pressure) and an
// interrupt-driven one gets its THRE interrupt when the sink catches up;
// bytes written regardless are dropped and counted. Flush waits for the
// sink. FCR "clear transmit FIFO" does not discard the host buffer.
//
// Receive: Input and Pump feed a bounded receive buffer that stands in for
// the 16-byte FIFO; overflow drops bytes and sets LSR.OE. The received-data
// interrupt is raised whenever data is waiting (IIR 0x04; the FIFO trigger
// level and the character-timeout indication are not modelled, which Linux
// does not distinguish).
//
// Interrupt: the line is asserted while IIR reports a pending, enabled
// interrupt and MCR.OUT2 is set, and deasserted otherwise, as on a PC where
// OUT2 gates the IRQ driver (and loopback forces OUT2 inactive). Priorities
// are line status > received data > THR empty > modem status. The THRE
// interrupt is raised when the THR empties (or ETBEI is enabled while it is
// empty) and cleared by reading IIR while it is the reported source or by
// writing THR; since transmission is instant, each THR write lowers and
// re-raises it, giving the edge an ISA PIC needs.
//
// The IRQ is driven with the UART's lock held, to keep level changes in
// order; IRQ.SetLevel must not call back into the UART.
type UART struct {
	name string
	out  io.Writer
	irq  kvm.IRQ
	log  *slog.Logger

	mu sync.Mutex

	ier, lcr, mcr, scr, dll, dlm, fcr uint8
	lsrErr                            uint8 // sticky OE/PE/FE/BI
	msr                               uint8 // status bits (upper nibble)
	msrDelta                          uint8 // delta bits (lower nibble)
	thrPending                        bool
	line                              bool // current IRQ level
	lastRx                            uint8

	rx, tx ring

	stats    UARTStats
	txQueued uint64 // bytes pushed into tx
	txDone   uint64 // bytes taken out of tx (written or failed)
	sinkErr  error

	flushing  bool          // flusher goroutine started
	closed    bool          // Close called
	wake      chan struct{} // wakes the flusher, buffered 1
	flushDone chan struct{} // closed when the flusher exits
	txWait    chan struct{} // closed on tx progress, if anyone waits
	rxWait    chan struct{} // closed when rx space frees, if anyone waits
}

var _ kvm.Device = (*UART)(nil)

// NewUART returns a UART in its power-on state. Call Close when done with
// it: it stops the goroutine that feeds the sink.
func NewUART(cfg UARTConfig) (*UART, error) {
	outCap, err := bufSize("OutBuffer", cfg.OutBuffer)
	if err != nil {
		return nil, err
	}
	inCap, err := bufSize("InBuffer", cfg.InBuffer)
	if err != nil {
		return nil, err
	}
	u := &UART{
		name:      cfg.Name,
		out:       cfg.Out,
		irq:       cfg.IRQ,
		log:       cfg.Logger,
		dll:       0x0C, // 9600 baud, as firmware leaves it
		msr:       msrCTS | msrDSR | msrDCD,
		rx:        ring{size: inCap},
		tx:        ring{size: outCap},
		wake:      make(chan struct{}, 1),
		flushDone: make(chan struct{}),
	}
	if u.name == "" {
		u.name = "uart"
	}
	if u.irq == nil {
		u.irq = kvm.NoIRQ{}
	}
	if u.log == nil {
		u.log = slog.Default()
	}
	return u, nil
}

func bufSize(field string, n int) (int, error) {
	switch {
	case n == 0:
		return DefaultUARTBuffer, nil
	case n < minUARTBuffer:
		return 0, &ConfigError{Device: "UART", Field: field, Reason: "must be 0 (default) or at least 256 bytes"}
	}
	return n, nil
}

// Read implements kvm.Device.
func (u *UART) Read(off uint64, data []byte) { readBytes(&u.mu, u, UARTSize, off, data) }

// Write implements kvm.Device.
func (u *UART) Write(off uint64, data []byte) { writeBytes(&u.mu, u, UARTSize, off, data) }

func (u *UART) readReg(reg uint64) uint8 {
	dlab := u.lcr&lcrDLAB != 0
	switch reg {
	case uartRBR:
		if dlab {
			return u.dll
		}
		if b, ok := u.rx.pop(); ok {
			u.lastRx = b
			u.rxFreed()
			u.updateIRQ()
		}
		return u.lastRx
	case uartIER:
		if dlab {
			return u.dlm
		}
		return u.ier
	case uartIIR:
		id := u.iir()
		if id == iirTHRI {
			u.thrPending = false
			u.updateIRQ()
		}
		if u.fcr&fcrEnable != 0 {
			id |= iirFIFO
		}
		return id
	case uartLCR:
		return u.lcr
	case uartMCR:
		return u.mcr
	case uartLSR:
		v := u.lsr()
		if u.lsrErr != 0 {
			u.lsrErr = 0
			u.updateIRQ()
		}
		return v
	case uartMSR:
		v := u.msr | u.msrDelta
		if u.msrDelta != 0 {
			u.msrDelta = 0
			u.updateIRQ()
		}
		return v
	case uartSCR:
		return u.scr
	}
	return 0xFF
}

func (u *UART) writeReg(reg uint64, v uint8) {
	dlab := u.lcr&lcrDLAB != 0
	switch reg {
	case uartRBR:
		if dlab {
			u.dll = v
			return
		}
		u.transmit(v)
	case uartIER:
		if dlab {
			u.dlm = v
			return
		}
		old := u.ier
		u.ier = v & 0x0F
		if (old^u.ier)&ierTHRI != 0 {
			u.thrPending = u.ier&ierTHRI != 0 && u.thre()
		}
		u.updateIRQ()
	case uartIIR: // FCR
		wasTHRE := u.thre()
		if (v^u.fcr)&fcrEnable != 0 {
			// Switching the FIFOs on or off empties them.
			u.rx.reset()
			u.rxFreed()
		}
		if v&fcrClearRcv != 0 {
			u.rx.reset()
			u.rxFreed()
		}
		// Clear-transmit (bit 2) leaves the host buffer alone: its bytes are
		// already on the wire as far as the guest can tell.
		u.fcr = v &^ 0x06
		if !wasTHRE && u.thre() {
			u.thrPending = true
		}
		u.updateIRQ()
	case uartLCR:
		u.lcr = v
	case uartMCR:
		wasTHRE := u.thre()
		u.mcr = v & 0x1F
		u.updateMSR()
		if !wasTHRE && u.thre() {
			u.thrPending = true
		}
		u.updateIRQ()
	case uartSCR:
		u.scr = v
	}
	// LSR and MSR writes (factory test) are ignored.
}

// thre reports whether the transmitter accepts a byte (LSR.THRE/TEMT).
func (u *UART) thre() bool {
	if u.mcr&mcrLoop != 0 || u.out == nil {
		return true
	}
	load := 1
	if u.fcr&fcrEnable != 0 {
		load = fifoLoad
	}
	return u.tx.free() >= load
}

func (u *UART) lsr() uint8 {
	v := u.lsrErr
	if u.rx.n > 0 {
		v |= lsrDR
	}
	if u.thre() {
		v |= lsrTHRE | lsrTEMT
	}
	return v
}

// iir returns the highest-priority pending, enabled interrupt.
func (u *UART) iir() uint8 {
	switch {
	case u.ier&ierRLSI != 0 && u.lsrErr != 0:
		return iirRLSI
	case u.ier&ierRDI != 0 && u.rx.n > 0:
		return iirRDI
	case u.ier&ierTHRI != 0 && u.thrPending:
		return iirTHRI
	case u.ier&ierMSI != 0 && u.msrDelta != 0:
		return iirMSI
	}
	return iirNoInt
}

// updateMSR recomputes the modem status lines from MCR (loopback) or the
// fixed "cable attached" state, recording delta bits for changes.
func (u *UART) updateMSR() {
	var st uint8
	if u.mcr&mcrLoop != 0 {
		if u.mcr&mcrRTS != 0 {
			st |= msrCTS
		}
		if u.mcr&mcrDTR != 0 {
			st |= msrDSR
		}
		if u.mcr&mcrOUT1 != 0 {
			st |= msrRI
		}
		if u.mcr&mcrOUT2 != 0 {
			st |= msrDCD
		}
	} else {
		st = msrCTS | msrDSR | msrDCD
	}
	ch := st ^ u.msr
	if ch&msrCTS != 0 {
		u.msrDelta |= msrDCTS
	}
	if ch&msrDSR != 0 {
		u.msrDelta |= msrDDSR
	}
	if ch&msrDCD != 0 {
		u.msrDelta |= msrDDCD
	}
	if ch&msrRI != 0 && st&msrRI == 0 { // trailing edge of RI
		u.msrDelta |= msrTERI
	}
	u.msr = st
}

func (u *UART) updateIRQ() {
	want := u.iir() != iirNoInt && u.mcr&mcrOUT2 != 0 && u.mcr&mcrLoop == 0
	if want == u.line {
		return
	}
	if err := u.irq.SetLevel(want); err != nil {
		u.stats.IRQErrors++
		if u.stats.IRQErrors == 1 {
			u.log.Warn("uart: cannot drive interrupt line", "uart", u.name, "level", want, "err", err)
		}
		return
	}
	u.line = want
}

func (u *UART) transmit(b uint8) {
	u.thrPending = false
	u.updateIRQ()
	switch {
	case u.mcr&mcrLoop != 0:
		u.receive([]byte{b})
	case u.out == nil:
		u.stats.TxBytes++
	case u.closed || u.tx.free() == 0:
		u.stats.TxDropped++
	default:
		u.tx.push([]byte{b})
		u.txQueued++
		if !u.flushing {
			u.flushing = true
			go u.flushLoop()
		}
		select {
		case u.wake <- struct{}{}:
		default:
		}
	}
	if u.thre() {
		u.thrPending = true
	}
	u.updateIRQ()
}

// receive puts p into the receive buffer, setting OE for what does not fit.
func (u *UART) receive(p []byte) int {
	n := u.rx.push(p)
	u.stats.RxBytes += uint64(n)
	if n < len(p) {
		u.lsrErr |= lsrOE
		u.stats.RxOverruns += uint64(len(p) - n)
	}
	return n
}

func (u *UART) rxFreed() {
	if u.rxWait != nil {
		close(u.rxWait)
		u.rxWait = nil
	}
}

// Input delivers bytes from the far end of the serial line to the guest and
// raises the received-data interrupt. It never blocks: bytes that do not
// fit in the receive buffer are lost and set LSR.OE (an overrun), as on real
// hardware. It returns how many bytes were accepted.
func (u *UART) Input(p []byte) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := u.receive(p)
	u.updateIRQ()
	return n
}

// Pump copies r into the receive buffer until r returns io.EOF (Pump then
// returns nil), r fails (a *SinkError), or ctx is done (ctx.Err()). Unlike
// Input it waits for room instead of overrunning, so a paste into a slow
// guest loses nothing. A blocked r.Read is not interrupted by ctx: close r
// to stop a Pump promptly.
func (u *UART) Pump(ctx context.Context, r io.Reader) error {
	buf := make([]byte, 4096)
	for {
		n, rerr := r.Read(buf)
		p := buf[:n]
		for len(p) > 0 {
			u.mu.Lock()
			k := u.receive(p[:min(len(p), u.rx.free())])
			u.updateIRQ()
			p = p[k:]
			var wait chan struct{}
			if len(p) > 0 {
				if u.rxWait == nil {
					u.rxWait = make(chan struct{})
				}
				wait = u.rxWait
			}
			u.mu.Unlock()
			if wait != nil {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-wait:
				}
			}
		}
		if errors.Is(rerr, io.EOF) {
			return nil
		}
		if rerr != nil {
			return &SinkError{Device: u.name, Op: "read", Err: rerr}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// flushLoop drains tx into the sink. The producer only writes into free
// space, so the occupied chunk can be written without holding the lock.
func (u *UART) flushLoop() {
	defer close(u.flushDone)
	for {
		u.mu.Lock()
		for u.tx.n == 0 {
			if u.closed {
				u.mu.Unlock()
				return
			}
			u.mu.Unlock()
			<-u.wake
			u.mu.Lock()
		}
		chunk := u.tx.head()
		u.mu.Unlock()

		n, err := u.out.Write(chunk)
		if err == nil && n < len(chunk) {
			err = io.ErrShortWrite
		}

		u.mu.Lock()
		wasTHRE := u.thre()
		u.tx.discard(len(chunk))
		u.txDone += uint64(len(chunk))
		u.stats.TxBytes += uint64(max(0, min(n, len(chunk))))
		if err != nil {
			u.stats.TxDropped += uint64(len(chunk) - max(0, min(n, len(chunk))))
			if u.sinkErr == nil {
				u.log.Warn("uart: serial sink failed; dropping output", "uart", u.name, "err", err)
			}
			u.sinkErr = &SinkError{Device: u.name, Op: "write", Err: err}
		}
		if !wasTHRE && u.thre() {
			u.thrPending = true
			u.updateIRQ()
		}
		if u.txWait != nil {
			close(u.txWait)
			u.txWait = nil
		}
		u.mu.Unlock()
	}
}

// Flush waits until every byte the guest transmitted before the call has
// been handed to the sink, and returns (and clears) the last sink error.
func (u *UART) Flush() error { return u.FlushContext(context.Background()) }

// FlushContext is Flush bounded by ctx; it returns ctx.Err() if ctx ends
// first.
func (u *UART) FlushContext(ctx context.Context) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	target := u.txQueued
	for u.txDone < target {
		if u.txWait == nil {
			u.txWait = make(chan struct{})
		}
		w := u.txWait
		u.mu.Unlock()
		select {
		case <-ctx.Done():
			u.mu.Lock()
			return ctx.Err()
		case <-w:
		}
		u.mu.Lock()
	}
	err := u.sinkErr
	u.sinkErr = nil
	return err
}

// Close writes out what is buffered, stops the flushing goroutine and
// returns the last sink error. Later THR writes are dropped. Close blocks
// while the sink blocks; call FlushContext first to bound the wait.
func (u *UART) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	started := u.flushing
	u.mu.Unlock()
	if started {
		select {
		case u.wake <- struct{}{}:
		default:
		}
		<-u.flushDone
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	err := u.sinkErr
	u.sinkErr = nil
	return err
}

// Stats returns the UART's counters.
func (u *UART) Stats() UARTStats {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.stats
}

// ring is a bounded byte FIFO whose storage is allocated on first use.
type ring struct {
	buf  []byte
	size int
	off  int // index of the first byte
	n    int // bytes held
}

func (r *ring) free() int { return r.size - r.n }

// push appends as much of p as fits and returns how much that was.
func (r *ring) push(p []byte) int {
	if r.buf == nil && len(p) > 0 {
		r.buf = make([]byte, r.size)
	}
	k := min(len(p), r.free())
	for i := 0; i < k; {
		end := (r.off + r.n) % r.size
		c := copy(r.buf[end:min(r.size, end+k-i)], p[i:k])
		i += c
		r.n += c
	}
	return k
}

func (r *ring) pop() (uint8, bool) {
	if r.n == 0 {
		return 0, false
	}
	b := r.buf[r.off]
	r.off = (r.off + 1) % r.size
	r.n--
	return b, true
}

// head returns the longest contiguous run of held bytes at the front.
func (r *ring) head() []byte {
	return r.buf[r.off:min(r.size, r.off+r.n)]
}

func (r *ring) discard(k int) {
	k = min(k, r.n)
	r.off = (r.off + k) % r.size
	r.n -= k
}

func (r *ring) reset() { r.off, r.n = 0, 0 }
