package blk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/blk"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/mmio"
)

const diskSize = 1 << 20

type rig struct {
	t    *testing.T
	path string
	dev  *blk.Device
	tr   *mmio.Transport
	d    *vtest.Driver
	q    *vtest.Queue
	mem  *kvm.Memory
}

func newRig(t *testing.T, opts blk.Options) *rig {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, diskSize)
	for i := range img {
		img[i] = byte(i / blk.SectorSize)
	}
	require.NoError(t, os.WriteFile(path, img, 0o600))
	dev, err := blk.Open(path, opts)
	require.NoError(t, err)
	mem, err := kvm.SingleRegion(4<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	tr := mmio.New(dev, mem, kvm.NoIRQ{}, mmio.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d := vtest.NewDriver(tr, mem, 0x1000)
	require.NoError(t, d.Init(virtio.TransportFeatures|blk.FeatureFlush|blk.FeatureDiscard|blk.FeatureWriteZeroes|blk.FeatureRO|blk.FeatureBlkSize|blk.FeatureSegMax))
	q, err := d.SetupQueue(0, 64)
	require.NoError(t, err)
	d.DriverOK()
	require.False(t, d.NeedsReset())
	t.Cleanup(func() {
		d.Write32(mmio.RegStatus, 0)
		dev.Close()
		mem.Close()
	})
	return &rig{t: t, path: path, dev: dev, tr: tr, d: d, q: q, mem: mem}
}

// do issues one request: header, then payload buffers (readable for writes,
// writable for reads), then a status byte. It returns status, used length
// and the payload read back from guest memory.
func (r *rig) do(typ uint32, sector uint64, payload []byte, writable bool) (byte, uint32, []byte) {
	r.t.Helper()
	hdr := r.d.Alloc(16, 8)
	var h [16]byte
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	_, err := r.mem.WriteAt(h[:], int64(hdr))
	require.NoError(r.t, err)
	bufs := []vtest.Buf{{Addr: hdr, Len: 16}}
	var data uint64
	if len(payload) > 0 {
		data = r.d.Alloc(uint64(len(payload)), 8)
		_, err = r.mem.WriteAt(payload, int64(data))
		require.NoError(r.t, err)
		bufs = append(bufs, vtest.Buf{Addr: data, Len: uint32(len(payload)), Write: writable})
	}
	st := r.d.Alloc(1, 1)
	r.mem.WriteAt([]byte{0xee}, int64(st))
	bufs = append(bufs, vtest.Buf{Addr: st, Len: 1, Write: true})
	head := r.q.Post(bufs...)
	r.q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, err := r.q.WaitUsed(ctx)
	require.NoError(r.t, err)
	require.EqualValues(r.t, head, u.ID)
	var s [1]byte
	r.mem.ReadAt(s[:], int64(st))
	out := make([]byte, len(payload))
	if len(payload) > 0 {
		r.mem.ReadAt(out, int64(data))
	}
	return s[0], u.Len, out
}

func TestConfig(t *testing.T) {
	r := newRig(t, blk.Options{})
	assert.EqualValues(t, diskSize/blk.SectorSize, binary.LittleEndian.Uint64(r.d.ReadConfig(0, 8)))
	assert.EqualValues(t, blk.SectorSize, binary.LittleEndian.Uint32(r.d.ReadConfig(20, 4)))
	assert.Zero(t, r.d.Features&blk.FeatureRO)
	assert.NotZero(t, r.d.Features&blk.FeatureFlush)
}

func TestReadWriteFlush(t *testing.T) {
	r := newRig(t, blk.Options{})
	st, n, got := r.do(blk.TypeIn, 3, make([]byte, 2*blk.SectorSize), true)
	assert.Equal(t, blk.StatusOK, st)
	assert.EqualValues(t, 2*blk.SectorSize+1, n)
	assert.Equal(t, bytes.Repeat([]byte{3}, blk.SectorSize), got[:blk.SectorSize])
	assert.Equal(t, bytes.Repeat([]byte{4}, blk.SectorSize), got[blk.SectorSize:])

	data := bytes.Repeat([]byte("kvmkit!!"), blk.SectorSize/8)
	st, n, _ = r.do(blk.TypeOut, 10, data, false)
	assert.Equal(t, blk.StatusOK, st)
	assert.EqualValues(t, 1, n)
	st, _, _ = r.do(blk.TypeFlush, 0, nil, false)
	assert.Equal(t, blk.StatusOK, st)

	img, err := os.ReadFile(r.path)
	require.NoError(t, err)
	assert.Equal(t, data, img[10*blk.SectorSize:11*blk.SectorSize])
	st, _, got = r.do(blk.TypeIn, 10, make([]byte, blk.SectorSize), true)
	assert.Equal(t, blk.StatusOK, st)
	assert.Equal(t, data, got)
}

func TestIndirectScatterRead(t *testing.T) {
	r := newRig(t, blk.Options{})
	hdr := r.d.Alloc(16, 8)
	var h [16]byte
	binary.LittleEndian.PutUint64(h[8:], 7)
	r.mem.WriteAt(h[:], int64(hdr))
	a, b, st := r.d.Alloc(100, 8), r.d.Alloc(412, 8), r.d.Alloc(1, 1)
	r.q.PostIndirect(vtest.Buf{Addr: hdr, Len: 16}, vtest.Buf{Addr: a, Len: 100, Write: true},
		vtest.Buf{Addr: b, Len: 412, Write: true}, vtest.Buf{Addr: st, Len: 1, Write: true})
	r.q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u, err := r.q.WaitUsed(ctx)
	require.NoError(t, err)
	assert.EqualValues(t, 513, u.Len)
	got := make([]byte, 412)
	r.mem.ReadAt(got, int64(b))
	assert.Equal(t, bytes.Repeat([]byte{7}, 412), got)
}

func TestErrors(t *testing.T) {
	r := newRig(t, blk.Options{})
	tests := []struct {
		name     string
		typ      uint32
		sector   uint64
		payload  []byte
		writable bool
		want     byte
	}{
		{"read past end", blk.TypeIn, diskSize / blk.SectorSize, make([]byte, blk.SectorSize), true, blk.StatusIOErr},
		{"read straddles end", blk.TypeIn, diskSize/blk.SectorSize - 1, make([]byte, 2*blk.SectorSize), true, blk.StatusIOErr},
		{"sector overflows", blk.TypeOut, ^uint64(0), make([]byte, blk.SectorSize), false, blk.StatusIOErr},
		{"partial sector", blk.TypeIn, 0, make([]byte, 100), true, blk.StatusIOErr},
		{"unknown type", 77, 0, nil, false, blk.StatusUnsupp},
		{"discard bad segment size", blk.TypeDiscard, 0, make([]byte, 15), false, blk.StatusUnsupp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, _, _ := r.do(tt.typ, tt.sector, tt.payload, tt.writable)
			assert.Equal(t, tt.want, st)
		})
	}
	assert.False(t, r.d.NeedsReset(), "I/O errors are reported per request")
}

func TestGetID(t *testing.T) {
	r := newRig(t, blk.Options{ID: "disk-serial-0001"})
	st, n, got := r.do(blk.TypeGetID, 0, make([]byte, blk.IDLen), true)
	assert.Equal(t, blk.StatusOK, st)
	assert.EqualValues(t, blk.IDLen+1, n)
	assert.Equal(t, "disk-serial-0001", string(bytes.TrimRight(got, "\x00")))
}

func segment(sector uint64, n uint32, flags uint32) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	r := newRig(t, blk.Options{})
	st, _, _ := r.do(blk.TypeDiscard, 0, segment(8, 8, 0), false) // 4 KiB aligned
	assert.Equal(t, blk.StatusOK, st)
	img, err := os.ReadFile(r.path)
	require.NoError(t, err)
	assert.Equal(t, make([]byte, 8*blk.SectorSize), img[8*blk.SectorSize:16*blk.SectorSize], "punched range reads zero")
	assert.Equal(t, byte(16), img[16*blk.SectorSize], "data after the hole intact")
	assert.EqualValues(t, diskSize, len(img), "size kept")

	seg := append(segment(20, 1, 0), segment(30, 2, 1)...)
	st, _, _ = r.do(blk.TypeWriteZeroes, 0, seg, false)
	assert.Equal(t, blk.StatusOK, st)
	img, err = os.ReadFile(r.path)
	require.NoError(t, err)
	assert.Equal(t, make([]byte, blk.SectorSize), img[20*blk.SectorSize:21*blk.SectorSize])
	assert.Equal(t, make([]byte, 2*blk.SectorSize), img[30*blk.SectorSize:32*blk.SectorSize])
	assert.Equal(t, byte(21), img[21*blk.SectorSize])

	st, _, _ = r.do(blk.TypeDiscard, 0, segment(diskSize/blk.SectorSize, 1, 0), false)
	assert.Equal(t, blk.StatusIOErr, st, "discard past the end")
	st, _, _ = r.do(blk.TypeDiscard, 0, segment(0, 1, 1), false)
	assert.Equal(t, blk.StatusUnsupp, st, "unmap flag is reserved for discard")
}

func TestReadOnly(t *testing.T) {
	r := newRig(t, blk.Options{ReadOnly: true})
	assert.NotZero(t, r.d.Features&blk.FeatureRO)
	st, _, _ := r.do(blk.TypeOut, 0, make([]byte, blk.SectorSize), false)
	assert.Equal(t, blk.StatusIOErr, st)
	st, _, _ = r.do(blk.TypeDiscard, 0, segment(0, 8, 0), false)
	assert.Equal(t, blk.StatusIOErr, st)
	st, _, _ = r.do(blk.TypeWriteZeroes, 0, segment(0, 8, 0), false)
	assert.Equal(t, blk.StatusIOErr, st)
	st, _, got := r.do(blk.TypeIn, 1, make([]byte, blk.SectorSize), true)
	assert.Equal(t, blk.StatusOK, st)
	assert.Equal(t, byte(1), got[0])
	img, err := os.ReadFile(r.path)
	require.NoError(t, err)
	assert.Equal(t, byte(0), img[0])
}

func TestMalformedRequestNeedsReset(t *testing.T) {
	r := newRig(t, blk.Options{})
	// Header only, no status byte.
	hdr := r.d.Alloc(16, 8)
	r.q.Post(vtest.Buf{Addr: hdr, Len: 16})
	r.q.Kick()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, r.d.WaitNeedsReset(ctx))
	var re *virtio.RequestError
	assert.ErrorAs(t, r.tr.Err(), &re)
}

type countLimiter struct{ bytes atomic.Int64 }

func (c *countLimiter) Wait(ctx context.Context, n int) error {
	c.bytes.Add(int64(n))
	return nil
}

func TestLimiter(t *testing.T) {
	lim := &countLimiter{}
	r := newRig(t, blk.Options{Limiter: lim})
	r.do(blk.TypeIn, 0, make([]byte, 4*blk.SectorSize), true)
	r.do(blk.TypeOut, 0, make([]byte, blk.SectorSize), false)
	assert.EqualValues(t, 5*blk.SectorSize, lim.bytes.Load())
}

func TestStateRoundTrip(t *testing.T) {
	r := newRig(t, blk.Options{})
	s, err := r.dev.SaveState()
	require.NoError(t, err)
	require.NoError(t, r.dev.RestoreState(s))

	other := newRig(t, blk.Options{ReadOnly: true})
	assert.ErrorIs(t, other.dev.RestoreState(s), virtio.ErrStateMismatch)
	assert.Error(t, r.dev.RestoreState(s[:10]))
}
