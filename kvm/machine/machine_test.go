package machine_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/gob"
	"hash/crc32"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

func requireKVM(t testing.TB) {
	t.Helper()
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
}

// syncBuffer is a goroutine-safe bytes.Buffer for serial output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newGuest(t testing.TB, name string, cfg machine.Config, params *guests.Params) *machine.Machine {
	t.Helper()
	img, gm, err := guests.Get(name)
	require.NoError(t, err)
	m, err := machine.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	mode := machine.Mode(0)
	if gm == guests.ModeReal {
		mode, _ = machine.ParseMode("real")
	}
	require.NoError(t, m.LoadFlat(img, mode))
	if params != nil {
		require.NoError(t, params.WriteTo(m.Mem()))
	}
	return m
}

func run(t testing.TB, m *machine.Machine) (kvm.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return m.Run(ctx)
}

func TestGuests(t *testing.T) {
	requireKVM(t)
	cases := []struct {
		guest    string
		cpus     int
		irqchip  bool
		params   *guests.Params
		in       string
		wantOut  string
		wantCode int // -1: crash
		wantKind kvm.CrashKind
	}{
		{guest: "hello64", wantOut: "Hello from a kvmkit long-mode guest!\r\n"},
		{guest: "hello16", wantOut: "Hello from a kvmkit real-mode guest!\r\n"},
		{guest: "hello64", irqchip: true, wantOut: "Hello from a kvmkit long-mode guest!\r\n"},
		{guest: "exit42", wantCode: 42},
		{guest: "exit42_16", wantCode: 42},
		{guest: "triple", wantCode: -1, wantKind: kvm.CrashTripleFault},
		{guest: "triple16", wantCode: -1, wantKind: kvm.CrashTripleFault},
		{guest: "smp", cpus: 2, wantOut: "smp: 2 vCPUs up\r\n"},
		{guest: "smp", cpus: 4, irqchip: true, wantOut: "smp: 4 vCPUs up\r\n"},
		{guest: "pioloop", params: &guests.Params{Iterations: 1000}},
		{guest: "pioloop16", params: &guests.Params{Iterations: 1000}},
		{guest: "mmioloop", params: &guests.Params{Iterations: 1000}},
		{guest: "dirty", params: &guests.Params{DirtySize: 4 << 20, DirtyPasses: 3}},
		{guest: "dirty", cpus: 2, params: &guests.Params{DirtySize: 4 << 20, DirtyPasses: 3}},
		{guest: "echo", in: "kvmkit q", wantOut: "kvmkit q"},
	}
	for _, c := range cases {
		name := c.guest
		if c.cpus > 1 {
			name += "/smp"
		}
		t.Run(name, func(t *testing.T) {
			var out syncBuffer
			cfg := machine.Config{CPUs: c.cpus, Serial: &out, NoIRQChip: !c.irqchip, MemSize: 64 << 20}
			if c.in != "" {
				cfg.SerialIn = strings.NewReader(c.in)
			}
			m := newGuest(t, c.guest, cfg, c.params)
			res, err := run(t, m)
			if c.wantCode < 0 {
				var gc *kvm.GuestCrash
				require.ErrorAs(t, err, &gc)
				assert.Equal(t, c.wantKind, gc.Kind)
				return
			}
			require.NoError(t, err, "serial: %q", out.String())
			assert.Equal(t, kvm.StopExitPort, res.Reason)
			assert.Equal(t, uint8(c.wantCode), res.ExitCode, "serial: %q", out.String())
			if c.wantOut != "" {
				assert.Contains(t, out.String(), c.wantOut)
			}
		})
	}
}

// TestUnhandledAccessesAreCounted: the pio loop writes to 0xE0 which has
// no device; the machine keeps running and counts the drops.
func TestUnhandledAccessesAreCounted(t *testing.T) {
	requireKVM(t)
	m := newGuest(t, "pioloop", machine.Config{NoIRQChip: true}, &guests.Params{Iterations: 500})
	res, err := run(t, m)
	require.NoError(t, err)
	assert.Equal(t, uint8(0), res.ExitCode)
	_, w := m.PIO().Unhandled()
	assert.Equal(t, uint64(500), w)
}

// dataPort collects compute's values and stops after n of them.
type dataPort struct {
	mu   sync.Mutex
	vals []uint32
	n    int
	stop func()
	hit  atomic.Bool
}

func (d *dataPort) Read(uint64, []byte) {}
func (d *dataPort) Write(_ uint64, b []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(b) == 4 {
		d.vals = append(d.vals, binary.LittleEndian.Uint32(b))
	}
	if len(d.vals) == d.n && !d.hit.Swap(true) && d.stop != nil {
		d.stop()
	}
}

// TestSaveRestoreCompute pauses the compute guest mid-run, moves its full
// state and memory into a fresh machine and checks that the sequence goes
// on exactly as the reference model says: registers, SSE, flags and stack
// survive the trip.
func TestSaveRestoreCompute(t *testing.T) {
	requireKVM(t)
	for _, irqchip := range []bool{false, true} {
		cfg := machine.Config{NoIRQChip: !irqchip, MemSize: 16 << 20}
		src := newGuest(t, "compute", cfg, &guests.Params{Iterations: 0})
		dp := &dataPort{n: 300}
		require.NoError(t, src.PIO().Register(guests.DataPort, 4, dp))
		require.NoError(t, src.Start(context.Background()))
		waitFor(t, func() bool { return dp.hit.Load() || src.Runner().Exits() > 1e6 || isDone(src) })
		if !dp.hit.Load() {
			_, err := src.Wait()
			t.Fatalf("compute produced %d values, %d exits; run ended: %v", len(dp.vals), src.Runner().Exits(), err)
		}
		require.NoError(t, src.Pause(context.Background()))
		st, err := src.SaveState()
		require.NoError(t, err)
		enc, err := st.Bytes()
		require.NoError(t, err)
		dp.mu.Lock()
		seen := len(dp.vals)
		dp.mu.Unlock()
		src.Stop(kvm.Result{Reason: kvm.StopCanceled})
		_, _ = src.Wait()

		dst, err := machine.New(cfg)
		require.NoError(t, err)
		t.Cleanup(func() { dst.Close() })
		for i, r := range src.Mem().Regions() {
			_, err := dst.Mem().WriteAt(r.Host, int64(dst.Mem().Regions()[i].GPA))
			require.NoError(t, err)
		}
		st2, err := machine.DecodeState(bytes.NewReader(enc))
		require.NoError(t, err)
		require.NoError(t, dst.RestoreState(st2))
		dp2 := &dataPort{n: 100}
		dp2.stop = func() { dst.Stop(kvm.Result{Reason: kvm.StopExitPort}) }
		require.NoError(t, dst.PIO().Register(guests.DataPort, 4, dp2))
		_, err = run(t, dst)
		require.NoError(t, err)

		want := guests.ComputeSequence(seen + 100)
		assert.Equal(t, want[:seen], dp.vals[:seen], "source follows the model")
		assert.Equal(t, want[seen:seen+100], dp2.vals[:100], "restored machine continues the sequence (irqchip=%v)", irqchip)
	}
}

func TestContextCancelStopsGuest(t *testing.T) {
	requireKVM(t)
	m := newGuest(t, "pioloop", machine.Config{}, nil) // forever
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	res, err := m.Run(ctx)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, kvm.StopCanceled, res.Reason)
}

// TestWatchdog: the idle guest halts forever; with the in-kernel irqchip a
// halt makes no exits, so the watchdog reports a stalled guest.
func TestWatchdog(t *testing.T) {
	requireKVM(t)
	m := newGuest(t, "idle", machine.Config{Watchdog: 300 * time.Millisecond}, nil)
	_, err := run(t, m)
	var gc *kvm.GuestCrash
	require.ErrorAs(t, err, &gc)
	assert.Equal(t, kvm.CrashWatchdog, gc.Kind)
	assert.Contains(t, gc.Error(), "no progress")
}

func TestConfigErrors(t *testing.T) {
	cases := []machine.Config{
		{MemSize: 1000},
		{MemSize: 512 << 10},
		{CPUs: 65},
		{CPUs: -1},
	}
	for _, c := range cases {
		_, err := machine.New(c)
		assert.Error(t, err)
	}
}

func isDone(m *machine.Machine) bool {
	select {
	case <-m.Runner().Done():
		return true
	default:
		return false
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20s")
		}
		time.Sleep(200 * time.Microsecond)
	}
}

func FuzzDecodeState(f *testing.F) {
	st := &machine.State{VCPUs: []kvm.VCPUState{{ID: 1}}, Devices: map[string][]byte{"x": {1}}}
	b, err := st.Bytes()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte("KVMKSTAT\x01\x00\x00\x00\xff\xff\xff\xff"))
	f.Add([]byte("KVMKSTAT\x02\x00\x00\x00\x04\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00"))
	full := &machine.State{VCPUs: []kvm.VCPUState{{ID: 0, CPUID: make([]kvm.CPUIDEntry, 2), MSRs: make([]kvm.MSREntry, 3)}},
		VM: kvm.VMState{HasIRQChip: true, HasPIT: true}, Devices: map[string][]byte{"uart": {1, 2}, "virtio-blk": nil}}
	if b, err := full.Bytes(); err == nil {
		f.Add(b)
	}
	var v1 bytes.Buffer // a version-1 (gob) state as earlier builds wrote it
	if err := gob.NewEncoder(&v1).Encode(full); err == nil {
		p := v1.Bytes()
		h := append([]byte("KVMKSTAT"), 1, 0, 0, 0)
		h = binary.LittleEndian.AppendUint32(h, uint32(len(p)))
		h = append(h, p...)
		f.Add(binary.LittleEndian.AppendUint32(h, crc32.Checksum(p, crc32.MakeTable(crc32.Castagnoli))))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := machine.DecodeState(bytes.NewReader(data))
		if err != nil {
			var se *machine.StateError
			require.ErrorAs(t, err, &se, "errors are typed")
			return
		}
		// What decodes encodes again and decodes to the same state (a
		// version-1 state may name a device too long for version 2).
		enc, err := s.Bytes()
		if err != nil {
			require.ErrorContains(t, err, "longer than")
			return
		}
		s2, err := machine.DecodeState(bytes.NewReader(enc))
		require.NoError(t, err)
		require.Equal(t, s, s2)
	})
}
