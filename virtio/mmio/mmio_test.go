package mmio_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	"github.com/kvmkit/kvmkit/virtio/rng"
)

// recordIRQ remembers the line level.
type recordIRQ struct {
	mu    sync.Mutex
	high  bool
	rises int
}

func (r *recordIRQ) SetLevel(high bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if high && !r.high {
		r.rises++
	}
	r.high = high
	return nil
}

func (r *recordIRQ) level() (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.high, r.rises
}

func newMem(t testing.TB) *kvm.Memory {
	t.Helper()
	m, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

func newRNG(t *testing.T, src []byte) (*mmio.Transport, *vtest.Driver, *recordIRQ, *kvm.Memory) {
	mem := newMem(t)
	irq := &recordIRQ{}
	tr := mmio.New(rng.New(rng.Options{Source: bytes.NewReader(src)}), mem, irq, mmio.Options{})
	t.Cleanup(func() { vtest.NewDriver(tr, mem, 0).Write32(mmio.RegStatus, 0) })
	return tr, vtest.NewDriver(tr, mem, 0x1000), irq, mem
}

func TestIdentityRegisters(t *testing.T) {
	tr, d, _, _ := newRNG(t, nil)
	assert.EqualValues(t, mmio.Magic, d.Read32(mmio.RegMagicValue))
	assert.EqualValues(t, 2, d.Read32(mmio.RegVersion))
	assert.EqualValues(t, virtio.DeviceEntropy, d.Read32(mmio.RegDeviceID))
	assert.EqualValues(t, mmio.DefaultVendorID, d.Read32(mmio.RegVendorID))
	assert.Equal(t, virtio.TransportFeatures, d.DeviceFeatures())
	d.Write32(mmio.RegQueueSel, 0)
	assert.EqualValues(t, rng.QueueSize, d.Read32(mmio.RegQueueNumMax))
	d.Write32(mmio.RegQueueSel, 1)
	assert.Zero(t, d.Read32(mmio.RegQueueNumMax), "nonexistent queue")
	assert.Equal(t, ^uint32(0), d.Read32(mmio.RegSHMLenLow))

	// Non-32-bit register accesses read as zero and are ignored.
	b := make([]byte, 2)
	tr.Read(mmio.RegMagicValue, b)
	assert.Equal(t, []byte{0, 0}, b)
	tr.Write(mmio.RegStatus, []byte{1, 0})
	assert.Zero(t, d.Status())
}

func TestFeatureNegotiation(t *testing.T) {
	_, d, _, _ := newRNG(t, nil)
	require.NoError(t, d.Init(virtio.FeatureVersion1|virtio.FeatureEventIdx))
	assert.Equal(t, virtio.FeatureVersion1|virtio.FeatureEventIdx, d.Features)

	// A legacy driver (no VERSION_1) is refused.
	assert.Error(t, d.Init(virtio.FeatureEventIdx))

	// Features the device did not offer are refused.
	d.Write32(mmio.RegStatus, 0)
	d.Write32(mmio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	d.Write32(mmio.RegDriverFeaturesSel, 1)
	d.Write32(mmio.RegDriverFeatures, 1|1<<7)
	d.Write32(mmio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)
	assert.Zero(t, d.Status()&virtio.StatusFeaturesOK)
}

func TestRNGEndToEnd(t *testing.T) {
	src := bytes.Repeat([]byte("0123456789abcdef"), 64)
	_, d, irq, mem := newRNG(t, src)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	q, err := d.SetupQueue(0, 16)
	require.NoError(t, err)
	d.DriverOK()
	require.False(t, d.NeedsReset())

	buf := d.Alloc(32, 8)
	head := q.Post(vtest.Buf{Addr: buf, Len: 32, Write: true})
	q.Kick()
	u, err := q.WaitUsed(ctx(t))
	require.NoError(t, err)
	assert.Equal(t, vtest.Used{ID: uint32(head), Len: 32}, u)
	got := make([]byte, 32)
	_, err = mem.ReadAt(got, int64(buf))
	require.NoError(t, err)
	assert.Equal(t, src[:32], got)

	require.Eventually(t, func() bool { h, _ := irq.level(); return h }, time.Second, time.Millisecond)
	assert.EqualValues(t, mmio.InterruptUsedBuffer, d.AckInterrupts()&mmio.InterruptUsedBuffer)
	high, _ := irq.level()
	assert.False(t, high, "line drops once all interrupt bits are acknowledged")
}

func TestHostileChainNeedsReset(t *testing.T) {
	tr, d, irq, _ := newRNG(t, make([]byte, 64))
	require.NoError(t, d.Init(virtio.TransportFeatures))
	q, err := d.SetupQueue(0, 8)
	require.NoError(t, err)
	d.DriverOK()
	d.WriteDesc(q.Desc, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext | virtio.DescFlagWrite, Next: 0})
	q.Publish(0)
	q.Kick()
	require.NoError(t, d.WaitNeedsReset(ctx(t)))

	var qe *virtio.QueueError
	require.True(t, errors.As(tr.Err(), &qe), "got %v", tr.Err())
	assert.Equal(t, 0, qe.Queue)
	assert.ErrorIs(t, tr.Err(), virtio.ErrChainTooLong)
	assert.EqualValues(t, mmio.InterruptConfigChange, d.Read32(mmio.RegInterruptStatus)&mmio.InterruptConfigChange)
	high, _ := irq.level()
	assert.True(t, high)
	assert.NotZero(t, d.Read32(mmio.RegConfigGeneration))

	// Further kicks are harmless; reset brings the device back.
	q.Kick()
	d.Write32(mmio.RegStatus, 0)
	assert.Zero(t, d.Status())
	assert.NoError(t, tr.Err())
	require.NoError(t, d.Init(virtio.TransportFeatures))
	q, err = d.SetupQueue(0, 8)
	require.NoError(t, err)
	d.DriverOK()
	buf := d.Alloc(8, 8)
	q.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
	q.Kick()
	_, err = q.WaitUsed(ctx(t))
	require.NoError(t, err)
}

func TestBadQueueConfigNeedsReset(t *testing.T) {
	tr, d, _, _ := newRNG(t, nil)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	d.Write32(mmio.RegQueueSel, 0)
	d.Write32(mmio.RegQueueNum, 8)
	d.Write32(mmio.RegQueueDescLow, 0xfff00000) // outside the 1 MiB of RAM
	d.Write32(mmio.RegQueueReady, 1)
	d.DriverOK()
	assert.True(t, d.NeedsReset())
	assert.ErrorIs(t, tr.Err(), virtio.ErrRingAddress)
}

func TestQueueRegistersLockedWhenReady(t *testing.T) {
	_, d, _, _ := newRNG(t, nil)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	q, err := d.SetupQueue(0, 8)
	require.NoError(t, err)
	d.Write32(mmio.RegQueueDescLow, 0x5000)
	d.Write32(mmio.RegQueueNum, 4)
	d.DriverOK()
	require.False(t, d.NeedsReset())
	buf := d.Alloc(8, 8)
	q.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
	q.Kick()
	_, err = q.WaitUsed(ctx(t))
	require.NoError(t, err, "writes to a ready queue's registers are ignored")
}

func TestSaveRestore(t *testing.T) {
	src := make([]byte, 1024)
	tr, d, _, mem := newRNG(t, src)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	q, err := d.SetupQueue(0, 8)
	require.NoError(t, err)
	d.DriverOK()
	buf := d.Alloc(8, 8)
	q.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
	q.Kick()
	_, err = q.WaitUsed(ctx(t))
	require.NoError(t, err)

	_, err = tr.SaveState()
	require.ErrorIs(t, err, mmio.ErrNotPaused)
	tr.Pause()
	// A buffer posted while paused is not processed...
	q.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
	q.Kick()
	st, err := tr.SaveState()
	require.NoError(t, err)
	_, ok := q.PollUsed()
	require.False(t, ok)

	// ...and the restored device picks it up.
	tr2 := mmio.New(rng.New(rng.Options{Source: bytes.NewReader(src)}), mem, kvm.NoIRQ{}, mmio.Options{})
	t.Cleanup(func() { tr2.Write(mmio.RegStatus, make([]byte, 4)) })
	require.NoError(t, tr2.RestoreState(st))
	u, err := q.WaitUsed(ctx(t))
	require.NoError(t, err)
	assert.EqualValues(t, 8, u.Len)

	tr2.Pause()
	st2, err := tr2.SaveState()
	require.NoError(t, err)
	tr3 := mmio.New(rng.New(rng.Options{}), mem, nil, mmio.Options{})
	tr3.Pause()
	require.NoError(t, tr3.RestoreState(st2))
	st3, err := tr3.SaveState()
	require.NoError(t, err)
	assert.Equal(t, string(st2), string(st3), "save-restore-save is exact")
	tr3.Write(mmio.RegStatus, make([]byte, 4))

	tr.Resume()
}

func TestRestoreRejects(t *testing.T) {
	tr, d, _, mem := newRNG(t, nil)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	st, err := tr.SaveState()
	require.NoError(t, err)

	fresh := func() *mmio.Transport { return mmio.New(rng.New(rng.Options{}), mem, nil, mmio.Options{}) }
	var se *virtio.StateError
	err = fresh().RestoreState(st[:len(st)/2])
	assert.ErrorIs(t, err, virtio.ErrStateCorrupt)
	assert.True(t, errors.As(err, &se))

	newer := bytes.Replace(st, []byte(`"version":1`), []byte(`"version":7`), 1)
	var ve *virtio.StateVersionError
	require.True(t, errors.As(fresh().RestoreState(newer), &ve))
	assert.EqualValues(t, 7, ve.Got)

	assert.ErrorIs(t, tr.RestoreState(st), mmio.ErrNotFresh)
}

func TestCmdlineArg(t *testing.T) {
	tests := []struct {
		base, size uint64
		irq        uint32
		want       string
	}{
		{0xd0000000, 0x1000, 5, "virtio_mmio.device=4K@0xd0000000:5"},
		{0xd0000000, 0x200, 12, "virtio_mmio.device=512@0xd0000000:12"},
		{0xfe000000, 1 << 20, 7, "virtio_mmio.device=1M@0xfe000000:7"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, mmio.CmdlineArg(tt.base, tt.size, tt.irq))
	}
}

func TestConfigSpaceAndNotifyOutOfRange(t *testing.T) {
	tr, d, _, _ := newRNG(t, nil)
	require.NoError(t, d.Init(virtio.TransportFeatures))
	_, err := d.SetupQueue(0, 8)
	require.NoError(t, err)
	d.DriverOK()
	tr.NotifyQueue(99) // no such queue: ignored
	tr.NotifyQueue(-1)
	b := make([]byte, 4)
	binary.LittleEndian.PutUint32(b, 0xffffffff)
	tr.Read(mmio.RegConfig, b)
	assert.Equal(t, []byte{0, 0, 0, 0}, b)
	assert.False(t, d.NeedsReset())
}
