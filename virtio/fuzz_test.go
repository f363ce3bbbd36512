package virtio_test

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
)

// FuzzChain fills a small guest memory (descriptor table, rings and the
// area indirect tables and buffers point into) with fuzzer bytes and pops
// chains: parsing must never panic, hang or accept a buffer outside RAM.
func FuzzChain(f *testing.F) {
	// Seed: a two-descriptor chain and an indirect chain.
	seed := make([]byte, 0x400)
	binary.LittleEndian.PutUint64(seed[0:], 0x800)
	binary.LittleEndian.PutUint32(seed[8:], 16)
	binary.LittleEndian.PutUint16(seed[12:], virtio.DescFlagNext)
	binary.LittleEndian.PutUint16(seed[14:], 1)
	binary.LittleEndian.PutUint64(seed[16:], 0x900)
	binary.LittleEndian.PutUint32(seed[24:], 16)
	binary.LittleEndian.PutUint16(seed[28:], virtio.DescFlagWrite)
	binary.LittleEndian.PutUint64(seed[32:], 0x400)
	binary.LittleEndian.PutUint32(seed[40:], 32)
	binary.LittleEndian.PutUint16(seed[44:], virtio.DescFlagIndirect)
	binary.LittleEndian.PutUint16(seed[0x102:], 2) // avail.idx
	binary.LittleEndian.PutUint16(seed[0x106:], 2) // ring[1] = 2
	f.Add(seed, uint64(virtio.FeatureIndirectDesc))
	f.Add([]byte{}, uint64(0))

	mem, err := kvm.SingleRegion(0x4000, kvm.MemoryOptions{})
	require.NoError(f, err)
	f.Cleanup(func() { mem.Close() })
	host := mem.Regions()[0].Host

	f.Fuzz(func(t *testing.T, data []byte, features uint64) {
		clear(host)
		copy(host, data)
		const size = 16
		q := virtio.NewQueue(size)
		q.SetDescAddr(0)      // 16*16 = 0x100 bytes
		q.SetAvailAddr(0x100) // 6+2*16
		q.SetUsedAddr(0x200)  // 6+8*16
		q.SetReady(true)
		require.NoError(t, q.Activate(mem, features))
		var c virtio.Chain
		for i := 0; i < 2*size; i++ {
			ok, err := q.Pop(&c)
			if err != nil || !ok {
				return
			}
			for _, d := range c.Descs {
				require.Len(t, d.Buf, int(d.Len))
				require.LessOrEqual(t, d.Addr+uint64(d.Len), uint64(len(host)))
			}
			require.NoError(t, q.Push(c.Head, uint32(c.WritableLen())))
			q.NeedsInterrupt()
		}
	})
}
