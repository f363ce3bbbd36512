package migration

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func encodeRecords(t testing.TB, kind uint32, recs ...struct {
	t RecordType
	p []byte
}) []byte {
	var buf bytes.Buffer
	require.NoError(t, writeHeader(&buf, kind))
	rw := &recordWriter{w: &buf}
	for _, r := range recs {
		require.NoError(t, rw.write(r.t, r.p))
	}
	return buf.Bytes()
}

type rec = struct {
	t RecordType
	p []byte
}

func TestRecordRoundTrip(t *testing.T) {
	recs := []rec{
		{RecConfig, []byte("config")},
		{RecPages, bytes.Repeat([]byte{7}, maxPagesPayload)},
		{RecRoundEnd, make([]byte, 8)},
		{RecComplete, nil},
		{RecState, bytes.Repeat([]byte{1, 2, 3}, 5<<20)},
		{RecError, []byte("boom")},
	}
	b := encodeRecords(t, kindSource, recs...)
	r := bytes.NewReader(b)
	require.NoError(t, readHeader(r, kindSource))
	rr := &recordReader{r: r, off: headerSize}
	for _, want := range recs {
		typ, p, err := rr.next()
		require.NoError(t, err)
		assert.Equal(t, want.t, typ)
		assert.Equal(t, len(want.p), len(p))
		assert.True(t, bytes.Equal(want.p, p))
	}
	_, _, err := rr.next()
	assert.ErrorIs(t, err, io.EOF)
	assert.Equal(t, int64(len(b)), rr.off)
}

func TestRecordWriterRejectsOversize(t *testing.T) {
	rw := &recordWriter{w: io.Discard}
	assert.Error(t, rw.write(RecComplete, []byte{1}))
	assert.Error(t, rw.write(RecError, make([]byte, MaxErrorMessage+1)))
	assert.Error(t, rw.write(RecordType(999), nil))
}

func TestRecordReaderErrors(t *testing.T) {
	good := encodeRecords(t, kindSource, rec{RecConfig, []byte("0123456789")}, rec{RecComplete, nil})
	hdr := func(typ RecordType, n uint32) []byte {
		var h [recHdrSize]byte
		binary.LittleEndian.PutUint32(h[0:], uint32(typ))
		binary.LittleEndian.PutUint32(h[4:], n)
		binary.LittleEndian.PutUint32(h[8:], crc(h[:8]))
		return append(good[:headerSize:headerSize], h[:]...)
	}
	tests := []struct {
		name  string
		in    []byte
		check func(t *testing.T, err error)
	}{
		{"flip payload", func() []byte { b := bytes.Clone(good); b[headerSize+recHdrSize+3] ^= 1; return b }(), func(t *testing.T, err error) {
			var ce *ChecksumError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, RecConfig, ce.Record)
			assert.Equal(t, int64(headerSize), ce.Offset)
			assert.ErrorContains(t, err, "record Config at offset 20: payload checksum mismatch")
		}},
		{"flip length", func() []byte { b := bytes.Clone(good); b[headerSize+4] ^= 0x80; return b }(), func(t *testing.T, err error) {
			var ce *ChecksumError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, "record header", ce.Part)
		}},
		{"huge length", hdr(RecState, MaxStateSize+1), func(t *testing.T, err error) {
			var le *LimitError
			require.ErrorAs(t, err, &le)
			assert.Equal(t, uint64(MaxStateSize), le.Max)
		}},
		{"unknown type", hdr(RecordType(77), 0), func(t *testing.T, err error) {
			var pe *ProtocolError
			require.ErrorAs(t, err, &pe)
			assert.ErrorContains(t, err, "unknown record type")
		}},
		{"truncated payload", good[:headerSize+recHdrSize+4], func(t *testing.T, err error) {
			assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
		}},
		{"truncated header", good[:headerSize+5], func(t *testing.T, err error) {
			assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
		}},
		{"big length, short stream", hdr(RecState, MaxStateSize), func(t *testing.T, err error) {
			assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bytes.NewReader(tt.in)
			require.NoError(t, readHeader(r, kindSource))
			rr := &recordReader{r: r, off: headerSize}
			_, _, err := rr.next()
			tt.check(t, err)
			// Never more buffer than the data received plus one chunk.
			assert.LessOrEqual(t, cap(rr.buf), len(tt.in)+readChunk)
		})
	}
}

func TestHeaderErrors(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, writeHeader(&buf, kindSnapshot))
	good := buf.Bytes()
	var ke *KindError
	require.ErrorAs(t, readHeader(bytes.NewReader(good), kindSource), &ke)
	assert.ErrorContains(t, ke, "stream kind snapshot, expected migration-source")
	bad := bytes.Clone(good)
	bad[0] = 'X'
	assert.ErrorIs(t, readHeader(bytes.NewReader(bad), kindSnapshot), ErrBadMagic)
	bad = bytes.Clone(good)
	bad[9] = 1
	var ce *ChecksumError
	assert.ErrorAs(t, readHeader(bytes.NewReader(bad), kindSnapshot), &ce, "version changed without fixing the crc")
	assert.ErrorIs(t, readHeader(bytes.NewReader(good[:10]), kindSnapshot), io.ErrUnexpectedEOF)
}

func TestConfigRoundTrip(t *testing.T) {
	cfg := Config{
		VCPUs:   4,
		Regions: []RegionConfig{{0, 1 << 30}, {4 << 30, 2 << 20}},
		CPUID:   []byte{1, 2, 3},
		Devices: []string{"virtio-net@0xd0000000", "uart@0x3f8"},
		Extra:   []byte("x"),
	}
	b, err := cfg.MarshalBinary()
	require.NoError(t, err)
	var got Config
	require.NoError(t, got.UnmarshalBinary(b))
	assert.Equal(t, cfg, got)
	assert.Equal(t, uint64(1<<30+2<<20), got.MemorySize())
	for n := 0; n < len(b); n++ {
		assert.Error(t, new(Config).UnmarshalBinary(b[:n]), "truncated to %d", n)
	}
	assert.ErrorContains(t, new(Config).UnmarshalBinary(append(bytes.Clone(b), 0)), "trailing")
}

func TestConfigValidate(t *testing.T) {
	ok := func() Config { return Config{VCPUs: 1, Regions: []RegionConfig{{0, 4096}}} }
	tests := []struct {
		name string
		mod  func(*Config)
		msg  string
	}{
		{"no vcpus", func(c *Config) { c.VCPUs = 0 }, "vCPUs"},
		{"too many vcpus", func(c *Config) { c.VCPUs = MaxVCPUs + 1 }, "vCPUs"},
		{"no regions", func(c *Config) { c.Regions = nil }, "regions"},
		{"unaligned", func(c *Config) { c.Regions[0].GPA = 10 }, "aligned"},
		{"empty region", func(c *Config) { c.Regions[0].Size = 0 }, "empty"},
		{"overlap", func(c *Config) { c.Regions = []RegionConfig{{0, 8192}, {4096, 4096}} }, "overlaps"},
		{"wrap", func(c *Config) { c.Regions[0] = RegionConfig{^uint64(0) &^ 4095, 8192} }, "wraps"},
		{"huge", func(c *Config) { c.Regions[0].Size = MaxMemoryRegion + 4096 }, "too large"},
		{"device name", func(c *Config) { c.Devices = []string{string(make([]byte, MaxDeviceName+1))} }, "device name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok()
			require.NoError(t, c.Validate())
			tt.mod(&c)
			assert.ErrorContains(t, c.Validate(), tt.msg)
			_, err := c.MarshalBinary()
			assert.Error(t, err)
		})
	}
}

func testRegions(t testing.TB) []kvm.Region {
	mem, err := kvm.NewMemory([]kvm.RegionSpec{{GPA: 0, Size: 64 << 10}, {GPA: 1 << 20, Size: 16 << 10}}, kvm.MemoryOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	return mem.Regions()
}

func TestPagesRoundTrip(t *testing.T) {
	src, dst := testRegions(t), testRegions(t)
	for i := range src[0].Host {
		if (i/pageSize)%3 != 0 {
			src[0].Host[i] = byte(i)
		}
	}
	src[1].Host[5] = 9
	dst[0].Host[0] = 1 // a stale page that becomes zero
	var buf bytes.Buffer
	b := newPageBatcher(&recordWriter{w: &buf}, 5)
	for _, r := range src {
		require.NoError(t, b.sendRegionPages(r, nil, nil))
	}
	require.NoError(t, b.flush())
	assert.Equal(t, uint64(11), b.pages)
	assert.Equal(t, uint64(9), b.zero)
	rr := &recordReader{r: &buf}
	var data, zero uint64
	for {
		typ, p, err := rr.next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		require.Equal(t, RecPages, typ)
		d, z, err := applyPages(p, dst, false)
		require.NoError(t, err)
		data, zero = data+d, zero+z
	}
	assert.Equal(t, b.pages, data)
	assert.Equal(t, b.zero, zero)
	for i := range src {
		assert.True(t, bytes.Equal(src[i].Host, dst[i].Host), "region %d", i)
	}
}

func TestApplyPagesRejects(t *testing.T) {
	regions := testRegions(t)
	entry := func(v uint64, data bool) []byte {
		b := binary.LittleEndian.AppendUint32(nil, 1)
		b = binary.LittleEndian.AppendUint64(b, v)
		if data {
			b = append(b, make([]byte, pageSize)...)
		}
		return b
	}
	tests := []struct {
		name string
		p    []byte
		msg  string
	}{
		{"empty", nil, "no count"},
		{"zero count", make([]byte, 4), "count 0"},
		{"outside ram", entry(64<<10, true), "not in guest RAM"},
		{"in the hole", entry(512<<10|zeroFlag, false), "not in guest RAM"},
		{"unknown flag", entry(2, false), "unknown flags"},
		{"short data", entry(0, false), "data truncated"},
		{"trailing", append(entry(4096|zeroFlag, false), 1), "trailing"},
		{"count above cap", binary.LittleEndian.AppendUint32(nil, MaxBatchPages+1), "count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := applyPages(tt.p, regions, false)
			assert.ErrorContains(t, err, tt.msg)
		})
	}
}

func TestIsZeroPage(t *testing.T) {
	p := make([]byte, pageSize)
	assert.True(t, IsZeroPage(p))
	for _, i := range []int{0, 7, 8, 2048, pageSize - 1} {
		p[i] = 1
		assert.False(t, IsZeroPage(p), "byte %d", i)
		p[i] = 0
	}
}

func TestMeterPaces(t *testing.T) {
	var sink bytes.Buffer
	m := &meter{w: &sink, ctx: context.Background(), rate: 1 << 30}
	n, err := m.Write(make([]byte, 3<<20))
	require.NoError(t, err)
	assert.Equal(t, 3<<20, n)
	assert.Equal(t, uint64(3<<20), m.n)
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(errors.New("stop"))
	slow := &meter{w: &sink, ctx: ctx, rate: 1}
	_, err = slow.Write(make([]byte, 1<<20))
	assert.ErrorContains(t, err, "stop", "a paced write is interrupted by its context")
}
