package vtest

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
)

// ChainBuilder makes well-formed descriptor chains with chosen contents in
// guest memory, for unit- and fuzz-testing device request handlers.
type ChainBuilder struct {
	mem  kvm.GuestMemory
	base uint64
}

// NewChainBuilder uses guest memory from base upward.
func NewChainBuilder(mem kvm.GuestMemory, base uint64) *ChainBuilder {
	return &ChainBuilder{mem: mem, base: base}
}

// Build returns a chain of device-readable buffers holding readable and
// device-writable buffers of the given lengths, popped from a fresh queue
// (which is returned too, so the caller can Push). Lengths are capped so
// the layout fits in memory; an error means it did not fit.
func (b *ChainBuilder) Build(readable [][]byte, writable []int) (*virtio.Chain, *virtio.Queue, error) {
	const size = 64
	d := NewDriver(nil, b.mem, b.base)
	rq := d.NewRawQueue(size)
	var bufs []Buf
	for _, r := range readable {
		a := d.Alloc(uint64(len(r)), 1)
		if _, err := b.mem.WriteAt(r, int64(a)); err != nil {
			return nil, nil, err
		}
		bufs = append(bufs, Buf{Addr: a, Len: uint32(len(r))})
	}
	for _, n := range writable {
		bufs = append(bufs, Buf{Addr: d.Alloc(uint64(n), 1), Len: uint32(n), Write: true})
	}
	if len(bufs) == 0 || len(bufs) > size {
		return nil, nil, fmt.Errorf("vtest: %d buffers, want 1..%d", len(bufs), size)
	}
	rq.Post(bufs...)
	q := virtio.NewQueue(size)
	q.SetDescAddr(rq.Desc)
	q.SetAvailAddr(rq.Avail)
	q.SetUsedAddr(rq.Used)
	q.SetReady(true)
	if err := q.Activate(b.mem, virtio.TransportFeatures); err != nil {
		return nil, nil, err
	}
	var c virtio.Chain
	ok, err := q.Pop(&c)
	if err != nil || !ok {
		return nil, nil, fmt.Errorf("vtest: pop built chain: ok=%v err=%v", ok, err)
	}
	return &c, q, nil
}

// SplitFuzz turns fuzzer bytes into up to max buffers: each buffer takes a
// length byte and then that many bytes of content.
func SplitFuzz(data []byte, max int) [][]byte {
	var out [][]byte
	for len(data) > 0 && len(out) < max {
		n := min(int(data[0]), len(data)-1)
		out = append(out, data[1:1+n])
		data = data[1+n:]
	}
	return out
}
