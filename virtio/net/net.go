// Package net is the virtio network device (virtio 1.2 section 5.1), device
// side only: it moves Ethernet frames between the guest's receive and
// transmit queues and a Backend (for example virtio/netback), with the MAC
// address and link status in config space, optional mergeable receive
// buffers, and VIRTIO_NET_F_GUEST_ANNOUNCE so a migrated guest can announce
// itself.
package net

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/kvmkit/kvmkit/virtio"
)

// Backend moves frames to and from the host network. virtio/netback's types
// satisfy it.
type Backend interface {
	// WriteFrame sends one Ethernet frame (no virtio header) from the guest.
	// The slice is only valid during the call.
	WriteFrame(frame []byte) error
	// ReadFrame blocks until a frame for the guest arrives or ctx ends;
	// copies it into buf; returns its length.
	ReadFrame(ctx context.Context, buf []byte) (int, error)
	// Close releases the back end.
	Close() error
}

// Limiter throttles traffic (virtio/ratelimit provides token buckets).
type Limiter interface {
	Wait(ctx context.Context, bytes int) error
}

// Queue indices and sizes.
const (
	RxQueue   = 0
	TxQueue   = 1
	CtrlQueue = 2
	QueueSize = 256
)

// Feature bits (virtio 1.2 section 5.1.3).
const (
	FeatureMTU           uint64 = 1 << 3
	FeatureMAC           uint64 = 1 << 5
	FeatureMrgRxBuf      uint64 = 1 << 15
	FeatureStatus        uint64 = 1 << 16
	FeatureCtrlVQ        uint64 = 1 << 17
	FeatureGuestAnnounce uint64 = 1 << 21
)

// Config status bits.
const (
	StatusLinkUp   uint16 = 1
	StatusAnnounce uint16 = 2
)

// Control queue classes, commands and acks.
const (
	CtrlClassMAC      = 1
	CtrlMACAddrSet    = 1
	CtrlClassAnnounce = 3
	CtrlAnnounceAck   = 0
	CtrlOK            = 0
	CtrlErr           = 1
)

// HeaderSize is the size of struct virtio_net_hdr with VIRTIO_F_VERSION_1.
const HeaderSize = 12

// MaxFrame is the largest Ethernet frame (without virtio header) moved in
// either direction; bigger ones are dropped.
const MaxFrame = 65535 + 14

// maxMergeBuffers caps the receive buffers one frame may use.
const maxMergeBuffers = 64

// Options configure a network device.
type Options struct {
	// MAC is the guest's address; nil picks a random locally administered one.
	MAC []byte
	// MTU, if non-zero, is offered with VIRTIO_NET_F_MTU.
	MTU uint16
	// MergeableRxBuffers offers VIRTIO_NET_F_MRG_RXBUF.
	MergeableRxBuffers bool
	// TxLimiter and RxLimiter, if set, throttle each direction by bytes.
	TxLimiter, RxLimiter Limiter
	// Logger receives back-end errors; default slog.Default().
	Logger *slog.Logger
}

// Stats counts device events.
type Stats struct {
	TxFrames, RxFrames, TxDropped, RxDropped uint64
}

// Device is a virtio-net device.
type Device struct {
	virtio.Runner

	be   Backend
	opts Options
	log  *slog.Logger

	mu       sync.Mutex // guards the fields below
	mac      [6]byte
	status   uint16
	features uint64 // negotiated; zero while inactive
	irq      virtio.Interrupt
	stopRx   context.CancelFunc
	rxDone   chan struct{}

	frames  chan []byte // received frames on their way to the rx worker
	free    chan []byte // recycled frame buffers
	pending []byte      // frame the rx worker could not place yet
	txBuf   []byte

	txFrames, rxFrames, txDropped, rxDropped atomic.Uint64
}

var _ virtio.Device = (*Device)(nil)

// New returns a network device sending and receiving through be.
func New(be Backend, opts Options) (*Device, error) {
	d := &Device{be: be, opts: opts, log: opts.Logger, status: StatusLinkUp,
		frames: make(chan []byte, 8), free: make(chan []byte, 8), txBuf: make([]byte, MaxFrame)}
	if d.log == nil {
		d.log = slog.Default()
	}
	switch len(opts.MAC) {
	case 0:
		if _, err := rand.Read(d.mac[:]); err != nil {
			return nil, fmt.Errorf("virtio-net: random MAC: %w", err)
		}
		d.mac[0] = d.mac[0]&^1 | 2 // unicast, locally administered
	case 6:
		copy(d.mac[:], opts.MAC)
	default:
		return nil, fmt.Errorf("virtio-net: MAC %x is not 6 bytes", opts.MAC)
	}
	return d, nil
}

// MAC returns the guest's current MAC address.
func (d *Device) MAC() [6]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mac
}

// Stats returns frame counters.
func (d *Device) Stats() Stats {
	return Stats{TxFrames: d.txFrames.Load(), RxFrames: d.rxFrames.Load(), TxDropped: d.txDropped.Load(), RxDropped: d.rxDropped.Load()}
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceNet }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	f := FeatureMAC | FeatureStatus | FeatureCtrlVQ | FeatureGuestAnnounce
	if d.opts.MergeableRxBuffers {
		f |= FeatureMrgRxBuf
	}
	if d.opts.MTU != 0 {
		f |= FeatureMTU
	}
	return f
}

// QueueMaxSizes implements virtio.Device: rx, tx and control queues.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize, 64} }

// ReadConfig implements virtio.Device: mac, status, max_virtqueue_pairs, mtu.
func (d *Device) ReadConfig(off uint64, data []byte) {
	var c [12]byte
	d.mu.Lock()
	copy(c[0:6], d.mac[:])
	binary.LittleEndian.PutUint16(c[6:], d.status)
	d.mu.Unlock()
	binary.LittleEndian.PutUint16(c[8:], 1)
	binary.LittleEndian.PutUint16(c[10:], d.opts.MTU)
	clear(data)
	if off < uint64(len(c)) {
		copy(data, c[off:])
	}
}

// WriteConfig implements virtio.Device. With VERSION_1 the MAC is changed
// through the control queue, so config writes are ignored.
func (d *Device) WriteConfig(off uint64, data []byte) {}

// SetLinkUp sets the link status bit and tells the driver.
func (d *Device) SetLinkUp(up bool) {
	d.mu.Lock()
	old := d.status
	if up {
		d.status |= StatusLinkUp
	} else {
		d.status &^= StatusLinkUp
	}
	irq := d.irq
	changed := old != d.status
	d.mu.Unlock()
	if changed && irq != nil {
		irq.SignalConfig()
	}
}

// Announce asks the guest to announce its presence (gratuitous ARP and
// unsolicited neighbour advertisements), as after live migration. It
// returns false if the driver did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE
// or the device is not running.
func (d *Device) Announce() bool {
	d.mu.Lock()
	irq := d.irq
	ok := irq != nil && d.features&FeatureGuestAnnounce != 0 && d.features&FeatureCtrlVQ != 0
	if ok {
		d.status |= StatusAnnounce
	}
	d.mu.Unlock()
	if ok {
		irq.SignalConfig()
	}
	return ok
}

// Activate implements virtio.Device.
func (d *Device) Activate(a virtio.Activation) error {
	ws := make(virtio.Workers, 3)
	if q := a.Queues[TxQueue]; q != nil {
		var c virtio.Chain
		ws[TxQueue] = virtio.StartWorker(func(ctx context.Context) {
			virtio.ServeQueue(q, TxQueue, virtio.DeviceNet, a.Interrupt, &c, func(c *virtio.Chain) (uint32, error) {
				return d.transmit(ctx, c)
			})
		})
	}
	if q := a.Queues[CtrlQueue]; q != nil {
		var c virtio.Chain
		ws[CtrlQueue] = virtio.StartWorker(func(ctx context.Context) {
			virtio.ServeQueue(q, CtrlQueue, virtio.DeviceNet, a.Interrupt, &c, d.control)
		})
	}
	mrg := a.Features&FeatureMrgRxBuf != 0
	if q := a.Queues[RxQueue]; q != nil {
		chains := make([]virtio.Chain, maxMergeBuffers)
		ws[RxQueue] = virtio.StartWorker(func(ctx context.Context) {
			d.receive(q, a.Interrupt, chains, mrg)
		})
	}
	d.Start(ws)
	d.mu.Lock()
	d.features = a.Features
	d.irq = a.Interrupt
	if a.Queues[RxQueue] != nil {
		ctx, cancel := context.WithCancel(context.Background())
		d.stopRx, d.rxDone = cancel, make(chan struct{})
		go d.readFrames(ctx, d.rxDone)
	}
	d.mu.Unlock()
	return nil
}

// Reset implements virtio.Device.
func (d *Device) Reset() {
	d.mu.Lock()
	stop, done := d.stopRx, d.rxDone
	d.stopRx, d.rxDone, d.irq, d.features = nil, nil, nil, 0
	d.status &^= StatusAnnounce
	d.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
	d.Runner.Reset()
}

// readFrames pulls frames from the back end until ctx ends.
func (d *Device) readFrames(ctx context.Context, done chan struct{}) {
	defer close(done)
	for {
		var buf []byte
		select {
		case buf = <-d.free:
		default:
			buf = make([]byte, MaxFrame)
		}
		n, err := d.be.ReadFrame(ctx, buf)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			d.log.Warn("virtio-net: back end read failed; receive stopped", "err", err)
			return
		}
		if n > len(buf) || n < 14 {
			d.rxDropped.Add(1)
			continue
		}
		if lim := d.opts.RxLimiter; lim != nil {
			if lim.Wait(ctx, n) != nil {
				return
			}
		}
		select {
		case d.frames <- buf[:n]:
			d.QueueNotify(RxQueue)
		case <-ctx.Done():
			return
		}
	}
}

func (d *Device) recycle(b []byte) {
	select {
	case d.free <- b[:cap(b)]:
	default:
	}
}

// receive places pending frames into receive buffers until either runs out.
func (d *Device) receive(q *virtio.Queue, irq virtio.Interrupt, chains []virtio.Chain, mrg bool) {
	if q.Err() != nil {
		return
	}
	pushed := false
	defer func() {
		if pushed && q.NeedsInterrupt() {
			irq.SignalUsed(RxQueue)
		}
	}()
	for {
		if d.pending == nil {
			select {
			case d.pending = <-d.frames:
			default:
				return
			}
		}
		placed, err := d.place(q, chains, mrg, d.pending)
		if err != nil {
			irq.NeedsReset(&virtio.QueueError{Device: virtio.DeviceNet, Queue: RxQueue, Err: err})
			return
		}
		if !placed {
			more, err := q.EnableNotification()
			if err != nil || !more {
				return // the driver's next notification kicks us
			}
			continue
		}
		pushed = true
		d.recycle(d.pending)
		d.pending = nil
	}
}

// place writes header+frame into one chain (or several with MRG_RXBUF) and
// pushes them. It returns false without consuming anything when buffers are
// short.
func (d *Device) place(q *virtio.Queue, chains []virtio.Chain, mrg bool, frame []byte) (bool, error) {
	need := uint64(HeaderSize + len(frame))
	k, have := 0, uint64(0)
	for have < need {
		if k == len(chains) || (!mrg && k == 1) {
			break
		}
		ok, err := q.Pop(&chains[k])
		if err != nil {
			return false, err
		}
		if !ok {
			q.Rewind(uint16(k))
			return false, nil
		}
		have += chains[k].WritableLen()
		k++
	}
	if have < need {
		// The buffers the driver gave cannot hold this frame: drop it and
		// return the buffers unused.
		d.rxDropped.Add(1)
		for i := range k {
			if err := q.Push(chains[i].Head, 0); err != nil {
				return false, err
			}
		}
		return true, nil
	}
	var hdr [HeaderSize]byte
	if mrg {
		binary.LittleEndian.PutUint16(hdr[10:], uint16(k))
	} else {
		binary.LittleEndian.PutUint16(hdr[10:], 1)
	}
	rest := frame
	for i := range k {
		w := chains[i].Writer()
		if i == 0 {
			w.Write(hdr[:])
		}
		n, _ := w.Write(rest)
		rest = rest[n:]
		if err := q.Push(chains[i].Head, uint32(w.Written())); err != nil {
			return false, err
		}
	}
	d.rxFrames.Add(1)
	return true, nil
}

// transmit sends one frame from a transmit chain.
func (d *Device) transmit(ctx context.Context, c *virtio.Chain) (uint32, error) {
	n := c.ReadableLen()
	if n < HeaderSize+14 || n > HeaderSize+MaxFrame {
		d.txDropped.Add(1)
		return 0, nil
	}
	r := c.Reader()
	var hdr [HeaderSize]byte
	r.Read(hdr[:])
	if hdr[1] != 0 { // gso_type: no GSO features are offered
		d.txDropped.Add(1)
		return 0, nil
	}
	frame := d.txBuf[:n-HeaderSize]
	r.Read(frame)
	if lim := d.opts.TxLimiter; lim != nil {
		if err := lim.Wait(ctx, len(frame)); err != nil {
			d.txDropped.Add(1)
			return 0, nil
		}
	}
	if err := d.be.WriteFrame(frame); err != nil {
		d.txDropped.Add(1)
		return 0, nil
	}
	d.txFrames.Add(1)
	return 0, nil
}

// control handles one control queue command.
func (d *Device) control(c *virtio.Chain) (uint32, error) {
	if c.ReadableLen() < 2 || c.WritableLen() < 1 {
		return 0, &virtio.RequestError{Device: virtio.DeviceNet,
			Reason: fmt.Sprintf("control command with %d readable and %d writable bytes, need 2 and 1", c.ReadableLen(), c.WritableLen())}
	}
	r := c.Reader()
	var cmd [2]byte
	r.Read(cmd[:])
	ack := byte(CtrlErr)
	switch {
	case cmd[0] == CtrlClassAnnounce && cmd[1] == CtrlAnnounceAck:
		d.mu.Lock()
		d.status &^= StatusAnnounce
		d.mu.Unlock()
		ack = CtrlOK
	case cmd[0] == CtrlClassMAC && cmd[1] == CtrlMACAddrSet && c.ReadableLen() == 8:
		var mac [6]byte
		r.Read(mac[:])
		d.mu.Lock()
		d.mac = mac
		d.mu.Unlock()
		ack = CtrlOK
	}
	w := c.Writable()
	last := w[len(w)-1]
	for len(last.Buf) == 0 {
		w = w[:len(w)-1]
		last = w[len(w)-1]
	}
	last.Buf[len(last.Buf)-1] = ack
	return 1, nil
}

// Close resets the device and closes the back end.
func (d *Device) Close() error {
	d.Reset()
	return d.be.Close()
}

const stateVersion = 1

type state struct {
	MAC    [6]byte `json:"mac"`
	Status uint16  `json:"status"`
}

// SaveState implements virtio.Device: MAC address and status (a frame the
// device was about to deliver is not saved; networks tolerate loss).
func (d *Device) SaveState() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return virtio.EncodeState("virtio-net", stateVersion, state{MAC: d.mac, Status: d.status})
}

// RestoreState implements virtio.Device.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := virtio.DecodeState(b, "virtio-net", stateVersion, &s); err != nil {
		return err
	}
	d.mu.Lock()
	d.mac, d.status = s.MAC, s.Status
	d.mu.Unlock()
	return nil
}
