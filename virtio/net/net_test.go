package net_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	vnet "github.com/kvmkit/kvmkit/virtio/net"
)

// chanBackend is an in-memory back end.
type chanBackend struct {
	toGuest chan []byte
	mu      sync.Mutex
	sent    [][]byte
}

func newBackend() *chanBackend { return &chanBackend{toGuest: make(chan []byte, 16)} }

func (b *chanBackend) WriteFrame(f []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sent = append(b.sent, bytes.Clone(f))
	return nil
}

func (b *chanBackend) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	select {
	case f := <-b.toGuest:
		return copy(buf, f), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (b *chanBackend) Close() error { return nil }

func (b *chanBackend) frames() [][]byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([][]byte(nil), b.sent...)
}

type rig struct {
	t            *testing.T
	dev          *vnet.Device
	be           *chanBackend
	tr           *mmio.Transport
	d            *vtest.Driver
	rx, tx, ctrl *vtest.Queue
	mem          *kvm.Memory
}

var mac = []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}

func newRig(t *testing.T, opts vnet.Options, want uint64) *rig {
	t.Helper()
	be := newBackend()
	opts.MAC = mac
	opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	dev, err := vnet.New(be, opts)
	require.NoError(t, err)
	mem, err := kvm.SingleRegion(4<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	tr := mmio.New(dev, mem, nil, mmio.Options{Logger: opts.Logger})
	d := vtest.NewDriver(tr, mem, 0x1000)
	require.NoError(t, d.Init(want))
	r := &rig{t: t, dev: dev, be: be, tr: tr, d: d, mem: mem}
	r.rx, err = d.SetupQueue(vnet.RxQueue, 32)
	require.NoError(t, err)
	r.tx, err = d.SetupQueue(vnet.TxQueue, 32)
	require.NoError(t, err)
	r.ctrl, err = d.SetupQueue(vnet.CtrlQueue, 16)
	require.NoError(t, err)
	d.DriverOK()
	require.False(t, d.NeedsReset())
	t.Cleanup(func() { d.Write32(mmio.RegStatus, 0); mem.Close() })
	return r
}

func (r *rig) wait(q *vtest.Queue) vtest.Used {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, err := q.WaitUsed(ctx)
	require.NoError(r.t, err)
	return u
}

func frame(n int, b byte) []byte {
	f := bytes.Repeat([]byte{b}, n)
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return f
}

const all = ^uint64(0)

func TestConfig(t *testing.T) {
	r := newRig(t, vnet.Options{MTU: 1400}, all)
	assert.Equal(t, mac, r.d.ReadConfig(0, 6))
	assert.Equal(t, vnet.StatusLinkUp, binary.LittleEndian.Uint16(r.d.ReadConfig(6, 2)))
	assert.EqualValues(t, 1400, binary.LittleEndian.Uint16(r.d.ReadConfig(10, 2)))
	assert.NotZero(t, r.d.Features&vnet.FeatureGuestAnnounce)
	assert.Zero(t, r.d.Features&vnet.FeatureMrgRxBuf, "not offered unless asked")
	r.dev.SetLinkUp(false)
	assert.Zero(t, binary.LittleEndian.Uint16(r.d.ReadConfig(6, 2)))
	assert.NotZero(t, r.d.AckInterrupts()&mmio.InterruptConfigChange)
}

func TestTransmit(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	f := frame(60, 0xab)
	hdr := r.d.Alloc(vnet.HeaderSize, 8)
	a, b := r.d.Alloc(20, 8), r.d.Alloc(40, 8)
	r.mem.WriteAt(f[:20], int64(a))
	r.mem.WriteAt(f[20:], int64(b))
	r.tx.Post(vtest.Buf{Addr: hdr, Len: vnet.HeaderSize}, vtest.Buf{Addr: a, Len: 20}, vtest.Buf{Addr: b, Len: 40})
	r.tx.Kick()
	u := r.wait(r.tx)
	assert.Zero(t, u.Len)
	require.Len(t, r.be.frames(), 1)
	assert.Equal(t, f, r.be.frames()[0])

	// A runt is dropped, not sent, and the device keeps going.
	r.tx.Post(vtest.Buf{Addr: hdr, Len: vnet.HeaderSize}, vtest.Buf{Addr: a, Len: 4})
	r.tx.Kick()
	r.wait(r.tx)
	assert.Len(t, r.be.frames(), 1)
	assert.EqualValues(t, 1, r.dev.Stats().TxDropped)
	assert.False(t, r.d.NeedsReset())
}

func TestReceive(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	f := frame(100, 0xcd)
	r.be.toGuest <- f // arrives before any buffer: must wait, not be lost
	time.Sleep(10 * time.Millisecond)
	buf := r.d.Alloc(1526, 8)
	r.rx.Post(vtest.Buf{Addr: buf, Len: 1526, Write: true})
	r.rx.Kick()
	u := r.wait(r.rx)
	assert.EqualValues(t, vnet.HeaderSize+100, u.Len)
	got := make([]byte, u.Len)
	r.mem.ReadAt(got, int64(buf))
	assert.EqualValues(t, 1, binary.LittleEndian.Uint16(got[10:12]), "num_buffers")
	assert.Equal(t, f, got[vnet.HeaderSize:])
	assert.EqualValues(t, 1, r.dev.Stats().RxFrames)
}

func TestReceiveTooSmallBuffer(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	buf := r.d.Alloc(64, 8)
	r.rx.Post(vtest.Buf{Addr: buf, Len: 64, Write: true})
	r.rx.Kick()
	r.be.toGuest <- frame(200, 1)
	u := r.wait(r.rx)
	assert.Zero(t, u.Len)
	assert.EqualValues(t, 1, r.dev.Stats().RxDropped)
}

func TestReceiveMergeable(t *testing.T) {
	r := newRig(t, vnet.Options{MergeableRxBuffers: true}, all)
	require.NotZero(t, r.d.Features&vnet.FeatureMrgRxBuf)
	f := frame(250, 0x11)
	bufs := make([]uint64, 3)
	for i := range bufs {
		bufs[i] = r.d.Alloc(100, 8)
	}
	// Two buffers first: not enough for 262 bytes, so nothing is used.
	r.rx.Post(vtest.Buf{Addr: bufs[0], Len: 100, Write: true})
	r.rx.Post(vtest.Buf{Addr: bufs[1], Len: 100, Write: true})
	r.rx.Kick()
	r.be.toGuest <- f
	time.Sleep(20 * time.Millisecond)
	_, ok := r.rx.PollUsed()
	require.False(t, ok, "frame must not be split over too few buffers")
	r.rx.Post(vtest.Buf{Addr: bufs[2], Len: 100, Write: true})
	r.rx.Kick()
	var got []byte
	lens := []uint32{}
	for range 3 {
		u := r.wait(r.rx)
		lens = append(lens, u.Len)
		b := make([]byte, u.Len)
		r.mem.ReadAt(b, int64(bufs[u.ID]))
		got = append(got, b...)
	}
	assert.Equal(t, []uint32{100, 100, 62}, lens)
	assert.EqualValues(t, 3, binary.LittleEndian.Uint16(got[10:12]))
	assert.Equal(t, f, got[vnet.HeaderSize:])
}

func (r *rig) ctrlCmd(cmd []byte) (byte, vtest.Used) {
	c := r.d.Alloc(uint64(len(cmd)), 8)
	r.mem.WriteAt(cmd, int64(c))
	ack := r.d.Alloc(1, 1)
	r.mem.WriteAt([]byte{0xee}, int64(ack))
	r.ctrl.Post(vtest.Buf{Addr: c, Len: uint32(len(cmd))}, vtest.Buf{Addr: ack, Len: 1, Write: true})
	r.ctrl.Kick()
	u := r.wait(r.ctrl)
	var b [1]byte
	r.mem.ReadAt(b[:], int64(ack))
	return b[0], u
}

func TestAnnounce(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	r.d.AckInterrupts()
	require.True(t, r.dev.Announce())
	assert.Equal(t, vnet.StatusLinkUp|vnet.StatusAnnounce, binary.LittleEndian.Uint16(r.d.ReadConfig(6, 2)))
	assert.NotZero(t, r.d.AckInterrupts()&mmio.InterruptConfigChange)
	ack, u := r.ctrlCmd([]byte{vnet.CtrlClassAnnounce, vnet.CtrlAnnounceAck})
	assert.EqualValues(t, vnet.CtrlOK, ack)
	assert.EqualValues(t, 1, u.Len)
	assert.Equal(t, vnet.StatusLinkUp, binary.LittleEndian.Uint16(r.d.ReadConfig(6, 2)))

	ack, _ = r.ctrlCmd([]byte{9, 9})
	assert.EqualValues(t, vnet.CtrlErr, ack)
	newMAC := []byte{2, 0, 0, 0, 0, 7}
	ack, _ = r.ctrlCmd(append([]byte{vnet.CtrlClassMAC, vnet.CtrlMACAddrSet}, newMAC...))
	assert.EqualValues(t, vnet.CtrlOK, ack)
	assert.Equal(t, newMAC, r.d.ReadConfig(0, 6))
}

func TestAnnounceNeedsFeature(t *testing.T) {
	r := newRig(t, vnet.Options{}, virtio.FeatureVersion1|vnet.FeatureMAC)
	assert.False(t, r.dev.Announce())
}

func TestMalformedControlNeedsReset(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	c := r.d.Alloc(2, 8)
	r.ctrl.Post(vtest.Buf{Addr: c, Len: 2}) // no ack byte
	r.ctrl.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, r.d.WaitNeedsReset(ctx))
	var re *virtio.RequestError
	assert.True(t, errors.As(r.tr.Err(), &re))
}

func TestStateRoundTrip(t *testing.T) {
	r := newRig(t, vnet.Options{}, all)
	r.dev.Announce()
	r.tr.Pause()
	s, err := r.tr.SaveState()
	require.NoError(t, err)

	dev2, err := vnet.New(newBackend(), vnet.Options{})
	require.NoError(t, err)
	tr2 := mmio.New(dev2, r.mem, nil, mmio.Options{})
	tr2.Pause()
	require.NoError(t, tr2.RestoreState(s))
	assert.Equal(t, [6]byte(mac), dev2.MAC())
	s2, err := tr2.SaveState()
	require.NoError(t, err)
	assert.Equal(t, string(s), string(s2))
	tr2.Resume()
	assert.True(t, dev2.Announce(), "restored device is active with negotiated features")
	require.NoError(t, dev2.Close())
	r.tr.Resume()
}
