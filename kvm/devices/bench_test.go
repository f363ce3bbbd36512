package devices

import (
	"io"
	"strings"
	"testing"
)

// BenchmarkUARTConsoleByte is the cost of one console character as Linux
// polls it: an LSR read and a THR write (two port-I/O exits' worth of
// device work, excluding the exits themselves).
func BenchmarkUARTConsoleByte(b *testing.B) {
	u, err := NewUART(UARTConfig{Out: io.Discard, IRQ: &countIRQ{}})
	if err != nil {
		b.Fatal(err)
	}
	defer u.Close()
	lsr, thr := make([]byte, 1), []byte{'x'}
	b.ReportAllocs()
	b.SetBytes(1)
	for b.Loop() {
		for {
			u.Read(uartLSR, lsr)
			if lsr[0]&lsrTHRE != 0 {
				break
			}
		}
		u.Write(uartRBR, thr)
	}
}

// BenchmarkUARTInterruptTx is interrupt-driven transmit with THRI enabled:
// each THR write lowers and re-raises the line.
func BenchmarkUARTInterruptTx(b *testing.B) {
	irq := &countIRQ{}
	u, err := NewUART(UARTConfig{IRQ: irq})
	if err != nil {
		b.Fatal(err)
	}
	u.Write(uartMCR, []byte{mcrOUT2})
	u.Write(uartIER, []byte{ierTHRI})
	thr := []byte{'x'}
	b.ReportAllocs()
	for b.Loop() {
		u.Write(uartRBR, thr)
	}
	b.ReportMetric(float64(irq.n)/float64(b.N), "setlevel/op")
}

func BenchmarkConsoleWatcher(b *testing.B) {
	w, err := NewConsoleWatcher(ConsoleConfig{})
	if err != nil {
		b.Fatal(err)
	}
	line := []byte("[    0.123456] pci 0000:00:01.0: [8086:7000] type 00 class 0x060100\n")
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		_, _ = w.Write(line)
	}
}

func BenchmarkConsoleWatcherByteWrites(b *testing.B) {
	w, err := NewConsoleWatcher(ConsoleConfig{})
	if err != nil {
		b.Fatal(err)
	}
	line := []byte(strings.Repeat("y", 79) + "\n")
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		for i := range line {
			_, _ = w.Write(line[i : i+1])
		}
	}
}

type countIRQ struct{ n int }

func (c *countIRQ) SetLevel(bool) error { c.n++; return nil }
