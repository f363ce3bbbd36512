package console_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/console"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/mmio"
)

// syncBuffer is a goroutine-safe bytes.Buffer.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func setup(t *testing.T, opts console.Options) (*mmio.Transport, *vtest.Driver, *vtest.Queue, *vtest.Queue, *kvm.Memory) {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	tr := mmio.New(console.New(opts), mem, nil, mmio.Options{})
	d := vtest.NewDriver(tr, mem, 0x1000)
	require.NoError(t, d.Init(^uint64(0)))
	rx, err := d.SetupQueue(console.ReceiveQueue, 16)
	require.NoError(t, err)
	tx, err := d.SetupQueue(console.TransmitQueue, 16)
	require.NoError(t, err)
	d.DriverOK()
	t.Cleanup(func() { d.Write32(mmio.RegStatus, 0); mem.Close() })
	return tr, d, rx, tx, mem
}

func wait(t *testing.T, q *vtest.Queue) vtest.Used {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, err := q.WaitUsed(ctx)
	require.NoError(t, err)
	return u
}

func TestOutput(t *testing.T) {
	out := &syncBuffer{}
	_, d, _, tx, mem := setup(t, console.Options{Output: out})
	a, b := d.Alloc(6, 1), d.Alloc(6, 1)
	mem.WriteAt([]byte("hello "), int64(a))
	mem.WriteAt([]byte("world\n"), int64(b))
	tx.Post(vtest.Buf{Addr: a, Len: 6}, vtest.Buf{Addr: b, Len: 6})
	tx.Kick()
	u := wait(t, tx)
	assert.Zero(t, u.Len)
	assert.Equal(t, "hello world\n", out.String())
}

func TestInput(t *testing.T) {
	pr, pw := io.Pipe()
	_, d, rx, _, mem := setup(t, console.Options{Input: pr})
	t.Cleanup(func() { pw.Close() })
	buf := d.Alloc(4, 1)
	rx.Post(vtest.Buf{Addr: buf, Len: 4, Write: true})
	rx.Kick()
	go pw.Write([]byte("abcdef"))
	u := wait(t, rx)
	assert.EqualValues(t, 4, u.Len)
	got := make([]byte, 4)
	mem.ReadAt(got, int64(buf))
	assert.Equal(t, "abcd", string(got))

	// The rest waits for the next buffer.
	buf2 := d.Alloc(16, 1)
	rx.Post(vtest.Buf{Addr: buf2, Len: 16, Write: true})
	rx.Kick()
	u = wait(t, rx)
	assert.EqualValues(t, 2, u.Len)
	mem.ReadAt(got[:2], int64(buf2))
	assert.Equal(t, "ef", string(got[:2]))
}

func TestConfigAndEmergencyWrite(t *testing.T) {
	out := &syncBuffer{}
	tr, d, _, _, _ := setup(t, console.Options{Output: out, Cols: 80, Rows: 25})
	assert.NotZero(t, d.Features&console.FeatureSize)
	assert.EqualValues(t, 80, binary.LittleEndian.Uint16(d.ReadConfig(0, 2)))
	assert.EqualValues(t, 25, binary.LittleEndian.Uint16(d.ReadConfig(2, 2)))
	assert.EqualValues(t, 1, binary.LittleEndian.Uint32(d.ReadConfig(4, 4)))
	tr.Write(mmio.RegConfig+8, []byte{'!', 0, 0, 0})
	assert.Equal(t, "!", out.String())
}

func TestStateRoundTrip(t *testing.T) {
	dev := console.New(console.Options{Cols: 100, Rows: 40})
	s, err := dev.SaveState()
	require.NoError(t, err)
	dev2 := console.New(console.Options{})
	require.NoError(t, dev2.RestoreState(s))
	s2, err := dev2.SaveState()
	require.NoError(t, err)
	assert.Equal(t, s, s2)
	assert.ErrorIs(t, dev2.RestoreState(s[:5]), virtio.ErrStateCorrupt)
}
