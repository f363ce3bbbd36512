package blk

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

// FuzzRequest feeds arbitrary request chains (header, payload split into
// arbitrary buffers, writable buffers of arbitrary sizes) to the block
// device: it must never panic, must answer with a status byte or a typed
// error, and must report no more written bytes than the chain holds.
func FuzzRequest(f *testing.F) {
	hdr := func(typ uint32, sector uint64) []byte {
		b := make([]byte, 17)
		b[0] = 16
		binary.LittleEndian.PutUint32(b[1:], typ)
		binary.LittleEndian.PutUint64(b[9:], sector)
		return b
	}
	f.Add(hdr(TypeIn, 1), []byte{0, 2, 1})
	f.Add(append(hdr(TypeOut, 2), 8, 1, 2, 3, 4, 5, 6, 7, 8), []byte{1})
	f.Add(append(hdr(TypeDiscard, 0), 16, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0), []byte{1})
	f.Add(hdr(TypeGetID, 0), []byte{20, 1})
	f.Add(hdr(TypeFlush, 0), []byte{})

	img := filepath.Join(f.TempDir(), "fuzz.img")
	require.NoError(f, os.WriteFile(img, make([]byte, 64<<10), 0o600))
	file, err := os.OpenFile(img, os.O_RDWR, 0)
	require.NoError(f, err)
	d, err := New(file, Options{ID: "fuzz"})
	require.NoError(f, err)
	f.Cleanup(func() { d.Close() })
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(f, err)
	f.Cleanup(func() { mem.Close() })
	b := vtest.NewChainBuilder(mem, 0x1000)

	f.Fuzz(func(t *testing.T, readable []byte, writable []byte) {
		var wl []int
		for _, w := range writable {
			wl = append(wl, int(w)*4)
		}
		if len(wl) > 16 {
			wl = wl[:16]
		}
		c, q, err := b.Build(vtest.SplitFuzz(readable, 32), wl)
		if err != nil {
			return
		}
		n, err := d.handle(context.Background(), c)
		if err != nil {
			return
		}
		require.LessOrEqual(t, uint64(n), c.WritableLen())
		require.NoError(t, q.Push(c.Head, n))
	})
}
