package pci_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/pci"
	"github.com/kvmkit/kvmkit/virtio/rng"
)

const barBase = 0xe0000000

type msiLog struct {
	mu   sync.Mutex
	msgs [][2]uint64
}

func (m *msiLog) SendMSI(addr uint64, data uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.msgs = append(m.msgs, [2]uint64{addr, uint64(data)})
	return nil
}

func (m *msiLog) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.msgs)
}

type env struct {
	t     *testing.T
	pio   *kvm.Bus
	mmio  *kvm.Bus
	mem   *kvm.Memory
	tr    *pci.Transport
	msi   *msiLog
	slot  int
	alloc uint64
}

func newEnv(t *testing.T) *env {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	e := &env{t: t, pio: kvm.NewBus(), mmio: kvm.NewBus(), mem: mem, msi: &msiLog{}, alloc: 0x1000}
	hb := pci.NewHostBridge()
	require.NoError(t, e.pio.Register(pci.ConfigPortBase, pci.ConfigPortSize, hb))
	src := bytes.Repeat([]byte{0x5a}, 4096)
	e.tr, err = pci.New(rng.New(rng.Options{Source: bytes.NewReader(src)}), mem, pci.Options{Bus: e.mmio, BARAddr: barBase, MSI: e.msi})
	require.NoError(t, err)
	e.slot, err = hb.Add(e.tr)
	require.NoError(t, err)
	t.Cleanup(func() { e.w8(barBase+pci.CommonOffset+0x14, 0); mem.Close() })
	return e
}

func (e *env) cfgRead(slot int, off uint32, n int) uint32 {
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x80000000|uint32(slot)<<11|off&0xfc)
	e.pio.Write(pci.ConfigPortBase, a[:])
	b := make([]byte, n)
	e.pio.Read(pci.ConfigPortBase+4+uint64(off&3), b)
	var v [4]byte
	copy(v[:], b)
	return binary.LittleEndian.Uint32(v[:])
}

func (e *env) cfgWrite(slot int, off uint32, n int, v uint32) {
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x80000000|uint32(slot)<<11|off&0xfc)
	e.pio.Write(pci.ConfigPortBase, a[:])
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	e.pio.Write(pci.ConfigPortBase+4+uint64(off&3), b[:n])
}

func (e *env) r(addr uint64, n int) uint64 {
	b := make([]byte, 8)
	e.mmio.Read(addr, b[:n])
	return binary.LittleEndian.Uint64(b)
}

func (e *env) w(addr uint64, n int, v uint64) {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	e.mmio.Write(addr, b[:n])
}

func (e *env) w8(addr uint64, v uint64) { e.w(addr, 1, v) }

func TestHostBridgeProbe(t *testing.T) {
	e := newEnv(t)
	// Linux's type-1 probe: CONFIG_ADDRESS reads back what was written.
	var a [4]byte
	binary.LittleEndian.PutUint32(a[:], 0x80000000)
	e.pio.Write(pci.ConfigPortBase, a[:])
	e.pio.Read(pci.ConfigPortBase, a[:])
	assert.EqualValues(t, 0x80000000, binary.LittleEndian.Uint32(a[:]))

	assert.EqualValues(t, 0x0600, e.cfgRead(0, 0x0a, 2), "slot 0 is a host bridge")
	assert.Equal(t, 1, e.slot)
	assert.EqualValues(t, pci.VendorID, e.cfgRead(1, 0, 2))
	assert.EqualValues(t, 0x1040+uint32(virtio.DeviceEntropy), e.cfgRead(1, 2, 2))
	assert.EqualValues(t, 0xffff, e.cfgRead(5, 0, 2), "empty slot reads all ones")
	assert.EqualValues(t, 1, e.cfgRead(1, 8, 1), "modern revision")
}

func TestCapabilitiesAndBARSizing(t *testing.T) {
	e := newEnv(t)
	types := map[uint32]uint32{}
	ptr := e.cfgRead(1, 0x34, 1)
	for n := 0; ptr != 0 && n < 16; n++ {
		id := e.cfgRead(1, ptr, 1)
		if id == 0x09 {
			types[e.cfgRead(1, ptr+3, 1)] = e.cfgRead(1, ptr+8, 4)
		}
		if id == 0x11 {
			types[0x11] = e.cfgRead(1, ptr+2, 2) & 0x7ff
		}
		ptr = e.cfgRead(1, ptr+1, 1)
	}
	assert.Equal(t, map[uint32]uint32{1: pci.CommonOffset, 2: pci.NotifyOffset, 3: pci.ISROffset, 4: pci.DeviceOffset, 0x11: 1}, types)

	// BAR sizing with decoding off, then move the BAR.
	e.cfgWrite(1, 4, 2, 0)
	e.cfgWrite(1, 0x10, 4, 0xffffffff)
	e.cfgWrite(1, 0x14, 4, 0xffffffff)
	lo, hi := e.cfgRead(1, 0x10, 4), e.cfgRead(1, 0x14, 4)
	size := ^(uint64(hi)<<32 | uint64(lo&^0xf)) + 1
	assert.EqualValues(t, pci.BARSize, size)
	assert.EqualValues(t, 0x4, lo&0xf, "64-bit memory BAR")
	e.cfgWrite(1, 0x10, 4, 0xd0000000)
	e.cfgWrite(1, 0x14, 4, 0)
	e.cfgWrite(1, 4, 2, 0x6)
	_, _, ok := e.mmio.Lookup(0xd0000000 + pci.CommonOffset)
	assert.True(t, ok, "BAR registered at its new address")
	_, _, ok = e.mmio.Lookup(barBase)
	assert.False(t, ok, "and not at the old one")
}

func TestRNGOverPCIWithMSIX(t *testing.T) {
	e := newEnv(t)
	common := uint64(barBase + pci.CommonOffset)
	// Enable MSI-X and program vector 0 and 1.
	e.cfgWrite(1, 0x84+2, 2, 0x8000)
	for v := uint64(0); v < 2; v++ {
		ent := uint64(barBase+pci.MSIXTableOff) + 16*v
		e.w(ent, 8, 0xfee00000)
		e.w(ent+8, 4, 0x40+v)
		e.w(ent+12, 4, 0) // unmask
	}
	e.w8(common+0x14, uint64(virtio.StatusAcknowledge|virtio.StatusDriver))
	e.w(common+0x08, 4, 1)
	e.w(common+0x0c, 4, 1) // VERSION_1
	e.w8(common+0x14, uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	require.NotZero(t, e.r(common+0x14, 1)&uint64(virtio.StatusFeaturesOK))
	assert.EqualValues(t, 1, e.r(common+0x12, 2), "num_queues")

	d := vtest.NewDriver(nil, e.mem, 0x1000)
	rq := d.NewRawQueue(8)
	e.w(common+0x16, 2, 0)
	e.w(common+0x18, 2, 8)
	e.w(common+0x1a, 2, 1)
	assert.EqualValues(t, 1, e.r(common+0x1a, 2))
	e.w(common+0x20, 8, rq.Desc)
	e.w(common+0x28, 4, rq.Avail)
	e.w(common+0x2c, 4, 0)
	e.w(common+0x30, 8, rq.Used)
	e.w(common+0x1c, 2, 1)
	e.w(common+0x10, 2, 0) // config vector 0
	e.w8(common+0x14, uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	require.Zero(t, e.r(common+0x14, 1)&uint64(virtio.StatusDeviceNeedsReset), "err: %v", e.tr.Err())

	buf := d.Alloc(16, 8)
	rq.Post(vtest.Buf{Addr: buf, Len: 16, Write: true})
	notifyOff := e.r(common+0x1e, 2)
	e.w(barBase+pci.NotifyOffset+notifyOff*pci.NotifyMultiplier, 2, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, err := rq.WaitUsed(ctx)
	require.NoError(t, err)
	assert.EqualValues(t, 16, u.Len)
	require.Eventually(t, func() bool { return e.msi.count() == 1 }, time.Second, time.Millisecond)
	e.msi.mu.Lock()
	assert.Equal(t, [2]uint64{0xfee00000, 0x41}, e.msi.msgs[0], "queue 0 uses vector 1")
	e.msi.mu.Unlock()

	// Masked vector: the interrupt becomes pending and fires on unmask.
	e.w(barBase+pci.MSIXTableOff+16+12, 4, 1)
	rq.Post(vtest.Buf{Addr: buf, Len: 16, Write: true})
	e.w(barBase+pci.NotifyOffset, 2, 0)
	_, err = rq.WaitUsed(ctx)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return e.r(barBase+pci.MSIXPBAOffset, 8)&2 != 0 }, time.Second, time.Millisecond)
	assert.Equal(t, 1, e.msi.count())
	e.w(barBase+pci.MSIXTableOff+16+12, 4, 0)
	assert.Equal(t, 2, e.msi.count())
	assert.Zero(t, e.r(barBase+pci.MSIXPBAOffset, 8)&2)
}

func TestHostileRingNeedsResetOverPCI(t *testing.T) {
	e := newEnv(t)
	common := uint64(barBase + pci.CommonOffset)
	e.w8(common+0x14, 3)
	e.w(common+0x08, 4, 1)
	e.w(common+0x0c, 4, 1)
	e.w8(common+0x14, 0xb)
	e.w(common+0x16, 2, 0)
	e.w(common+0x18, 2, 8)
	e.w(common+0x20, 8, 0xfff00000) // not RAM
	e.w(common+0x1c, 2, 1)
	e.w8(common+0x14, 0xf)
	assert.NotZero(t, e.r(common+0x14, 1)&uint64(virtio.StatusDeviceNeedsReset))
	assert.ErrorIs(t, e.tr.Err(), virtio.ErrRingAddress)
	assert.EqualValues(t, 2, e.r(barBase+pci.ISROffset, 1), "INTx config-change bit while MSI-X is off")
	assert.Zero(t, e.r(barBase+pci.ISROffset, 1), "ISR clears on read")
	e.w8(common+0x14, 0)
	assert.NoError(t, e.tr.Err())
}
