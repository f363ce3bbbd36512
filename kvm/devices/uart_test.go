package devices

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newTestUART(t *testing.T, cfg UARTConfig) (*UART, port) {
	t.Helper()
	u, err := NewUART(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = u.Close() })
	return u, port{u}
}

// linuxAutoconfig follows drivers/tty/serial/8250/8250_port.c autoconfig()
// and autoconfig_16550a() and returns the port type it would settle on.
func linuxAutoconfig(t *testing.T, p port) string {
	t.Helper()
	// Scratch test on IER.
	saveIER := p.in(uartIER)
	p.out(uartIER, 0)
	s2 := p.in(uartIER) & 0x0F
	p.out(uartIER, 0x0F)
	s3 := p.in(uartIER) & 0x0F
	p.out(uartIER, saveIER)
	if s2 != 0 || s3 != 0x0F {
		return "none (scratch test)"
	}
	// Loopback test: RTS -> CTS, OUT2 -> DCD.
	saveMCR := p.in(uartMCR)
	saveLCR := p.in(uartLCR)
	p.out(uartMCR, mcrLoop|0x0A)
	status := p.in(uartMSR) & 0xF0
	p.out(uartMCR, saveMCR)
	if status != 0x90 {
		return "none (loopback test)"
	}
	// EFR probe writes, then the FIFO probe.
	p.out(uartLCR, 0xBF)
	p.out(2, 0) // EFR on chips that have it; FCR here
	p.out(uartLCR, 0)
	p.out(2, fcrEnable)
	switch p.in(uartIIR) >> 6 {
	case 0:
		return "16450"
	case 1:
		return "unknown"
	case 2:
		return "16550"
	}
	// 16550A candidates: a 16750 would set IIR bit 5 with FCR bit 5.
	p.out(uartLCR, 0)
	p.out(2, fcrEnable|0x20)
	st := p.in(uartIIR) & 0xE0
	p.out(uartLCR, saveLCR)
	p.out(2, fcrEnable|fcrClearRcv|0x04)
	if st == 0xE0 {
		return "16750"
	}
	if st != 0xC0 {
		return "unknown (FIFO)"
	}
	return "16550A"
}

func TestUARTLinuxAutoconfig(t *testing.T) {
	irq := &recIRQ{}
	_, p := newTestUART(t, UARTConfig{IRQ: irq})
	assert.Equal(t, "16550A", linuxAutoconfig(t, p))

	// Divisor latch: 115200 baud, 8N1, as serial8250_do_set_termios does.
	p.out(uartLCR, lcrDLAB|0x03)
	p.out(uartRBR, 0x01)
	p.out(uartIER, 0x00)
	assert.Equal(t, uint8(0x01), p.in(uartRBR), "DLL")
	assert.Equal(t, uint8(0x00), p.in(uartIER), "DLM")
	p.out(uartLCR, 0x03)
	assert.Equal(t, uint8(0x03), p.in(uartLCR))
	assert.Equal(t, uint8(0x00), p.in(uartIER), "IER untouched by DLM write")

	// Scratch register.
	p.out(uartSCR, 0x5A)
	assert.Equal(t, uint8(0x5A), p.in(uartSCR))

	// Idle transmitter, nothing received; modem lines of an attached cable.
	assert.Equal(t, uint8(lsrTHRE|lsrTEMT), p.in(uartLSR))
	assert.Equal(t, uint8(msrCTS|msrDSR|msrDCD), p.in(uartMSR)&0xF0)
	assert.Equal(t, uint8(0xC1), p.in(uartIIR), "FIFO on, no interrupt")
	assert.False(t, irq.high(), "no interrupt during probing")
}

func TestUARTLinuxStartupTXEN(t *testing.T) {
	// serial8250_do_startup: with OUT2 set, enabling THRI on an empty
	// transmitter must show a THRE interrupt at once (else UART_BUG_TXEN).
	irq := &recIRQ{}
	_, p := newTestUART(t, UARTConfig{IRQ: irq})
	p.out(2, fcrEnable|fcrClearRcv|0x04)
	p.out(uartLCR, 0x03)
	p.out(uartMCR, mcrDTR|mcrRTS|mcrOUT2)
	p.out(uartIER, ierTHRI)
	lsr := p.in(uartLSR)
	iir := p.in(uartIIR)
	p.out(uartIER, 0)
	assert.NotZero(t, lsr&lsrTEMT)
	assert.Equal(t, uint8(0xC0|iirTHRI), iir)
	assert.Equal(t, []bool{true, false}, irq.take(), "raised on enable, lowered by the IIR read")

	// UART_BUG_THRE probe: THRE must be reasserted after the IIR read
	// cleared it, when THRI is disabled and enabled again.
	p.out(uartIER, ierTHRI)
	iir1 := p.in(uartIIR)
	p.out(uartIER, 0)
	p.out(uartIER, ierTHRI)
	iir2 := p.in(uartIIR)
	p.out(uartIER, 0)
	assert.Equal(t, uint8(0xC0|iirTHRI), iir1)
	assert.Equal(t, uint8(0xC0|iirTHRI), iir2)
	assert.Equal(t, []bool{true, false, true, false}, irq.take())
}

func TestUARTInterruptLine(t *testing.T) {
	type step struct {
		name    string
		do      func(u *UART, p port)
		wantIIR uint8 // without FIFO bits, read after the step (0xFF: skip)
		want    []bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"OUT2 gates the line", []step{
			{"enable rx irq", func(_ *UART, p port) { p.out(uartIER, ierRDI) }, 0xFF, nil},
			{"input without OUT2", func(u *UART, _ port) { u.Input([]byte("x")) }, 0xFF, nil},
			{"set OUT2", func(_ *UART, p port) { p.out(uartMCR, mcrOUT2) }, 0xFF, []bool{true}},
			{"clear OUT2", func(_ *UART, p port) { p.out(uartMCR, 0) }, 0xFF, []bool{false}},
			{"set OUT2 again", func(_ *UART, p port) { p.out(uartMCR, mcrOUT2) }, iirRDI, []bool{true}},
			{"read RBR", func(_ *UART, p port) { assert.Equal(t, uint8('x'), p.in(uartRBR)) }, iirNoInt, []bool{false}},
		}},
		{"THRE raised on THR write, cleared by IIR read", []step{
			{"OUT2", func(_ *UART, p port) { p.out(uartMCR, mcrOUT2) }, 0xFF, nil},
			{"enable THRI", func(_ *UART, p port) { p.out(uartIER, ierTHRI) }, 0xFF, []bool{true}},
			{"IIR read clears THRE", func(_ *UART, p port) { assert.Equal(t, uint8(iirTHRI), p.in(uartIIR)&0x0F) }, iirNoInt, []bool{false}},
			{"THR write raises it again", func(_ *UART, p port) { p.out(uartRBR, 'a') }, 0xFF, []bool{true}},
			{"THR write while pending makes an edge", func(_ *UART, p port) { p.out(uartRBR, 'b') }, iirTHRI, []bool{false, true}},
			{"IIR read", func(_ *UART, p port) {}, iirNoInt, []bool{false}},
			{"disable and enable THRI", func(_ *UART, p port) { p.out(uartIER, 0); p.out(uartIER, ierTHRI) }, 0xFF, []bool{true}},
			{"disable THRI", func(_ *UART, p port) { p.out(uartIER, 0) }, iirNoInt, []bool{false}},
		}},
		{"priority: line status > rx > THRE > modem", []step{
			{"OUT2+all enables", func(_ *UART, p port) { p.out(uartMCR, mcrOUT2); p.out(uartIER, 0x0F) }, 0xFF, []bool{true}},
			{"overrun", func(u *UART, _ port) { u.Input(make([]byte, 300)) }, 0xFF, nil},
			{"LSR first", func(_ *UART, p port) { assert.Equal(t, uint8(iirRLSI), p.in(uartIIR)&0x0F) }, 0xFF, nil},
			{"read LSR clears OE; rx next", func(_ *UART, p port) { assert.NotZero(t, p.in(uartLSR)&lsrOE) }, iirRDI, nil},
			{"drain rx; THRE next", func(_ *UART, p port) {
				for p.in(uartLSR)&lsrDR != 0 {
					p.in(uartRBR)
				}
			}, iirTHRI, nil},
			{"IIR cleared THRE; nothing", func(_ *UART, p port) {}, iirNoInt, []bool{false}},
			{"modem status delta via loopback toggle", func(_ *UART, p port) {
				p.out(uartMCR, mcrOUT2|mcrLoop)
				p.out(uartMCR, mcrOUT2)
			}, iirMSI, []bool{true}},
			{"MSR read clears deltas", func(_ *UART, p port) { assert.NotZero(t, p.in(uartMSR)&0x0F) }, iirNoInt, []bool{false}},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			irq := &recIRQ{}
			u, p := newTestUART(t, UARTConfig{IRQ: irq, InBuffer: 256})
			p.out(2, fcrEnable)
			for _, s := range tc.steps {
				s.do(u, p)
				assert.Equal(t, s.want, irq.take(), "step %q: line transitions", s.name)
				if s.wantIIR != 0xFF {
					assert.Equal(t, s.wantIIR, p.in(uartIIR)&0x0F, "step %q: IIR", s.name)
				}
			}
		})
	}
}

func TestUARTTransmitToSink(t *testing.T) {
	var sink syncBuffer
	u, p := newTestUART(t, UARTConfig{Out: &sink})
	msg := "Linux version 6.x\r\nconsole [ttyS0] enabled\r\n"
	for i := 0; i < len(msg); i++ {
		for p.in(uartLSR)&lsrTHRE == 0 { // serial8250_console_putchar
			runtime.Gosched()
		}
		p.out(uartRBR, msg[i])
	}
	require.NoError(t, u.Flush())
	assert.Equal(t, msg, sink.String())
	st := u.Stats()
	assert.Equal(t, uint64(len(msg)), st.TxBytes)
	assert.Zero(t, st.TxDropped)
}

func TestUARTNilSinkDiscards(t *testing.T) {
	u, p := newTestUART(t, UARTConfig{})
	for i := 0; i < 100000; i++ {
		p.out(uartRBR, 'x')
	}
	require.NoError(t, u.Flush())
	assert.Equal(t, uint64(100000), u.Stats().TxBytes)
	assert.NotZero(t, p.in(uartLSR)&lsrTHRE)
}

func TestUARTReceive(t *testing.T) {
	tests := []struct {
		name     string
		inBuf    int
		input    []string
		want     string
		wantOE   bool
		overruns uint64
	}{
		{"single", 0, []string{"abc"}, "abc", false, 0},
		{"several writes", 0, []string{"ab", "", "cd"}, "abcd", false, 0},
		{"exactly full", 256, []string{strings.Repeat("z", 256)}, strings.Repeat("z", 256), false, 0},
		{"overflow sets OE", 256, []string{strings.Repeat("y", 250), "0123456789"}, strings.Repeat("y", 250) + "012345", true, 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			irq := &recIRQ{}
			u, p := newTestUART(t, UARTConfig{IRQ: irq, InBuffer: tc.inBuf})
			p.out(uartMCR, mcrOUT2)
			p.out(uartIER, ierRDI)
			assert.Zero(t, p.in(uartLSR)&lsrDR)
			for _, s := range tc.input {
				u.Input([]byte(s))
			}
			assert.True(t, irq.high(), "rx interrupt raised")
			lsr := p.in(uartLSR)
			assert.NotZero(t, lsr&lsrDR)
			assert.Equal(t, tc.wantOE, lsr&lsrOE != 0)
			assert.Zero(t, p.in(uartLSR)&lsrOE, "OE clears on LSR read")
			var got []byte
			for p.in(uartLSR)&lsrDR != 0 {
				got = append(got, p.in(uartRBR))
			}
			assert.Equal(t, tc.want, string(got))
			assert.False(t, irq.high(), "rx interrupt lowered once drained")
			assert.Equal(t, tc.overruns, u.Stats().RxOverruns)
		})
	}
}

func TestUARTFCRClearsReceiver(t *testing.T) {
	u, p := newTestUART(t, UARTConfig{})
	p.out(2, fcrEnable)
	u.Input([]byte("junk"))
	p.out(2, fcrEnable|fcrClearRcv)
	assert.Zero(t, p.in(uartLSR)&lsrDR)
	u.Input([]byte("k"))
	p.out(2, 0) // disabling the FIFO empties it too
	assert.Zero(t, p.in(uartLSR)&lsrDR)
	assert.Equal(t, uint8(0x01), p.in(uartIIR), "FIFO bits off")
}

func TestUARTLoopback(t *testing.T) {
	tests := []struct {
		mcr uint8
		msr uint8 // upper nibble
	}{
		{mcrLoop, 0},
		{mcrLoop | mcrRTS, msrCTS},
		{mcrLoop | mcrDTR, msrDSR},
		{mcrLoop | mcrOUT1, msrRI},
		{mcrLoop | mcrOUT2, msrDCD},
		{mcrLoop | 0x0F, 0xF0},
		{0, msrCTS | msrDSR | msrDCD},
		{mcrDTR | mcrRTS | mcrOUT2, msrCTS | msrDSR | msrDCD},
	}
	for _, tc := range tests {
		_, p := newTestUART(t, UARTConfig{})
		p.out(uartMCR, tc.mcr)
		assert.Equal(t, tc.msr, p.in(uartMSR)&0xF0, "MCR %#x", tc.mcr)
	}

	var sink syncBuffer
	irq := &recIRQ{}
	u, p := newTestUART(t, UARTConfig{Out: &sink, IRQ: irq})
	p.out(uartIER, ierRDI)
	p.out(uartMCR, mcrLoop|mcrOUT2)
	p.out(uartRBR, 'L')
	assert.NotZero(t, p.in(uartLSR)&lsrDR)
	assert.Equal(t, uint8(iirRDI), p.in(uartIIR)&0x0F, "interrupt pending internally")
	assert.Empty(t, irq.take(), "but loopback keeps the IRQ line off")
	assert.Equal(t, uint8('L'), p.in(uartRBR))
	require.NoError(t, u.Flush())
	assert.Empty(t, sink.String(), "loopback output never reaches the wire")

	// Deltas record the lines that changed.
	assert.Equal(t, uint8(msrDCTS|msrDDSR), p.in(uartMSR)&0x0F, "CTS and DSR dropped entering loopback")
	p.out(uartMCR, mcrLoop) // DCD drops (OUT2 cleared)
	assert.Equal(t, uint8(msrDDCD), p.in(uartMSR)&0x0F)
	p.out(uartMCR, mcrLoop|mcrOUT1)
	p.out(uartMCR, mcrLoop) // RI trailing edge
	assert.Equal(t, uint8(msrTERI), p.in(uartMSR)&0x0F)
}

// gateWriter blocks every Write until released.
type gateWriter struct {
	release chan struct{}
	out     syncBuffer
}

func (g *gateWriter) Write(p []byte) (int, error) {
	<-g.release
	return g.out.Write(p)
}

func TestUARTBackpressure(t *testing.T) {
	g := &gateWriter{release: make(chan struct{})}
	irq := &recIRQ{}
	u, p := newTestUART(t, UARTConfig{Out: g, IRQ: irq, OutBuffer: 256})
	p.out(2, fcrEnable)
	p.out(uartMCR, mcrOUT2)
	written := 0
	for p.in(uartLSR)&lsrTHRE != 0 {
		p.out(uartRBR, byte('a'+written%26))
		written++
		require.LessOrEqual(t, written, 256, "THRE never dropped")
	}
	assert.Equal(t, 256-fifoLoad+1, written, "THRE drops when a FIFO load no longer fits")
	assert.Zero(t, p.in(uartLSR)&lsrTEMT)

	// A driver ignoring THRE fills the last bytes, then loses the rest.
	for i := 0; i < fifoLoad+5; i++ {
		p.out(uartRBR, '!')
	}
	assert.Equal(t, uint64(6), u.Stats().TxDropped)

	// Interrupt-driven driver: enable THRI while full, no interrupt yet.
	irq.take()
	p.out(uartIER, ierTHRI)
	assert.Empty(t, irq.take())

	close(g.release)
	require.NoError(t, u.Flush())
	assert.NotZero(t, p.in(uartLSR)&lsrTHRE)
	assert.True(t, irq.high(), "THRE interrupt once the sink caught up")
	assert.Len(t, g.out.String(), 256)
}

type failWriter struct{ err error }

func (f failWriter) Write([]byte) (int, error) { return 0, f.err }

func TestUARTSinkError(t *testing.T) {
	boom := errors.New("pipe closed")
	u, p := newTestUART(t, UARTConfig{Name: "COM1", Out: failWriter{boom}, Logger: slog.New(slog.DiscardHandler)})
	p.out(uartRBR, 'x')
	err := u.Flush()
	var se *SinkError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, "COM1", se.Device)
	assert.ErrorIs(t, err, boom)
	assert.Contains(t, err.Error(), "COM1")
	assert.NoError(t, u.Flush(), "error reported once")
	assert.Equal(t, uint64(1), u.Stats().TxDropped)
	assert.NotZero(t, p.in(uartLSR)&lsrTHRE, "a broken sink does not stall the guest")
}

func TestUARTFlushContext(t *testing.T) {
	g := &gateWriter{release: make(chan struct{})}
	u, p := newTestUART(t, UARTConfig{Out: g})
	p.out(uartRBR, 'x')
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, u.FlushContext(ctx), context.Canceled)
	close(g.release)
	assert.NoError(t, u.Flush())
}

func TestUARTClose(t *testing.T) {
	var sink syncBuffer
	u, p := newTestUART(t, UARTConfig{Out: &sink})
	p.out(uartRBR, 'a')
	require.NoError(t, u.Close())
	assert.Equal(t, "a", sink.String(), "Close drains")
	p.out(uartRBR, 'b')
	assert.Equal(t, uint64(1), u.Stats().TxDropped)
	assert.NoError(t, u.Close())
}

func TestUARTConfigErrors(t *testing.T) {
	for _, cfg := range []UARTConfig{{OutBuffer: 10}, {InBuffer: -1}} {
		_, err := NewUART(cfg)
		var ce *ConfigError
		assert.ErrorAs(t, err, &ce)
	}
}

func TestUARTMultiByteAccess(t *testing.T) {
	_, p := newTestUART(t, UARTConfig{})
	// A 16-bit write at LCR sets LCR and MCR, like two byte writes.
	p.d.Write(uartLCR, []byte{0x03, mcrDTR})
	assert.Equal(t, uint8(0x03), p.in(uartLCR))
	assert.Equal(t, uint8(mcrDTR), p.in(uartMCR))
	// A 4-byte read at SCR: one register, then open bus.
	p.out(uartSCR, 0x42)
	b := make([]byte, 4)
	p.d.Read(uartSCR, b)
	assert.Equal(t, []byte{0x42, 0xFF, 0xFF, 0xFF}, b)
	p.d.Read(1<<63, b)
	assert.Equal(t, []byte{0xFF, 0xFF, 0xFF, 0xFF}, b)
}

func TestUARTPump(t *testing.T) {
	u, p := newTestUART(t, UARTConfig{InBuffer: 256})
	want := bytes.Repeat([]byte("0123456789abcdef"), 100) // 1600 bytes > buffer
	done := make(chan error, 1)
	go func() { done <- u.Pump(context.Background(), bytes.NewReader(want)) }()
	var got []byte
	for len(got) < len(want) {
		if p.in(uartLSR)&lsrDR != 0 {
			got = append(got, p.in(uartRBR))
		} else {
			runtime.Gosched()
		}
	}
	require.NoError(t, <-done)
	assert.Equal(t, want, got)
	assert.Zero(t, u.Stats().RxOverruns, "Pump waits instead of overrunning")
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestUARTPumpStops(t *testing.T) {
	u, _ := newTestUART(t, UARTConfig{InBuffer: 256})
	boom := errors.New("tty gone")
	err := u.Pump(context.Background(), errReader{boom})
	assert.ErrorIs(t, err, boom)
	var se *SinkError
	assert.ErrorAs(t, err, &se)

	// Full buffer, nobody reading: cancellation ends the wait.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- u.Pump(ctx, bytes.NewReader(make([]byte, 1000))) }()
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
	assert.Zero(t, u.Stats().RxOverruns)
}

func TestUARTConcurrent(t *testing.T) {
	var sink syncBuffer
	irq := &recIRQ{}
	u, p := newTestUART(t, UARTConfig{Out: &sink, IRQ: irq, OutBuffer: 256, InBuffer: 256})
	p.out(uartMCR, mcrOUT2)
	p.out(uartIER, 0x0F)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				switch i % 4 {
				case 0:
					p.out(uartRBR, 'x')
				case 1:
					u.Input([]byte("in"))
				case 2:
					p.in(uartIIR)
				case 3:
					p.in(uartRBR)
				}
			}
		}()
	}
	wg.Wait()
	require.NoError(t, u.Flush())
	st := u.Stats()
	assert.Equal(t, uint64(4*500), st.TxBytes+st.TxDropped)
	assert.Equal(t, int(st.TxBytes), len(sink.String()))
}

// FuzzUARTRegisters drives random register accesses and input: nothing may
// panic and both buffers stay within their bounds.
func FuzzUARTRegisters(f *testing.F) {
	f.Add([]byte{3, 0x80, 0, 1, 1, 0, 3, 3, 4, 0x1F, 0, 'a', 2, 0x07})
	f.Add([]byte{4, 0x08, 1, 0x0F, 0, 'x', 0x82, 0, 0x85, 0, 0x86, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		var sink syncBuffer
		u, err := NewUART(UARTConfig{Out: &sink, IRQ: &recIRQ{}, OutBuffer: 256, InBuffer: 256})
		require.NoError(t, err)
		defer u.Close()
		for i := 0; i+1 < len(ops); i += 2 {
			op, v := ops[i], ops[i+1]
			off := uint64(op & 0x0F) // includes offsets past the device
			switch op >> 4 & 0x3 {
			case 0:
				u.Write(off, []byte{v})
			case 1:
				var b [1]byte
				u.Read(off, b[:])
			case 2:
				u.Input(bytes.Repeat([]byte{v}, int(v)))
			case 3:
				b := make([]byte, 1+int(v%4))
				if op&0x40 != 0 {
					u.Read(off, b)
				} else {
					u.Write(off, b)
				}
			}
			u.mu.Lock()
			rx, tx := u.rx.n, u.tx.n
			u.mu.Unlock()
			require.LessOrEqual(t, rx, 256)
			require.LessOrEqual(t, tx, 256)
		}
		require.NoError(t, u.Close())
		assert.Equal(t, int(u.Stats().TxBytes), len(sink.String()))
	})
}

var _ io.Writer = (*gateWriter)(nil)
