package rng

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

func newBuilder(t testing.TB) *vtest.ChainBuilder {
	mem, err := kvm.SingleRegion(4<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	return vtest.NewChainBuilder(mem, 0x1000)
}

func TestHandleCapsRequest(t *testing.T) {
	b := newBuilder(t)
	c, _, err := b.Build(nil, []int{MaxRequest, MaxRequest})
	require.NoError(t, err)
	d := New(Options{Source: bytes.NewReader(bytes.Repeat([]byte{7}, 3*MaxRequest))})
	n, err := d.handle(c)
	require.NoError(t, err)
	assert.EqualValues(t, MaxRequest, n)
	assert.Equal(t, byte(7), c.Writable()[0].Buf[MaxRequest-1])
	assert.Equal(t, byte(0), c.Writable()[1].Buf[0])
}

func TestHandleShortSource(t *testing.T) {
	b := newBuilder(t)
	c, _, err := b.Build(nil, []int{8, 8})
	require.NoError(t, err)
	d := New(Options{Source: bytes.NewReader([]byte{1, 2, 3, 4, 5})})
	n, err := d.handle(c)
	require.NoError(t, err)
	assert.EqualValues(t, 5, n, "only the bytes the source gave are reported")
}

func TestStateRoundTrip(t *testing.T) {
	d := New(Options{})
	s, err := d.SaveState()
	require.NoError(t, err)
	require.NoError(t, d.RestoreState(s))
	var ve *virtio.StateVersionError
	assert.True(t, errors.As(d.RestoreState(bytes.Replace(s, []byte(`"version":1`), []byte(`"version":2`), 1)), &ve))
	assert.ErrorIs(t, d.RestoreState([]byte(`{"kind":"virtio-blk","version":1,"data":{}}`)), virtio.ErrStateMismatch)
}

// FuzzRequest fills arbitrary chains: never more than MaxRequest bytes and
// never more than the chain's writable length.
func FuzzRequest(f *testing.F) {
	f.Add([]byte{1, 2}, []byte{3, 4})
	b := newBuilder(f)
	d := New(Options{})
	f.Fuzz(func(t *testing.T, readable, writable []byte) {
		var wl []int
		for _, w := range writable[:min(len(writable), 8)] {
			wl = append(wl, int(w)*64)
		}
		c, q, err := b.Build(vtest.SplitFuzz(readable, 8), wl)
		if err != nil {
			return
		}
		n, err := d.handle(c)
		require.NoError(t, err)
		require.LessOrEqual(t, uint64(n), min(c.WritableLen(), MaxRequest))
		require.NoError(t, q.Push(c.Head, n))
	})
}
