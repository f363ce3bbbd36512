package pci_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/internal/vtest"
	"github.com/kvmkit/kvmkit/virtio/pci"
	"github.com/kvmkit/kvmkit/virtio/rng"
)

// movedBAR is where the driver under test moves BAR0 before starting the
// device, so that restore must re-register it away from Options.BARAddr.
const movedBAR = 0xd0000000

// recIRQ records an INTx line level.
type recIRQ struct {
	mu   sync.Mutex
	high bool
}

func (r *recIRQ) SetLevel(high bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.high = high
	return nil
}

func (r *recIRQ) level() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.high
}

func (m *msiLog) all() [][2]uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([][2]uint64(nil), m.msgs...)
}

func newMem(tb testing.TB) *kvm.Memory {
	tb.Helper()
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(tb, err)
	tb.Cleanup(func() { mem.Close() })
	return mem
}

func testCtx(tb testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	tb.Cleanup(cancel)
	return c
}

// envOpts configure newEnvOn.
type envOpts struct {
	noMSI   bool
	irq     kvm.IRQ
	vectors int
	fill    byte // the rng device's entropy: this byte repeated
}

// newEnvOn builds a host bridge, an MMIO bus and a virtio-rng transport
// with BAR0 at barBase, on mem (shared with other environments, as guest
// RAM is across a save and restore). Cleanup resets the device.
func newEnvOn(tb testing.TB, mem *kvm.Memory, o envOpts) (*env, *rng.Device) {
	tb.Helper()
	e := &env{pio: kvm.NewBus(), mmio: kvm.NewBus(), mem: mem, msi: &msiLog{}}
	if tt, ok := tb.(*testing.T); ok {
		e.t = tt
	}
	hb := pci.NewHostBridge()
	require.NoError(tb, e.pio.Register(pci.ConfigPortBase, pci.ConfigPortSize, hb))
	opts := pci.Options{Bus: e.mmio, BARAddr: barBase, IRQ: o.irq, IRQLine: 5, Vectors: o.vectors}
	if !o.noMSI {
		opts.MSI = e.msi
	}
	dev := rng.New(rng.Options{Source: bytes.NewReader(bytes.Repeat([]byte{o.fill}, 1<<16))})
	var err error
	e.tr, err = pci.New(dev, mem, opts)
	require.NoError(tb, err)
	e.slot, err = hb.Add(e.tr)
	require.NoError(tb, err)
	tb.Cleanup(func() { e.tr.BAR().Write(pci.CommonOffset+0x14, []byte{0}) })
	return e, dev
}

// driver is a Go virtio-pci driver for the rng device's request queue.
type driver struct {
	bar uint64 // BAR0 address
	d   *vtest.Driver
	q   *vtest.Queue
	// consumed counts the used buffers the driver has taken.
	consumed uint16
}

func (dr *driver) common(off uint64) uint64 { return dr.bar + pci.CommonOffset + off }

// initDriver moves BAR0 to movedBAR, sets the interrupt line, optionally
// enables MSI-X with vector v at data 0x40+v, and negotiates VERSION_1.
func initDriver(tb testing.TB, e *env, msix bool) *driver {
	tb.Helper()
	dr := &driver{bar: movedBAR, d: vtest.NewDriver(nil, e.mem, 0x1000)}
	e.cfgWrite(e.slot, 0x04, 2, 0)
	e.cfgWrite(e.slot, 0x10, 4, movedBAR)
	e.cfgWrite(e.slot, 0x14, 4, 0)
	e.cfgWrite(e.slot, 0x04, 2, 0x6)
	e.cfgWrite(e.slot, 0x3c, 1, 11)
	if msix {
		e.cfgWrite(e.slot, 0x84+2, 2, 0x8000)
		for v := uint64(0); v < 2; v++ {
			ent := dr.bar + pci.MSIXTableOff + 16*v
			e.w(ent, 8, 0xfee00000)
			e.w(ent+8, 4, 0x40+v)
			e.w(ent+12, 4, 0) // unmask
		}
	}
	e.w8(dr.common(0x14), uint64(virtio.StatusAcknowledge|virtio.StatusDriver))
	e.w(dr.common(0x08), 4, 1)
	e.w(dr.common(0x0c), 4, 1) // VERSION_1
	e.w8(dr.common(0x14), uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	require.NotZero(tb, e.r(dr.common(0x14), 1)&uint64(virtio.StatusFeaturesOK))
	e.w(dr.common(0x10), 2, 0) // config vector 0
	return dr
}

// startDriver sets up queue 0 (size 8, vector 1) and sets DRIVER_OK.
func startDriver(tb testing.TB, e *env, msix bool) *driver {
	tb.Helper()
	dr := initDriver(tb, e, msix)
	dr.q = dr.d.NewRawQueue(8)
	e.w(dr.common(0x16), 2, 0)
	e.w(dr.common(0x18), 2, 8)
	e.w(dr.common(0x1a), 2, 1)
	e.w(dr.common(0x20), 8, dr.q.Desc)
	e.w(dr.common(0x28), 4, dr.q.Avail)
	e.w(dr.common(0x2c), 4, 0)
	e.w(dr.common(0x30), 8, dr.q.Used)
	e.w(dr.common(0x1c), 2, 1)
	e.w8(dr.common(0x14), uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	require.Zero(tb, e.r(dr.common(0x14), 1)&uint64(virtio.StatusDeviceNeedsReset), "err: %v", e.tr.Err())
	return dr
}

// post makes a 16-byte writable buffer available and returns its address.
func (dr *driver) post() uint64 {
	buf := dr.d.Alloc(16, 8)
	dr.q.Post(vtest.Buf{Addr: buf, Len: 16, Write: true})
	return buf
}

// notify writes queue 0's notify address through e's bus.
func (dr *driver) notify(e *env) { e.w(dr.bar+pci.NotifyOffset, 2, 0) }

// waitFilled waits for the next used buffer and checks that buf holds
// the fill byte of the device that served it.
func (dr *driver) waitFilled(t *testing.T, buf uint64, fill byte) {
	t.Helper()
	u, err := dr.q.WaitUsed(testCtx(t))
	require.NoError(t, err)
	dr.consumed++
	assert.EqualValues(t, 16, u.Len)
	got := make([]byte, 16)
	_, err = dr.d.Mem.ReadAt(got, int64(buf))
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{fill}, 16), got)
}

// noneUsed asserts that the device publishes no used buffer for a while.
func (dr *driver) noneUsed(t *testing.T) {
	t.Helper()
	// Polled on the test goroutine: assert.Never's condition goroutine may
	// outlive it and race with the test's later reads.
	for deadline := time.Now().Add(50 * time.Millisecond); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if !assert.Equal(t, dr.consumed, dr.q.UsedIdx(), "device used a buffer") {
			return
		}
	}
}

// snapshot reads what the guest can see of a transport: all 256 bytes of
// configuration space (directly and through the host bridge) and the BAR0
// registers at bar (common configuration, ISR, MSI-X table and PBA, device
// configuration). Reads have no side effects except clearing the ISR.
func snapshot(e *env, bar uint64) map[string]uint64 {
	s := map[string]uint64{}
	cfg := make([]byte, 256)
	e.tr.ReadConfig(0, cfg)
	for i, b := range cfg {
		s[fmt.Sprintf("cfg[%#x]", i)] = uint64(b)
	}
	for off := uint32(0); off < 256; off += 4 {
		s[fmt.Sprintf("bridge[%#x]", off)] = uint64(e.cfgRead(e.slot, off, 4))
	}
	common := []struct {
		off uint64
		n   int
	}{
		{0x00, 4}, {0x04, 4}, {0x08, 4}, {0x0c, 4}, {0x10, 2}, {0x12, 2}, {0x14, 1}, {0x15, 1},
		{0x16, 2}, {0x18, 2}, {0x1a, 2}, {0x1c, 2}, {0x1e, 2},
		{0x20, 4}, {0x24, 4}, {0x28, 4}, {0x2c, 4}, {0x30, 4}, {0x34, 4},
	}
	for _, c := range common {
		s[fmt.Sprintf("common[%#x]", c.off)] = e.r(bar+pci.CommonOffset+c.off, c.n)
	}
	s["isr"] = e.r(bar+pci.ISROffset, 1)
	for off := uint64(0); off < 2*16; off += 4 {
		s[fmt.Sprintf("msix[%#x]", off)] = e.r(bar+pci.MSIXTableOff+off, 4)
	}
	s["pba"] = e.r(bar+pci.MSIXPBAOffset, 8)
	s["device"] = e.r(bar+pci.DeviceOffset, 8)
	return s
}

func TestSaveRestoreRoundTrip(t *testing.T) {
	tests := []struct {
		name        string
		pauseTarget bool // Pause the target before RestoreState
	}{
		{"restore running", false},
		{"restore paused then resume", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newMem(t)
			src, _ := newEnvOn(t, mem, envOpts{fill: 0x5a})
			dr := startDriver(t, src, true)
			buf := dr.post()
			dr.notify(src)
			dr.waitFilled(t, buf, 0x5a)
			require.Eventually(t, func() bool { return src.msi.count() == 1 }, time.Second, time.Millisecond)
			// Non-default selectors, to be carried over.
			src.w(dr.common(0x00), 4, 1)
			src.w(dr.common(0x08), 4, 1)

			_, err := src.tr.SaveState()
			require.ErrorIs(t, err, pci.ErrNotPaused)
			src.tr.Pause()
			src.tr.Pause() // idempotent
			pending := dr.post()
			dr.notify(src)
			src.tr.NotifyQueue(0)
			dr.noneUsed(t)
			st, err := src.tr.SaveState()
			require.NoError(t, err)
			again, err := src.tr.SaveState()
			require.NoError(t, err)
			require.Equal(t, string(st), string(again), "saving is deterministic")

			dst, _ := newEnvOn(t, mem, envOpts{fill: 0xa5})
			if tt.pauseTarget {
				dst.tr.Pause()
			}
			require.NoError(t, dst.tr.RestoreState(st))
			_, _, ok := dst.mmio.Lookup(movedBAR + pci.CommonOffset)
			assert.True(t, ok, "BAR0 registered at the programmed address")
			_, _, ok = dst.mmio.Lookup(barBase)
			assert.False(t, ok, "and not at Options.BARAddr")

			if tt.pauseTarget {
				dr.noneUsed(t)
				st2, err := dst.tr.SaveState()
				require.NoError(t, err)
				assert.Equal(t, string(st), string(st2), "save-restore-save is exact")
			}
			assert.Equal(t, snapshot(src, movedBAR), snapshot(dst, movedBAR))
			// The same again with other selectors.
			for _, e := range []*env{src, dst} {
				e.w(dr.common(0x00), 4, 0)
				e.w(dr.common(0x16), 2, 1)
			}
			assert.Equal(t, snapshot(src, movedBAR), snapshot(dst, movedBAR))
			dst.w(dr.common(0x16), 2, 0)

			if tt.pauseTarget {
				dst.tr.Resume()
				dst.tr.Resume() // idempotent
			}
			// The buffer made available before the save is served by the
			// restored device, which signals queue 0's vector 1.
			dr.waitFilled(t, pending, 0xa5)
			require.Eventually(t, func() bool { return dst.msi.count() == 1 }, time.Second, time.Millisecond)
			assert.Equal(t, [][2]uint64{{0xfee00000, 0x41}}, dst.msi.all())

			// A new request, notified through the restored BAR.
			buf = dr.post()
			dr.notify(dst)
			dr.waitFilled(t, buf, 0xa5)
			require.Eventually(t, func() bool { return dst.msi.count() == 2 }, time.Second, time.Millisecond)
			assert.Equal(t, [2]uint64{0xfee00000, 0x41}, dst.msi.all()[1])
			assert.Equal(t, 1, src.msi.count(), "the paused source stays quiet")
		})
	}
}

func TestPauseResume(t *testing.T) {
	tests := []struct {
		name          string
		beforeStartup bool // Pause before the driver sets DRIVER_OK
	}{
		{"pause running device", false},
		{"activate while paused", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newMem(t)
			e, dev := newEnvOn(t, mem, envOpts{fill: 7})
			if tt.beforeStartup {
				e.tr.Pause()
			}
			dr := startDriver(t, e, true)
			if !tt.beforeStartup {
				e.tr.Pause()
			}
			e.tr.Pause()
			buf := dr.post()
			dr.notify(e)
			e.tr.NotifyQueue(0)
			dev.QueueNotify(0) // bypassing the transport: the device itself is paused
			dr.noneUsed(t)
			assert.Zero(t, e.msi.count())

			e.tr.Resume()
			e.tr.Resume()
			dr.waitFilled(t, buf, 7)
			require.Eventually(t, func() bool { return e.msi.count() == 1 }, time.Second, time.Millisecond)

			buf = dr.post()
			dr.notify(e)
			dr.waitFilled(t, buf, 7)
		})
	}
}

func TestSaveStateNeedsPause(t *testing.T) {
	mem := newMem(t)
	e, _ := newEnvOn(t, mem, envOpts{})
	_, err := e.tr.SaveState()
	assert.NoError(t, err, "a device the driver has not started needs no pause")
	dr := startDriver(t, e, true)
	_, err = e.tr.SaveState()
	assert.ErrorIs(t, err, pci.ErrNotPaused)
	e.tr.Pause()
	_, err = e.tr.SaveState()
	assert.NoError(t, err)
	e.tr.Resume()
	_, err = e.tr.SaveState()
	assert.ErrorIs(t, err, pci.ErrNotPaused)
	e.w8(dr.common(0x14), 0) // reset
	_, err = e.tr.SaveState()
	assert.NoError(t, err)
}

func TestRestoreINTx(t *testing.T) {
	mem := newMem(t)
	srcIRQ, dstIRQ := &recIRQ{}, &recIRQ{}
	src, _ := newEnvOn(t, mem, envOpts{noMSI: true, irq: srcIRQ, fill: 1})
	dr := startDriver(t, src, false)
	assert.EqualValues(t, pci.NoVector, src.r(dr.common(0x1a), 2), "no MSI-X: vectors read back NoVector")
	buf := dr.post()
	dr.notify(src)
	dr.waitFilled(t, buf, 1)
	require.Eventually(t, srcIRQ.level, time.Second, time.Millisecond)
	src.tr.Pause()
	st, err := src.tr.SaveState()
	require.NoError(t, err)

	dst, _ := newEnvOn(t, mem, envOpts{noMSI: true, irq: dstIRQ, fill: 2})
	require.NoError(t, dst.tr.RestoreState(st))
	assert.True(t, dstIRQ.level(), "the asserted line is restored")
	cfg := make([]byte, 256)
	want := make([]byte, 256)
	src.tr.ReadConfig(0, want)
	dst.tr.ReadConfig(0, cfg)
	assert.Equal(t, want, cfg)
	assert.EqualValues(t, 1, dst.r(movedBAR+pci.ISROffset, 1), "used-buffer bit")
	assert.False(t, dstIRQ.level(), "reading the ISR lowers the line")

	buf = dr.post()
	dr.notify(dst)
	dr.waitFilled(t, buf, 2)
	require.Eventually(t, dstIRQ.level, time.Second, time.Millisecond)
}

// mutateState decodes a saved state, lets edit change its envelope and data
// and encodes it again.
func mutateState(t *testing.T, st []byte, edit func(env, data map[string]any)) []byte {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(st))
	dec.UseNumber()
	var envelope map[string]any
	require.NoError(t, dec.Decode(&envelope))
	data := envelope["data"].(map[string]any)
	edit(envelope, data)
	b, err := json.Marshal(envelope)
	require.NoError(t, err)
	return b
}

// editConfig changes byte off of the saved configuration space.
func editConfig(off int, v byte) func(_, data map[string]any) {
	return func(_, data map[string]any) {
		cfg, err := base64.StdEncoding.DecodeString(data["config"].(string))
		if err != nil {
			panic(err)
		}
		cfg[off] = v
		data["config"] = base64.StdEncoding.EncodeToString(cfg)
	}
}

// occupied is a device squatting on the restored BAR0 address.
type occupied struct{}

func (occupied) Read(uint64, []byte)  {}
func (occupied) Write(uint64, []byte) {}

func TestRestoreRejects(t *testing.T) {
	mem := newMem(t)
	src, _ := newEnvOn(t, mem, envOpts{})
	initDriver(t, src, true) // FEATURES_OK, MSI-X on, config vector 0
	st, err := src.tr.SaveState()
	require.NoError(t, err)

	edit := func(f func(env, data map[string]any)) []byte { return mutateState(t, st, f) }
	set := func(key string, v any) []byte {
		return edit(func(_, data map[string]any) { data[key] = v })
	}
	tests := []struct {
		name   string
		state  []byte
		opts   envOpts
		target func(e *env) // prepares the target transport
		is     error        // nil: a *virtio.StateVersionError
		plain  bool         // the error is not a *virtio.StateError
	}{
		{name: "truncated", state: st[:len(st)/2], is: virtio.ErrStateCorrupt},
		{name: "not JSON", state: []byte("\x00garbage"), is: virtio.ErrStateCorrupt},
		{name: "empty", state: nil, is: virtio.ErrStateCorrupt},
		{name: "wrong kind", state: edit(func(env, _ map[string]any) { env["kind"] = "virtio-mmio" }), is: virtio.ErrStateMismatch},
		{name: "newer version", state: edit(func(env, _ map[string]any) { env["version"] = 2 })},
		{name: "unknown field", state: set("extra", 1), is: virtio.ErrStateCorrupt},
		{name: "status overflow", state: set("status", 300), is: virtio.ErrStateCorrupt},
		{name: "device type", state: set("device_type", 3), is: virtio.ErrStateMismatch},
		{name: "queue count", state: edit(func(_, data map[string]any) {
			data["queues"] = append(data["queues"].([]any), data["queues"].([]any)[0])
			data["queue_vectors"] = append(data["queue_vectors"].([]any), 0xffff)
		}), is: virtio.ErrStateMismatch},
		{name: "queue max size", state: edit(func(_, data map[string]any) {
			data["queues"].([]any)[0].(map[string]any)["max_size"] = 128
		}), is: virtio.ErrStateMismatch},
		{name: "MSI-X table size", state: st, opts: envOpts{vectors: 4}, is: virtio.ErrStateMismatch},
		{name: "no MSI sender", state: st, opts: envOpts{noMSI: true}, is: virtio.ErrStateMismatch},
		{name: "features not offered", state: set("driver_features", uint64(1)<<32|1<<40), is: virtio.ErrStateMismatch},
		{name: "config space length", state: set("config", base64.StdEncoding.EncodeToString(make([]byte, 10))), is: virtio.ErrStateCorrupt},
		{name: "config space identity", state: edit(editConfig(0x02, 0x99)), is: virtio.ErrStateMismatch},
		{name: "command register", state: edit(editConfig(0x04, 0x86)), is: virtio.ErrStateCorrupt},
		{name: "BAR register", state: edit(editConfig(0x11, 0x10)), is: virtio.ErrStateCorrupt},
		{name: "BAR unaligned", state: set("bar_addr", movedBAR+0x1000), is: virtio.ErrStateCorrupt},
		{name: "config vector", state: set("config_vector", 2), is: virtio.ErrStateCorrupt},
		{name: "queue vector", state: set("queue_vectors", []int{7}), is: virtio.ErrStateCorrupt},
		{name: "queue vectors count", state: set("queue_vectors", []int{}), is: virtio.ErrStateCorrupt},
		{name: "MSI-X control", state: set("msix_control", 0x8001), is: virtio.ErrStateCorrupt},
		{name: "MSI-X entry control", state: edit(func(_, data map[string]any) {
			data["msix"].([]any)[1].(map[string]any)["ctl"] = 3
		}), is: virtio.ErrStateCorrupt},
		{name: "pending vector", state: set("pending", []int{2}), is: virtio.ErrStateCorrupt},
		{name: "device state", state: set("device", map[string]any{"kind": "virtio-rng", "version": 1, "data": map[string]any{"x": 1}}), is: virtio.ErrStateCorrupt},
		{name: "device state kind", state: set("device", map[string]any{"kind": "virtio-blk", "version": 1, "data": map[string]any{}}), is: virtio.ErrStateMismatch},
		{name: "not fresh", state: st, is: pci.ErrNotFresh, plain: true, target: func(e *env) {
			e.w8(barBase+pci.CommonOffset+0x14, uint64(virtio.StatusAcknowledge))
		}},
		{name: "BAR address taken", state: st, plain: true, target: func(e *env) {
			require.NoError(t, e.mmio.Register(movedBAR+0x1000, 0x1000, occupied{}))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst, _ := newEnvOn(t, mem, tt.opts)
			if tt.target != nil {
				tt.target(dst)
			}
			before := snapshot(dst, barBase)
			err := dst.tr.RestoreState(tt.state)
			require.Error(t, err)
			switch {
			case tt.is != nil:
				assert.ErrorIs(t, err, tt.is)
			case !tt.plain:
				var ve *virtio.StateVersionError
				require.ErrorAs(t, err, &ve)
				assert.EqualValues(t, 2, ve.Got)
				assert.EqualValues(t, 1, ve.Want)
			}
			if tt.is != nil && !tt.plain {
				var se *virtio.StateError
				assert.ErrorAs(t, err, &se)
			}
			assert.Equal(t, before, snapshot(dst, barBase), "a rejected state changes nothing")
		})
	}
}

// FuzzRestoreState restores arbitrary bytes into a fresh, paused transport:
// it must never panic, must fail only with typed state errors, and state it
// accepts must save again to a fixed point of save and restore.
func FuzzRestoreState(f *testing.F) {
	mem := newMem(f)
	// Seeds: a running device paused with a buffer pending, and a device
	// the driver has not started.
	src, _ := newEnvOn(f, mem, envOpts{})
	dr := startDriver(f, src, true)
	src.tr.Pause()
	dr.post()
	dr.notify(src)
	st, err := src.tr.SaveState()
	require.NoError(f, err)
	f.Add(st)
	idle, _ := newEnvOn(f, mem, envOpts{})
	initDriver(f, idle, true)
	st, err = idle.tr.SaveState()
	require.NoError(f, err)
	f.Add(st)
	f.Add([]byte(`{"kind":"virtio-pci","version":1,"data":{}}`))

	fresh := func(t *testing.T) *pci.Transport {
		tr, err := pci.New(rng.New(rng.Options{Source: bytes.NewReader(nil)}), mem,
			pci.Options{Bus: kvm.NewBus(), BARAddr: barBase, MSI: &msiLog{}, IRQ: &recIRQ{}})
		require.NoError(t, err)
		tr.Pause()
		t.Cleanup(func() { tr.BAR().Write(pci.CommonOffset+0x14, []byte{0}) }) // stops workers
		return tr
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		tr := fresh(t)
		if err := tr.RestoreState(b); err != nil {
			var se *virtio.StateError
			var ve *virtio.StateVersionError
			require.True(t, errors.As(err, &se) || errors.As(err, &ve), "untyped error %v", err)
			return
		}
		s1, err := tr.SaveState()
		require.NoError(t, err)
		tr2 := fresh(t)
		require.NoError(t, tr2.RestoreState(s1))
		s2, err := tr2.SaveState()
		require.NoError(t, err)
		require.Equal(t, string(s1), string(s2))
	})
}
