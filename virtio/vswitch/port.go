package vswitch

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvmkit/kvmkit/virtio/netback"
)

var _ netback.Backend = (*Port)(nil)

// PortStats counts a port's traffic. Ingress is what the port's VM wrote,
// egress what it read.
type PortStats struct {
	IngressFrames, IngressBytes uint64
	EgressFrames, EgressBytes   uint64
	// Flooded counts ingress frames sent to every other port because their
	// destination was broadcast, multicast or unknown.
	Flooded uint64
	// DroppedLoss counts frames lost by this port's link loss setting.
	DroppedLoss uint64
	// DroppedOverflow counts frames dropped because this port's queue was
	// full or shaping would delay them beyond Options.MaxShapingDelay.
	DroppedOverflow uint64
	// DroppedInvalid counts malformed frames written by this port's VM.
	DroppedInvalid uint64
}

type portCounters struct {
	ingressFrames, ingressBytes atomic.Uint64
	egressFrames, egressBytes   atomic.Uint64
	flooded                     atomic.Uint64
	droppedLoss                 atomic.Uint64
	droppedOverflow             atomic.Uint64
	droppedInvalid              atomic.Uint64
}

type queued struct {
	at    time.Time
	frame []byte
}

// Port is one switch port; it is the netback.Backend for a VM's NIC.
type Port struct {
	sw     *Switch
	name   string
	stats  portCounters
	closed atomic.Bool
	notify chan struct{}
	done   chan struct{}

	mu     sync.Mutex
	link   LinkOptions
	queue  []queued
	txBusy time.Time // end of the last ingress transmission (shaping)
	rxBusy time.Time // end of the last egress transmission (shaping)
}

// Name returns the port's name.
func (p *Port) Name() string { return p.name }

// Stats returns a snapshot of the port's counters.
func (p *Port) Stats() PortStats {
	c := &p.stats
	return PortStats{
		IngressFrames:   c.ingressFrames.Load(),
		IngressBytes:    c.ingressBytes.Load(),
		EgressFrames:    c.egressFrames.Load(),
		EgressBytes:     c.egressBytes.Load(),
		Flooded:         c.flooded.Load(),
		DroppedLoss:     c.droppedLoss.Load(),
		DroppedOverflow: c.droppedOverflow.Load(),
		DroppedInvalid:  c.droppedInvalid.Load(),
	}
}

// Link returns the port's current link options.
func (p *Port) Link() LinkOptions {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.link
}

// SetLink changes the port's link options; frames already queued keep their
// delivery times.
func (p *Port) SetLink(link LinkOptions) error {
	if err := link.validate(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.link = link
	return nil
}

func (p *Port) queueLen() int {
	if p.link.QueueLen > 0 {
		return p.link.QueueLen
	}
	return p.sw.opts.QueueLen
}

// shape schedules a transmission of n bytes starting no earlier than start on
// a link whose previous transmission ends at *busy. It returns when the last
// byte has left, or ok=false when that is too far in the future.
func (p *Port) shape(busy *time.Time, start, now time.Time, n int) (time.Time, bool) {
	if busy.After(start) {
		start = *busy
	}
	end := start
	if bw := p.link.Bandwidth; bw > 0 {
		end = start.Add(time.Duration(float64(n) / float64(bw) * float64(time.Second)))
		if end.Sub(now) > p.sw.opts.MaxShapingDelay {
			return time.Time{}, false
		}
	}
	*busy = end
	return end, true
}

// WriteFrame sends one Ethernet frame from the port's VM into the switch. It
// never blocks on other ports: frames that cannot be queued are dropped and
// counted. Malformed frames are refused with a *netback.FrameError.
func (p *Port) WriteFrame(frame []byte) error {
	if p.closed.Load() {
		return netback.ErrClosed
	}
	p.stats.ingressFrames.Add(1)
	p.stats.ingressBytes.Add(uint64(len(frame)))
	if len(frame) < netback.EthernetHeaderLen || len(frame) > netback.MaxFrameLen {
		p.stats.droppedInvalid.Add(1)
		return &netback.FrameError{Len: len(frame), Reason: fmt.Sprintf("length outside [%d,%d]", netback.EthernetHeaderLen, netback.MaxFrameLen)}
	}
	var src mac
	copy(src[:], frame[6:12])
	if src.multicast() {
		p.stats.droppedInvalid.Add(1)
		return &netback.FrameError{Len: len(frame), Reason: fmt.Sprintf("multicast source MAC %x", src[:])}
	}
	now := p.sw.opts.Clock.Now()
	p.mu.Lock()
	loss := p.link.Loss
	p.mu.Unlock()
	if p.sw.lose(loss) {
		p.stats.droppedLoss.Add(1)
		return nil
	}
	p.mu.Lock()
	sent, ok := p.shape(&p.txBusy, now, now, len(frame))
	arrival := sent.Add(p.link.Latency)
	p.mu.Unlock()
	if !ok {
		p.stats.droppedOverflow.Add(1)
		return nil
	}
	// One private copy shared read-only by every destination queue.
	f := append([]byte(nil), frame...)
	p.sw.learn(src, p, now)
	p.sw.forward(p, f, arrival, now)
	return nil
}

// deliver queues frame toward this port's VM.
func (p *Port) deliver(frame []byte, arrival, now time.Time) {
	if p.closed.Load() {
		return
	}
	p.mu.Lock()
	loss := p.link.Loss
	p.mu.Unlock()
	if p.sw.lose(loss) {
		p.stats.droppedLoss.Add(1)
		return
	}
	p.mu.Lock()
	if len(p.queue) >= p.queueLen() {
		p.mu.Unlock()
		p.stats.droppedOverflow.Add(1)
		return
	}
	// rxBusy never decreases and latency is the same for every frame, so the
	// queue stays sorted by delivery time.
	sent, ok := p.shape(&p.rxBusy, arrival, now, len(frame))
	if !ok {
		p.mu.Unlock()
		p.stats.droppedOverflow.Add(1)
		return
	}
	p.queue = append(p.queue, queued{at: sent.Add(p.link.Latency), frame: frame})
	p.mu.Unlock()
	select {
	case p.notify <- struct{}{}:
	default:
	}
}

// ReadFrame blocks until a frame for the port's VM is due or ctx ends. A frame
// that is already due is returned even if ctx has ended.
func (p *Port) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	clock := p.sw.opts.Clock
	for {
		if p.closed.Load() {
			return 0, netback.ErrClosed
		}
		var timer <-chan time.Time
		p.mu.Lock()
		if len(p.queue) > 0 {
			head := p.queue[0]
			now := clock.Now()
			if !head.at.After(now) {
				p.queue[0] = queued{}
				p.queue = p.queue[1:]
				p.mu.Unlock()
				p.stats.egressFrames.Add(1)
				p.stats.egressBytes.Add(uint64(len(head.frame)))
				n := copy(buf, head.frame)
				if n < len(head.frame) {
					return n, fmt.Errorf("%w: frame of %d bytes, buffer of %d", netback.ErrTruncated, len(head.frame), len(buf))
				}
				return n, nil
			}
			timer = clock.After(head.at.Sub(now))
		}
		p.mu.Unlock()
		select {
		case <-p.notify:
		case <-timer:
		case <-p.done:
			return 0, netback.ErrClosed
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// Close detaches the port from the switch and wakes blocked readers.
func (p *Port) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	close(p.done)
	p.sw.remove(p)
	p.mu.Lock()
	p.queue = nil
	p.mu.Unlock()
	return nil
}
