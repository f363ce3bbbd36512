// Package console is the virtio console device (virtio 1.2 section 5.3)
// with a single port: bytes the guest writes to hvc0 go to an io.Writer, and
// bytes read from an io.Reader are delivered to the guest as input.
package console

import (
	"context"
	"encoding/binary"
	"io"
	"sync"

	"github.com/kvmkit/kvmkit/virtio"
)

// QueueSize is the maximum size of each queue.
const QueueSize = 256

// Queue indices.
const (
	ReceiveQueue  = 0 // device to driver: console input
	TransmitQueue = 1 // driver to device: console output
)

// Feature bits (virtio 1.2 section 5.3.3).
const (
	FeatureSize       uint64 = 1 << 0
	FeatureMultiport  uint64 = 1 << 1
	FeatureEmergWrite uint64 = 1 << 2
)

// inputChunk is how much input is read from the io.Reader at a time.
const inputChunk = 4096

// Options configure a console.
type Options struct {
	// Input is read on a goroutine for the device's lifetime and fed to the
	// guest; nil means no input.
	Input io.Reader
	// Output receives what the guest writes; nil discards it. Write is
	// called with slices of guest memory and must not retain them.
	Output io.Writer
	// Cols and Rows, if non-zero, are offered with VIRTIO_CONSOLE_F_SIZE.
	Cols, Rows uint16
}

// Device is a virtio-console device.
type Device struct {
	virtio.Runner // QueueNotify, Reset, Pause, Resume

	in         io.Reader
	out        io.Writer
	cols, rows uint16

	inputOnce sync.Once
	input     chan []byte // chunks from the reader goroutine
	pending   []byte      // input taken from the channel, not yet delivered; rx worker only
}

var _ virtio.Device = (*Device)(nil)

// New returns a console.
func New(opts Options) *Device {
	out := opts.Output
	if out == nil {
		out = io.Discard
	}
	return &Device{in: opts.Input, out: out, cols: opts.Cols, rows: opts.Rows, input: make(chan []byte, 1)}
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceConsole }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	f := FeatureEmergWrite
	if d.cols != 0 || d.rows != 0 {
		f |= FeatureSize
	}
	return f
}

// QueueMaxSizes implements virtio.Device: receiveq0 and transmitq0.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize} }

// ReadConfig implements virtio.Device: cols, rows, max_nr_ports, emerg_wr.
func (d *Device) ReadConfig(off uint64, data []byte) {
	var c [12]byte
	binary.LittleEndian.PutUint16(c[0:], d.cols)
	binary.LittleEndian.PutUint16(c[2:], d.rows)
	binary.LittleEndian.PutUint32(c[4:], 1)
	clear(data)
	if off < uint64(len(c)) {
		copy(data, c[off:])
	}
}

// WriteConfig implements virtio.Device: a write to emerg_wr outputs one
// character even before the queues are up.
func (d *Device) WriteConfig(off uint64, data []byte) {
	if off == 8 && len(data) > 0 {
		d.out.Write(data[:1])
	}
}

// Activate implements virtio.Device.
func (d *Device) Activate(a virtio.Activation) error {
	ws := make(virtio.Workers, 2)
	if q := a.Queues[TransmitQueue]; q != nil {
		var c virtio.Chain
		ws[TransmitQueue] = virtio.StartWorker(func(ctx context.Context) {
			virtio.ServeQueue(q, TransmitQueue, virtio.DeviceConsole, a.Interrupt, &c, d.transmit)
		})
	}
	if q := a.Queues[ReceiveQueue]; q != nil {
		var c virtio.Chain
		ws[ReceiveQueue] = virtio.StartWorker(func(ctx context.Context) {
			d.receive(q, a.Interrupt, &c)
		})
	}
	d.Start(ws)
	if d.in != nil {
		d.inputOnce.Do(func() { go d.readInput() })
	}
	d.QueueNotify(ReceiveQueue) // deliver input that arrived before activation
	return nil
}

// transmit writes one output chain to the output writer.
func (d *Device) transmit(c *virtio.Chain) (uint32, error) {
	for _, desc := range c.Readable() {
		if len(desc.Buf) > 0 {
			if _, err := d.out.Write(desc.Buf); err != nil {
				break // output is best effort: a broken terminal must not stop the guest
			}
		}
	}
	return 0, nil
}

// readInput forwards input chunks until the reader fails.
func (d *Device) readInput() {
	for {
		buf := make([]byte, inputChunk)
		n, err := d.in.Read(buf)
		if n > 0 {
			d.input <- buf[:n]
			d.QueueNotify(ReceiveQueue)
		}
		if err != nil {
			return
		}
	}
}

// receive moves pending input into the driver's receive buffers.
func (d *Device) receive(q *virtio.Queue, irq virtio.Interrupt, c *virtio.Chain) {
	if q.Err() != nil {
		return
	}
	pushed := false
	defer func() {
		if pushed && q.NeedsInterrupt() {
			irq.SignalUsed(ReceiveQueue)
		}
	}()
	for {
		if len(d.pending) == 0 {
			select {
			case d.pending = <-d.input:
			default:
				return
			}
		}
		ok, err := q.Pop(c)
		if err != nil {
			irq.NeedsReset(&virtio.QueueError{Device: virtio.DeviceConsole, Queue: ReceiveQueue, Err: err})
			return
		}
		if !ok {
			more, err := q.EnableNotification()
			if err != nil || !more {
				return // the driver's next notification kicks us
			}
			continue
		}
		w := c.Writer()
		n, _ := w.Write(d.pending)
		d.pending = d.pending[n:]
		if err := q.Push(c.Head, uint32(n)); err != nil {
			irq.NeedsReset(&virtio.QueueError{Device: virtio.DeviceConsole, Queue: ReceiveQueue, Err: err})
			return
		}
		pushed = true
	}
}

const stateVersion = 1

type state struct {
	Cols    uint16 `json:"cols"`
	Rows    uint16 `json:"rows"`
	Pending []byte `json:"pending"`
}

// SaveState implements virtio.Device: it saves the window size and input
// taken from the reader but not yet delivered. Pause the device first.
func (d *Device) SaveState() ([]byte, error) {
	return virtio.EncodeState("virtio-console", stateVersion, state{Cols: d.cols, Rows: d.rows, Pending: d.pending})
}

// RestoreState implements virtio.Device.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := virtio.DecodeState(b, "virtio-console", stateVersion, &s); err != nil {
		return err
	}
	d.cols, d.rows, d.pending = s.Cols, s.Rows, s.Pending
	return nil
}
