package virtio_test

import (
	"testing"

	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
)

// BenchmarkPopPush measures parsing a 3-descriptor chain and completing it.
func BenchmarkPopPush(b *testing.B) {
	mem := newMem(b)
	d, rq, q := setup(b, mem, 256, virtio.FeatureEventIdx)
	h, data, st := d.Alloc(16, 8), d.Alloc(4096, 8), d.Alloc(1, 1)
	var c virtio.Chain
	b.ReportAllocs()
	for b.Loop() {
		rq.Post(vtest.Buf{Addr: h, Len: 16}, vtest.Buf{Addr: data, Len: 4096, Write: true}, vtest.Buf{Addr: st, Len: 1, Write: true})
		if ok, err := q.Pop(&c); !ok || err != nil {
			b.Fatal(ok, err)
		}
		if err := q.Push(c.Head, 4097); err != nil {
			b.Fatal(err)
		}
		q.NeedsInterrupt()
		rq.PollUsed()
	}
}
