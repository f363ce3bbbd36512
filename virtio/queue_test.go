package virtio_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

const memSize = 1 << 20

func newMem(t testing.TB) *kvm.Memory {
	t.Helper()
	m, err := kvm.SingleRegion(memSize, kvm.MemoryOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// setup returns a driver-side raw queue and the matching activated device
// queue.
func setup(t testing.TB, mem kvm.GuestMemory, size uint16, features uint64) (*vtest.Driver, *vtest.Queue, *virtio.Queue) {
	t.Helper()
	d := vtest.NewDriver(nil, mem, 0x1000)
	rq := d.NewRawQueue(size)
	q := virtio.NewQueue(size)
	q.SetDescAddr(rq.Desc)
	q.SetAvailAddr(rq.Avail)
	q.SetUsedAddr(rq.Used)
	q.SetReady(true)
	require.NoError(t, q.Activate(mem, features))
	return d, rq, q
}

func TestQueuePopPush(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 8, virtio.FeatureIndirectDesc)
	in := d.Alloc(64, 8)
	out := d.Alloc(128, 8)
	_, err := mem.WriteAt([]byte("hello"), int64(in))
	require.NoError(t, err)
	head := rq.Post(vtest.Buf{Addr: in, Len: 5}, vtest.Buf{Addr: out, Len: 128, Write: true})

	var c virtio.Chain
	ok, err := q.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, head, c.Head)
	require.Len(t, c.Readable(), 1)
	require.Len(t, c.Writable(), 1)
	assert.Equal(t, []byte("hello"), c.Readable()[0].Buf)
	assert.EqualValues(t, 5, c.ReadableLen())
	assert.EqualValues(t, 128, c.WritableLen())

	w := c.Writer()
	_, err = w.Write([]byte("world"))
	require.NoError(t, err)
	require.NoError(t, q.Push(c.Head, uint32(w.Written())))

	ok, err = q.Pop(&c)
	require.NoError(t, err)
	assert.False(t, ok, "queue drained")

	u, ok := rq.PollUsed()
	require.True(t, ok)
	assert.Equal(t, vtest.Used{ID: uint32(head), Len: 5}, u)
	got := make([]byte, 5)
	_, err = mem.ReadAt(got, int64(out))
	require.NoError(t, err)
	assert.Equal(t, "world", string(got))
}

func TestQueueIndirect(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 4, virtio.FeatureIndirectDesc)
	a, b, c0 := d.Alloc(16, 8), d.Alloc(32, 8), d.Alloc(8, 8)
	head := rq.PostIndirect(vtest.Buf{Addr: a, Len: 16}, vtest.Buf{Addr: b, Len: 32}, vtest.Buf{Addr: c0, Len: 8, Write: true})
	var c virtio.Chain
	ok, err := q.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, head, c.Head)
	assert.Len(t, c.Readable(), 2)
	assert.EqualValues(t, 48, c.ReadableLen())
	assert.EqualValues(t, 8, c.WritableLen())
}

// TestQueueIndirectUnaligned: Linux's indirect tables come from kmalloc and
// are only 8-byte aligned.
func TestQueueIndirectUnaligned(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 4, virtio.FeatureIndirectDesc)
	d.Alloc(8, 16)
	table := d.Alloc(48, 8)
	require.EqualValues(t, 8, table%16)
	a, b := d.Alloc(16, 8), d.Alloc(512, 8)
	d.WriteDesc(table, 0, vtest.Desc{Addr: a, Len: 16, Flags: virtio.DescFlagNext, Next: 1})
	d.WriteDesc(table, 1, vtest.Desc{Addr: b, Len: 512, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 2})
	d.WriteDesc(table, 2, vtest.Desc{Addr: b, Len: 1, Flags: virtio.DescFlagWrite})
	d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: table, Len: 48, Flags: virtio.DescFlagIndirect})
	rq.Publish(0)
	var c virtio.Chain
	ok, err := q.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.EqualValues(t, 16, c.ReadableLen())
	assert.EqualValues(t, 513, c.WritableLen())
}

func TestQueueWrapsAround(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 2, 0)
	buf := d.Alloc(8, 8)
	var c virtio.Chain
	for i := range 70000 { // past the 16-bit index wrap
		head := rq.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
		ok, err := q.Pop(&c)
		require.NoError(t, err, "iteration %d", i)
		require.True(t, ok)
		require.Equal(t, head, c.Head)
		require.NoError(t, q.Push(c.Head, 1))
		_, ok = rq.PollUsed()
		require.True(t, ok)
	}
}

// TestQueueHostile checks that every malformed chain yields a typed error
// naming the problem, and that the queue then stays broken.
func TestQueueHostile(t *testing.T) {
	const size = 8
	tests := []struct {
		name     string
		features uint64
		build    func(d *vtest.Driver, rq *vtest.Queue)
		want     error
	}{
		{"head out of range", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			rq.Publish(size + 3)
		}, virtio.ErrDescIndex},
		{"next out of range", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 200})
			rq.Publish(0)
		}, virtio.ErrDescIndex},
		{"descriptor loop", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 1})
			d.WriteDesc(rq.Desc, 1, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 0})
			rq.Publish(0)
		}, virtio.ErrChainTooLong},
		{"self loop", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 3, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 3})
			rq.Publish(3)
		}, virtio.ErrChainTooLong},
		{"chain longer than queue size", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			for i := uint16(0); i < size; i++ {
				d.WriteDesc(rq.Desc, i, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: (i + 1) % size})
			}
			rq.Publish(0)
		}, virtio.ErrChainTooLong},
		{"address out of RAM", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: memSize + 0x1000, Len: 8})
			rq.Publish(0)
		}, virtio.ErrDescAddress},
		{"address wraps", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: ^uint64(0) - 4, Len: 8})
			rq.Publish(0)
		}, virtio.ErrDescAddress},
		{"huge length", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x100, Len: 0xffffffff, Flags: virtio.DescFlagWrite})
			rq.Publish(0)
		}, virtio.ErrDescAddress},
		{"readable after writable", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagWrite | virtio.DescFlagNext, Next: 1})
			d.WriteDesc(rq.Desc, 1, vtest.Desc{Addr: 0x100, Len: 8})
			rq.Publish(0)
		}, virtio.ErrDescOrder},
		{"indirect not negotiated", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x8000, Len: 32, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrIndirectDisabled},
		{"indirect in indirect", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			table := d.Alloc(32, 16)
			d.WriteDesc(table, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 1})
			d.WriteDesc(table, 1, vtest.Desc{Addr: table, Len: 32, Flags: virtio.DescFlagIndirect})
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: table, Len: 32, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrIndirectNested},
		{"indirect with next", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			table := d.Alloc(16, 16)
			d.WriteDesc(table, 0, vtest.Desc{Addr: 0x100, Len: 8})
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: table, Len: 16, Flags: virtio.DescFlagIndirect | virtio.DescFlagNext, Next: 1})
			rq.Publish(0)
		}, virtio.ErrIndirectNext},
		{"indirect length not multiple of 16", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x8000, Len: 17, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrIndirectLen},
		{"indirect zero length", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x8000, Len: 0, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrIndirectLen},
		{"indirect huge table", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: 0x8000, Len: 0xfffffff0, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrIndirectLen},
		{"indirect table out of RAM", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: memSize - 16, Len: 64, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrDescAddress},
		{"indirect loop", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			table := d.Alloc(32, 16)
			d.WriteDesc(table, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 1})
			d.WriteDesc(table, 1, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 0})
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: table, Len: 32, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrChainTooLong},
		{"indirect next out of table", virtio.FeatureIndirectDesc, func(d *vtest.Driver, rq *vtest.Queue) {
			table := d.Alloc(32, 16)
			d.WriteDesc(table, 0, vtest.Desc{Addr: 0x100, Len: 8, Flags: virtio.DescFlagNext, Next: 2})
			d.WriteDesc(rq.Desc, 0, vtest.Desc{Addr: table, Len: 32, Flags: virtio.DescFlagIndirect})
			rq.Publish(0)
		}, virtio.ErrDescIndex},
		{"avail index jumps", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			rq.SetAvailIdx(size + 1)
		}, virtio.ErrAvailIndex},
		{"avail index goes backwards", 0, func(d *vtest.Driver, rq *vtest.Queue) {
			rq.SetAvailIdx(0xffff)
		}, virtio.ErrAvailIndex},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newMem(t)
			d, rq, q := setup(t, mem, size, tt.features)
			tt.build(d, rq)
			var c virtio.Chain
			ok, err := q.Pop(&c)
			require.Error(t, err)
			assert.False(t, ok)
			assert.ErrorIs(t, err, tt.want)
			assert.NotEmpty(t, err.Error())
			var ce *virtio.ChainError
			var re *virtio.RingError
			assert.True(t, errorsAs(err, &ce) || errorsAs(err, &re), "typed error, got %T", err)
			// Sticky: the queue stays broken.
			_, err2 := q.Pop(&c)
			assert.Equal(t, err, err2)
			assert.Equal(t, err, q.Err())
			assert.Error(t, q.Push(0, 0))
		})
	}
}

func TestQueueActivateRejects(t *testing.T) {
	mem := newMem(t)
	tests := []struct {
		name              string
		size              uint16
		desc, avail, used uint64
		ready             bool
		want              error
	}{
		{"not ready", 8, 0x1000, 0x2000, 0x3000, false, virtio.ErrQueueNotReady},
		{"size zero", 0, 0x1000, 0x2000, 0x3000, true, virtio.ErrQueueSize},
		{"size not power of two", 6, 0x1000, 0x2000, 0x3000, true, virtio.ErrQueueSize},
		{"size above max", 32, 0x1000, 0x2000, 0x3000, true, virtio.ErrQueueSize},
		{"desc misaligned", 8, 0x1008, 0x2000, 0x3000, true, virtio.ErrRingAddress},
		{"used misaligned", 8, 0x1000, 0x2000, 0x3002, true, virtio.ErrRingAddress},
		{"avail outside RAM", 8, 0x1000, memSize - 4, 0x3000, true, virtio.ErrRingAddress},
		{"desc outside RAM", 8, 1 << 40, 0x2000, 0x3000, true, virtio.ErrRingAddress},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := virtio.NewQueue(16)
			q.SetSize(tt.size)
			q.SetDescAddr(tt.desc)
			q.SetAvailAddr(tt.avail)
			q.SetUsedAddr(tt.used)
			q.SetReady(tt.ready)
			err := q.Activate(mem, 0)
			assert.ErrorIs(t, err, tt.want)
			var re *virtio.RingError
			assert.True(t, errorsAs(err, &re))
		})
	}
}

func TestQueueEventIdx(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 8, virtio.FeatureEventIdx)
	buf := d.Alloc(8, 8)
	var c virtio.Chain

	complete := func() {
		rq.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
		ok, err := q.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, q.Push(c.Head, 0))
	}
	complete()
	assert.True(t, q.NeedsInterrupt(), "first completion always interrupts")
	assert.EqualValues(t, 1, rq.AvailEvent(), "device asks to be notified after avail idx 1")

	// Driver says: interrupt me only once used idx passes 3.
	rq.SetUsedEvent(3)
	complete() // used idx 2
	assert.False(t, q.NeedsInterrupt())
	complete() // used idx 3
	assert.False(t, q.NeedsInterrupt())
	complete() // used idx 4: crosses used_event 3
	assert.True(t, q.NeedsInterrupt())
	complete()
	assert.False(t, q.NeedsInterrupt())
}

func TestQueueNoInterruptFlag(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 8, 0)
	buf := d.Alloc(8, 8)
	var c virtio.Chain
	rq.SetAvailFlags(virtio.AvailFlagNoInterrupt)
	rq.Post(vtest.Buf{Addr: buf, Len: 8})
	_, err := q.Pop(&c)
	require.NoError(t, err)
	require.NoError(t, q.Push(c.Head, 0))
	assert.False(t, q.NeedsInterrupt())
	rq.SetAvailFlags(0)
	assert.True(t, q.NeedsInterrupt())
}

func TestQueueNotificationSuppression(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 8, 0)
	q.DisableNotification()
	assert.Equal(t, virtio.UsedFlagNoNotify, rq.UsedFlags())
	more, err := q.EnableNotification()
	require.NoError(t, err)
	assert.False(t, more)
	assert.Zero(t, rq.UsedFlags())

	rq.Post(vtest.Buf{Addr: d.Alloc(8, 8), Len: 8})
	more, err = q.EnableNotification()
	require.NoError(t, err)
	assert.True(t, more, "a buffer posted while notifications were off is reported")
}

func TestQueueStateRoundTrip(t *testing.T) {
	mem := newMem(t)
	d, rq, q := setup(t, mem, 8, virtio.FeatureEventIdx)
	buf := d.Alloc(8, 8)
	var c virtio.Chain
	for range 3 {
		rq.Post(vtest.Buf{Addr: buf, Len: 8, Write: true})
		_, err := q.Pop(&c)
		require.NoError(t, err)
		require.NoError(t, q.Push(c.Head, 4))
		q.NeedsInterrupt()
	}
	rq.Post(vtest.Buf{Addr: buf, Len: 8, Write: true}) // pending across the save

	s := q.State()
	q2 := virtio.NewQueue(8)
	require.NoError(t, q2.SetState(s))
	assert.Equal(t, s, q2.State())
	require.NoError(t, q2.Activate(mem, virtio.FeatureEventIdx))
	ok, err := q2.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok, "restored queue resumes at the saved avail index")
	require.NoError(t, q2.Push(c.Head, 4))
	assert.EqualValues(t, 4, rq.UsedIdx())

	assert.ErrorIs(t, virtio.NewQueue(16).SetState(s), virtio.ErrStateMismatch)
}
