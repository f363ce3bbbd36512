package net

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

type nullBackend struct{ frames int }

func (b *nullBackend) WriteFrame(f []byte) error { b.frames++; return nil }

func (b *nullBackend) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	<-ctx.Done()
	return 0, ctx.Err()
}

func (b *nullBackend) Close() error { return nil }

func fuzzSetup(f *testing.F) (*vtest.ChainBuilder, *Device) {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(f, err)
	f.Cleanup(func() { mem.Close() })
	d, err := New(&nullBackend{}, Options{MAC: []byte{2, 0, 0, 0, 0, 1}})
	require.NoError(f, err)
	return vtest.NewChainBuilder(mem, 0x1000), d
}

func writable(w []byte) []int {
	var wl []int
	for _, x := range w[:min(len(w), 8)] {
		wl = append(wl, int(x))
	}
	return wl
}

// FuzzTransmit feeds arbitrary transmit chains: never a panic, never a
// completion claiming written bytes.
func FuzzTransmit(f *testing.F) {
	f.Add(append(make([]byte, 1), append([]byte{12}, make([]byte, 12)...)...), []byte{})
	f.Add([]byte{12, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 60}, []byte{1})
	b, d := fuzzSetup(f)
	f.Fuzz(func(t *testing.T, readable, w []byte) {
		c, q, err := b.Build(vtest.SplitFuzz(readable, 32), writable(w))
		if err != nil {
			return
		}
		n, err := d.transmit(context.Background(), c)
		require.NoError(t, err)
		require.Zero(t, n)
		require.NoError(t, q.Push(c.Head, n))
	})
}

// FuzzControl feeds arbitrary control commands: the answer is one ack byte
// or a typed request error.
func FuzzControl(f *testing.F) {
	f.Add([]byte{2, CtrlClassAnnounce, CtrlAnnounceAck}, []byte{1})
	f.Add([]byte{8, CtrlClassMAC, CtrlMACAddrSet, 1, 2, 3, 4, 5, 6}, []byte{0, 1})
	b, d := fuzzSetup(f)
	f.Fuzz(func(t *testing.T, readable, w []byte) {
		c, q, err := b.Build(vtest.SplitFuzz(readable, 16), writable(w))
		if err != nil {
			return
		}
		n, err := d.control(c)
		if err != nil {
			return
		}
		require.EqualValues(t, 1, n)
		require.NoError(t, q.Push(c.Head, n))
	})
}
