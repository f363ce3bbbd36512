package console

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

// FuzzTransmit feeds arbitrary transmit chains to the console: the output
// must be exactly the readable bytes, in order.
func FuzzTransmit(f *testing.F) {
	f.Add([]byte{3, 'a', 'b', 'c', 1, 'd'}, []byte{2})
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(f, err)
	f.Cleanup(func() { mem.Close() })
	b := vtest.NewChainBuilder(mem, 0x1000)
	f.Fuzz(func(t *testing.T, readable, writable []byte) {
		var wl []int
		for _, w := range writable[:min(len(writable), 8)] {
			wl = append(wl, int(w))
		}
		parts := vtest.SplitFuzz(readable, 32)
		c, q, err := b.Build(parts, wl)
		if err != nil {
			return
		}
		var out bytes.Buffer
		d := New(Options{Output: &out})
		n, err := d.transmit(c)
		require.NoError(t, err)
		require.Zero(t, n)
		require.Equal(t, string(bytes.Join(parts, nil)), out.String())
		require.NoError(t, q.Push(c.Head, n))
	})
}
