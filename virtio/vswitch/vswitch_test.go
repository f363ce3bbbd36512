package vswitch

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/virtio/netback"
	"github.com/kvmkit/kvmkit/virtio/ratelimit"
)

var (
	epoch     = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	broadcast = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

func macN(i int) [6]byte {
	return [6]byte{0x52, 0x54, 0, 0, byte(i >> 8), byte(i)}
}

// frame builds a frame from src to dst whose payload carries seq.
func frame(dst, src [6]byte, seq int, size int) []byte {
	if size < 20 {
		size = 20
	}
	f := make([]byte, size)
	copy(f[0:6], dst[:])
	copy(f[6:12], src[:])
	binary.BigEndian.PutUint16(f[12:14], 0x88b5) // local experimental ethertype
	binary.BigEndian.PutUint32(f[14:18], uint32(seq))
	return f
}

// drain reads every frame that is due now without blocking.
func drain(t *testing.T, p *Port) [][]byte {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out [][]byte
	buf := make([]byte, netback.MaxFrameLen)
	for range 100000 {
		n, err := p.ReadFrame(ctx, buf)
		if err != nil {
			require.ErrorIs(t, err, context.Canceled)
			return out
		}
		out = append(out, append([]byte(nil), buf[:n]...))
	}
	t.Fatal("drain: too many frames")
	return nil
}

func newTestSwitch(t *testing.T, opts Options, links ...LinkOptions) (*Switch, []*Port, *ratelimit.ManualClock) {
	t.Helper()
	clk := ratelimit.NewManualClock(epoch)
	if opts.Clock == nil {
		opts.Clock = clk
	}
	s := New(opts)
	t.Cleanup(func() { _ = s.Close() })
	var ports []*Port
	for i, l := range links {
		p, err := s.AddPort(fmt.Sprintf("p%d", i), l)
		require.NoError(t, err)
		ports = append(ports, p)
	}
	return s, ports, clk
}

func TestTwoPortsExchange(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{})
	a, b := ps[0], ps[1]
	f := frame(macN(2), macN(1), 7, 64)
	require.NoError(t, a.WriteFrame(f))
	buf := make([]byte, 2048)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := b.ReadFrame(ctx, buf)
	require.NoError(t, err)
	assert.Equal(t, f, buf[:n])

	r := frame(macN(1), macN(2), 8, 100)
	require.NoError(t, b.WriteFrame(r))
	n, err = a.ReadFrame(ctx, buf)
	require.NoError(t, err)
	assert.Equal(t, r, buf[:n])

	assert.Equal(t, PortStats{IngressFrames: 1, IngressBytes: 64, EgressFrames: 1, EgressBytes: 100, Flooded: 1}, a.Stats())
	assert.Equal(t, PortStats{IngressFrames: 1, IngressBytes: 100, EgressFrames: 1, EgressBytes: 64}, b.Stats())
}

func TestWriterBufferReuse(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{})
	f := frame(broadcast, macN(1), 1, 64)
	want := append([]byte(nil), f...)
	require.NoError(t, ps[0].WriteFrame(f))
	f[20] = 0xaa // the caller reuses its buffer
	got := drain(t, ps[1])
	require.Len(t, got, 1)
	assert.Equal(t, want, got[0])
}

func TestLearningStopsFlooding(t *testing.T) {
	s, ps, clk := newTestSwitch(t, Options{AgingTime: time.Minute}, LinkOptions{}, LinkOptions{}, LinkOptions{})
	a, b, c := ps[0], ps[1], ps[2]

	require.NoError(t, a.WriteFrame(frame(macN(2), macN(1), 1, 60)))
	assert.Len(t, drain(t, b), 1, "unknown destination floods")
	assert.Len(t, drain(t, c), 1, "unknown destination floods")

	require.NoError(t, b.WriteFrame(frame(macN(1), macN(2), 2, 60)))
	assert.Len(t, drain(t, a), 1)
	assert.Empty(t, drain(t, c), "A was learned: no flood")

	require.NoError(t, a.WriteFrame(frame(macN(2), macN(1), 3, 60)))
	assert.Len(t, drain(t, b), 1)
	assert.Empty(t, drain(t, c), "B was learned: no flood")
	name, ok := s.Lookup(macN(2))
	require.True(t, ok)
	assert.Equal(t, "p1", name)

	// Entries age out.
	clk.Advance(2 * time.Minute)
	_, ok = s.Lookup(macN(2))
	assert.False(t, ok)
	require.NoError(t, a.WriteFrame(frame(macN(2), macN(1), 4, 60)))
	assert.Len(t, drain(t, b), 1)
	assert.Len(t, drain(t, c), 1, "aged entry floods again")

	// A frame to a MAC on the sending port is not reflected.
	require.NoError(t, a.WriteFrame(frame(macN(1), macN(9), 5, 60)))
	assert.Empty(t, drain(t, b))
	assert.Empty(t, drain(t, c))

	// A MAC that moves is relearned.
	require.NoError(t, c.WriteFrame(frame(broadcast, macN(2), 6, 60)))
	name, ok = s.Lookup(macN(2))
	require.True(t, ok)
	assert.Equal(t, "p2", name)
}

func TestClosedPortForgotten(t *testing.T) {
	s, ps, _ := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{}, LinkOptions{})
	require.NoError(t, ps[1].WriteFrame(frame(broadcast, macN(2), 1, 60)))
	require.NoError(t, ps[1].Close())
	_, ok := s.Lookup(macN(2))
	assert.False(t, ok)
	assert.Equal(t, []string{"p0", "p2"}, s.Ports())
	assert.ErrorIs(t, ps[1].WriteFrame(frame(broadcast, macN(2), 1, 60)), netback.ErrClosed)
	_, err := ps[1].ReadFrame(context.Background(), make([]byte, 64))
	assert.ErrorIs(t, err, netback.ErrClosed)
	// Re-adding the name works after close.
	_, err = s.AddPort("p1", LinkOptions{})
	require.NoError(t, err)
	_, err = s.AddPort("p1", LinkOptions{})
	require.ErrorIs(t, err, ErrPortExists)
}

func TestCloseWakesReader(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{}, LinkOptions{})
	done := make(chan error, 1)
	go func() {
		_, err := ps[0].ReadFrame(context.Background(), make([]byte, 64))
		done <- err
	}()
	require.NoError(t, ps[0].Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, netback.ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("reader not woken by Close")
	}
}

func TestLoss(t *testing.T) {
	t.Run("loss=1 drops all", func(t *testing.T) {
		_, ps, _ := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{Loss: 1})
		for i := range 50 {
			require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), i, 60)))
			require.NoError(t, ps[1].WriteFrame(frame(broadcast, macN(2), i, 60)))
		}
		assert.Empty(t, drain(t, ps[1]))
		assert.Empty(t, drain(t, ps[0]))
		assert.Equal(t, uint64(100), ps[1].Stats().DroppedLoss, "50 egress + 50 ingress")
	})
	t.Run("injected random source", func(t *testing.T) {
		vals := []float64{0.1, 0.9, 0.4, 0.6, 0.49, 0.5}
		i := 0
		rnd := func() float64 { v := vals[i%len(vals)]; i++; return v }
		_, ps, _ := newTestSwitch(t, Options{Rand: rnd}, LinkOptions{}, LinkOptions{Loss: 0.5})
		for seq := range 6 {
			require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), seq, 60)))
		}
		got := drain(t, ps[1])
		var seqs []uint32
		for _, f := range got {
			seqs = append(seqs, binary.BigEndian.Uint32(f[14:18]))
		}
		assert.Equal(t, []uint32{1, 3, 5}, seqs, "values below 0.5 drop")
		assert.Equal(t, uint64(3), ps[1].Stats().DroppedLoss)
	})
}

func TestLatency(t *testing.T) {
	_, ps, clk := newTestSwitch(t, Options{}, LinkOptions{Latency: 3 * time.Millisecond}, LinkOptions{Latency: 10 * time.Millisecond})
	require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), 1, 60)))
	assert.Empty(t, drain(t, ps[1]))
	clk.Advance(12 * time.Millisecond)
	assert.Empty(t, drain(t, ps[1]), "3ms ingress + 10ms egress not yet elapsed")
	clk.Advance(time.Millisecond)
	assert.Len(t, drain(t, ps[1]), 1)

	// A blocked reader is woken by the clock.
	require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), 2, 60)))
	done := make(chan error, 1)
	go func() {
		_, err := ps[1].ReadFrame(context.Background(), make([]byte, 128))
		done <- err
	}()
	require.Eventually(t, func() bool { return clk.Waiters() > 0 }, 5*time.Second, time.Millisecond)
	select {
	case <-done:
		t.Fatal("frame delivered before its latency elapsed")
	default:
	}
	clk.Advance(13 * time.Millisecond)
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("reader not woken after latency")
	}
}

func TestBandwidth(t *testing.T) {
	// 1000 B/s on the receiving link: 100-byte frames leave every 100ms.
	_, ps, clk := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{Bandwidth: 1000})
	for i := range 3 {
		require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), i, 100)))
	}
	var counts []int
	for range 4 {
		counts = append(counts, len(drain(t, ps[1])))
		clk.Advance(100 * time.Millisecond)
	}
	assert.Equal(t, []int{0, 1, 1, 1}, counts)

	// Beyond MaxShapingDelay (1s = 1000 bytes) frames are dropped.
	for i := range 15 {
		require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(1), i, 100)))
	}
	assert.Equal(t, uint64(5), ps[1].Stats().DroppedOverflow)
}

func TestSlowReaderDoesNotBlockOthers(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{Clock: ratelimit.SystemClock{}},
		LinkOptions{}, LinkOptions{QueueLen: 2000}, LinkOptions{QueueLen: 8})
	a, b, stuck := ps[0], ps[1], ps[2]
	const n = 1000
	for i := range n {
		require.NoError(t, a.WriteFrame(frame(broadcast, macN(1), i, 60)))
	}
	assert.Len(t, drain(t, b), n)
	assert.Equal(t, uint64(n-8), stuck.Stats().DroppedOverflow)
	assert.Len(t, drain(t, stuck), 8)
}

func TestInvalidFrames(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{}, LinkOptions{}, LinkOptions{})
	var fe *netback.FrameError
	require.ErrorAs(t, ps[0].WriteFrame(make([]byte, 13)), &fe)
	require.ErrorAs(t, ps[0].WriteFrame(make([]byte, netback.MaxFrameLen+1)), &fe)
	require.ErrorAs(t, ps[0].WriteFrame(frame(macN(2), broadcast, 1, 60)), &fe)
	assert.Equal(t, uint64(3), ps[0].Stats().DroppedInvalid)
	assert.Empty(t, drain(t, ps[1]))
}

func TestLinkOptionValidation(t *testing.T) {
	s := New(Options{})
	defer s.Close()
	for _, l := range []LinkOptions{{Loss: -0.1}, {Loss: 1.5}, {Latency: -1}, {Bandwidth: -1}, {QueueLen: -1}} {
		_, err := s.AddPort("x", l)
		var oe *OptionError
		assert.ErrorAs(t, err, &oe, "%+v", l)
	}
	p, err := s.AddPort("x", LinkOptions{})
	require.NoError(t, err)
	var oe *OptionError
	require.ErrorAs(t, p.SetLink(LinkOptions{Loss: 2}), &oe)
	require.NoError(t, p.SetLink(LinkOptions{Loss: 0.5}))
	assert.Equal(t, 0.5, p.Link().Loss)
	require.NoError(t, s.Close())
	_, err = s.AddPort("y", LinkOptions{})
	require.ErrorIs(t, err, ErrSwitchClosed)
}

func TestMACTableBounded(t *testing.T) {
	s, ps, _ := newTestSwitch(t, Options{MaxMACs: 4}, LinkOptions{}, LinkOptions{QueueLen: 100})
	for i := range 10 {
		require.NoError(t, ps[0].WriteFrame(frame(broadcast, macN(100+i), i, 60)))
	}
	learned := 0
	for i := range 10 {
		if _, ok := s.Lookup(macN(100 + i)); ok {
			learned++
		}
	}
	assert.Equal(t, 4, learned)
}

func TestHundredPorts(t *testing.T) {
	const n = 100
	links := make([]LinkOptions, n)
	_, ps, _ := newTestSwitch(t, Options{}, links...)
	for i, p := range ps {
		require.NoError(t, p.WriteFrame(frame(broadcast, macN(i), 0, 60)))
	}
	for i, p := range ps {
		assert.Len(t, drain(t, p), n-1, "port %d broadcasts", i)
	}
	for i, p := range ps {
		require.NoError(t, p.WriteFrame(frame(macN((i+1)%n), macN(i), i, 60)))
	}
	for i, p := range ps {
		got := drain(t, p)
		require.Len(t, got, 1, "port %d", i)
		assert.Equal(t, macN((i+n-1)%n), [6]byte(got[0][6:12]))
		assert.Zero(t, p.Stats().DroppedOverflow)
	}
}

func TestConcurrentTraffic(t *testing.T) {
	_, ps, _ := newTestSwitch(t, Options{Clock: ratelimit.SystemClock{}}, make([]LinkOptions, 8)...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := range 500 {
				_ = p.WriteFrame(frame(macN((i+1)%len(ps)), macN(i), j, 60))
			}
		}()
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				rctx, rcancel := context.WithTimeout(ctx, 200*time.Millisecond)
				_, err := p.ReadFrame(rctx, buf)
				rcancel()
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	var in, out, dropped uint64
	for _, p := range ps {
		s := p.Stats()
		in += s.IngressFrames
		out += s.EgressFrames
		dropped += s.DroppedOverflow
	}
	assert.Equal(t, uint64(8*500), in)
	assert.Positive(t, out)
	assert.LessOrEqual(t, out, in*7)
}

func ExampleSwitch() {
	sw := New(Options{})
	defer sw.Close()
	vm1, _ := sw.AddPort("vm1", LinkOptions{})
	vm2, _ := sw.AddPort("vm2", LinkOptions{Latency: time.Millisecond})

	f := make([]byte, 60)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], []byte{0x52, 0x54, 0, 0, 0, 1})
	_ = vm1.WriteFrame(f)

	buf := make([]byte, 1514)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	n, err := vm2.ReadFrame(ctx, buf)
	fmt.Println(n, err, vm1.Stats().Flooded)
	// Output: 60 <nil> 1
}

func BenchmarkUnicast(b *testing.B) {
	for _, nports := range []int{2, 100} {
		b.Run(fmt.Sprintf("ports=%d", nports), func(b *testing.B) {
			s := New(Options{QueueLen: 4096})
			defer s.Close()
			ps := make([]*Port, nports)
			for i := range ps {
				ps[i], _ = s.AddPort(fmt.Sprint(i), LinkOptions{})
				_ = ps[i].WriteFrame(frame(broadcast, macN(i), 0, 60))
			}
			for _, p := range ps {
				for {
					ctx, cancel := context.WithCancel(context.Background())
					cancel()
					if _, err := p.ReadFrame(ctx, make([]byte, 2048)); err != nil {
						break
					}
				}
			}
			f := frame(macN(1), macN(0), 1, 1514)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan int)
			go func() {
				buf := make([]byte, 2048)
				got := 0
				for {
					if _, err := ps[1].ReadFrame(ctx, buf); err != nil {
						done <- got
						return
					}
					got++
				}
			}()
			b.SetBytes(int64(len(f)))
			b.ResetTimer()
			start := time.Now()
			for b.Loop() {
				_ = ps[0].WriteFrame(f)
			}
			elapsed := time.Since(start)
			time.Sleep(10 * time.Millisecond)
			cancel()
			got := <-done
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "frames/s")
			b.ReportMetric(float64(ps[1].Stats().DroppedOverflow)/float64(b.N), "drop-ratio")
			_ = got
		})
	}
}
