package migration

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func FuzzRecordReader(f *testing.F) {
	f.Add(encodeRecords(f, kindSource, rec{RecConfig, []byte("abc")}, rec{RecPages, make([]byte, 12)}, rec{RecComplete, nil}))
	f.Add(encodeRecords(f, kindTarget, rec{RecReady, nil}, rec{RecAck, make([]byte, 24)}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		if readHeader(r, kindSource) != nil {
			r = bytes.NewReader(b)
		}
		rr := &recordReader{r: r}
		for i := 0; i < 1000; i++ {
			typ, p, err := rr.next()
			if err != nil {
				return
			}
			max, ok := maxPayload(typ)
			if !ok || uint64(len(p)) > uint64(max) {
				t.Fatalf("record %v of %d bytes passed", typ, len(p))
			}
		}
		if cap(rr.buf) > len(b)+readChunk {
			t.Fatalf("buffer of %d for %d input bytes", cap(rr.buf), len(b))
		}
	})
}

func FuzzConfig(f *testing.F) {
	good, err := (&Config{VCPUs: 2, Regions: []RegionConfig{{0, 1 << 20}, {1 << 32, 4096}}, CPUID: []byte("c"), Devices: []string{"a", "bb"}}).MarshalBinary()
	require.NoError(f, err)
	f.Add(good)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var c Config
		if c.UnmarshalBinary(b) != nil {
			return
		}
		// Whatever decodes is valid and re-encodes to the same bytes.
		require.NoError(t, c.Validate())
		again, err := c.MarshalBinary()
		require.NoError(t, err)
		require.Equal(t, b, again)
	})
}

func FuzzApplyPages(f *testing.F) {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	b = binary.LittleEndian.AppendUint64(b, 4096|zeroFlag)
	b = binary.LittleEndian.AppendUint64(b, 1<<20)
	b = append(b, bytes.Repeat([]byte{5}, pageSize)...)
	f.Add(b)
	f.Fuzz(func(t *testing.T, p []byte) {
		regions := testRegions(t)
		_, _, _ = applyPages(p, regions, len(p)%2 == 0)
	})
}

func FuzzSnapshotInfo(f *testing.F) {
	si := SnapshotInfo{Kind: DiffSnapshot, RegionOffsets: []uint64{0, 4096}, Pages: 1, MemorySize: 4096}
	f.Add(si.marshal(), []byte{1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, info, bitmap []byte) {
		var s SnapshotInfo
		if s.unmarshal(info) != nil {
			return
		}
		cfg := Config{VCPUs: 1, Regions: []RegionConfig{{0, 40 << 12}}}
		_ = checkLayout(&s, &cfg)
		_, _ = decodeBitmap(bitmap, &cfg, s.Pages)
		_, _ = decodeAck(info)
	})
}

// memTarget is a minimal Target over kvm.Memory.
type memTarget struct {
	mem     *kvm.Memory
	state   []byte
	resumed bool
	aborted bool
}

func (m *memTarget) Prepare(cfg Config) ([]kvm.Region, error) {
	specs := make([]kvm.RegionSpec, len(cfg.Regions))
	for i, r := range cfg.Regions {
		specs[i] = kvm.RegionSpec{GPA: r.GPA, Size: r.Size}
	}
	var err error
	m.mem, err = kvm.NewMemory(specs, kvm.MemoryOptions{})
	if err != nil {
		return nil, err
	}
	return m.mem.Regions(), nil
}
func (m *memTarget) LoadState(s []byte) error { m.state = bytes.Clone(s); return nil }
func (m *memTarget) Resume() error            { m.resumed = true; return nil }
func (m *memTarget) Announce() error          { return nil }
func (m *memTarget) Abort() {
	m.aborted = true
	if m.mem != nil {
		m.mem.Close()
	}
}

type rwPair struct {
	io.Reader
	io.Writer
}

// validSourceStream is a complete, well-formed source stream.
func validSourceStream(t testing.TB) []byte {
	cfg := Config{VCPUs: 1, Regions: []RegionConfig{{0, 8 * pageSize}}}
	cb, err := cfg.MarshalBinary()
	require.NoError(t, err)
	pages := binary.LittleEndian.AppendUint32(nil, 2)
	pages = binary.LittleEndian.AppendUint64(pages, 0|zeroFlag)
	pages = binary.LittleEndian.AppendUint64(pages, 3*pageSize)
	pages = append(pages, bytes.Repeat([]byte{0xab}, pageSize)...)
	round := func(n uint64) []byte { return binary.LittleEndian.AppendUint64(nil, n) }
	return encodeRecords(t, kindSource,
		rec{RecConfig, cb}, rec{RecPages, pages}, rec{RecRoundEnd, round(0)}, rec{RecPaused, nil},
		rec{RecRoundEnd, round(1)}, rec{RecState, []byte("state")}, rec{RecComplete, nil}, rec{RecDone, nil})
}

func TestReceiveValidStream(t *testing.T) {
	tgt := &memTarget{}
	var out bytes.Buffer
	st, err := Receive(context.Background(), rwPair{bytes.NewReader(validSourceStream(t)), &out}, tgt, ReceiveOptions{})
	require.NoError(t, err)
	require.True(t, tgt.resumed)
	require.True(t, st.Confirmed)
	require.Equal(t, []byte("state"), tgt.state)
	require.Equal(t, uint64(1), st.PagesReceived)
	require.Equal(t, uint64(1), st.ZeroPages)
	require.Equal(t, 2, st.Rounds)
	require.Equal(t, bytes.Repeat([]byte{0xab}, pageSize), tgt.mem.Regions()[0].Host[3*pageSize:4*pageSize])
	// The reply stream: header, Ready, RoundAck(0), Ack.
	r := bytes.NewReader(out.Bytes())
	require.NoError(t, readHeader(r, kindTarget))
	rr := &recordReader{r: r}
	for _, want := range []RecordType{RecReady, RecRoundAck, RecAck} {
		typ, _, err := rr.next()
		require.NoError(t, err)
		require.Equal(t, want, typ)
	}
	tgt.mem.Close()
}

func TestReceiveProtocolErrors(t *testing.T) {
	good := validSourceStream(t)
	// Cut the stream at every record boundary and drop records: never a
	// resume without all of it.
	for n := 0; n < len(good)-recHdrSize-recTrailSize; n += 7 {
		tgt := &memTarget{}
		_, err := Receive(context.Background(), rwPair{bytes.NewReader(good[:n]), io.Discard}, tgt, ReceiveOptions{Logger: quietLog()})
		require.Error(t, err, "stream cut at %d", n)
		require.False(t, tgt.resumed && !tgt.aborted)
	}
	var pe *PhaseError
	cfg := Config{VCPUs: 1, Regions: []RegionConfig{{0, 1 << 30}}}
	cb, _ := cfg.MarshalBinary()
	_, err := Receive(context.Background(), rwPair{bytes.NewReader(encodeRecords(t, kindSource, rec{RecConfig, cb})), io.Discard},
		&memTarget{}, ReceiveOptions{MaxMemory: 1 << 20, Logger: quietLog()})
	var le *LimitError
	require.ErrorAs(t, err, &le)
	require.ErrorAs(t, err, &pe)
	require.Equal(t, PhaseHandshake, pe.Phase)
	_, err = Receive(context.Background(), rwPair{bytes.NewReader(encodeRecords(t, kindSource, rec{RecComplete, nil})), io.Discard},
		&memTarget{}, ReceiveOptions{Logger: quietLog()})
	require.ErrorContains(t, err, "expected Config first")
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func FuzzReceive(f *testing.F) {
	f.Add(validSourceStream(f))
	f.Fuzz(func(t *testing.T, b []byte) {
		tgt := &memTarget{}
		_, err := Receive(context.Background(), rwPair{bytes.NewReader(b), io.Discard}, tgt, ReceiveOptions{MaxMemory: 4 << 20, Logger: quietLog()})
		if err == nil {
			if !tgt.resumed {
				t.Fatal("success without resume")
			}
			tgt.mem.Close()
			return
		}
		var pe *PhaseError
		if !errors.As(err, &pe) {
			t.Fatalf("untyped error %v", err)
		}
		if tgt.mem != nil && !tgt.aborted {
			t.Fatal("failed without abort")
		}
	})
}
