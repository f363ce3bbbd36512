// Package mmio is the virtio-mmio transport (virtio 1.2 section 4.2, the
// modern "version 2" register layout): a kvm.Device for the MMIO bus that
// negotiates features, configures queues and forwards notifications and
// configuration accesses to a virtio.Device, raising a kvm.IRQ for
// interrupts.
package mmio

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
)

// Size is the size of the register window a Transport occupies on the bus.
const Size = 0x200

// Register offsets (virtio 1.2 section 4.2.2).
const (
	RegMagicValue        = 0x000
	RegVersion           = 0x004
	RegDeviceID          = 0x008
	RegVendorID          = 0x00c
	RegDeviceFeatures    = 0x010
	RegDeviceFeaturesSel = 0x014
	RegDriverFeatures    = 0x020
	RegDriverFeaturesSel = 0x024
	RegQueueSel          = 0x030
	RegQueueNumMax       = 0x034
	RegQueueNum          = 0x038
	RegQueueReady        = 0x044
	RegQueueNotify       = 0x050
	RegInterruptStatus   = 0x060
	RegInterruptACK      = 0x064
	RegStatus            = 0x070
	RegQueueDescLow      = 0x080
	RegQueueDescHigh     = 0x084
	RegQueueDriverLow    = 0x090
	RegQueueDriverHigh   = 0x094
	RegQueueDeviceLow    = 0x0a0
	RegQueueDeviceHigh   = 0x0a4
	RegSHMSel            = 0x0ac
	RegSHMLenLow         = 0x0b0
	RegSHMLenHigh        = 0x0b4
	RegSHMBaseLow        = 0x0b8
	RegSHMBaseHigh       = 0x0bc
	RegConfigGeneration  = 0x0fc
	RegConfig            = 0x100
)

// Magic is the value of RegMagicValue ("virt").
const Magic = 0x74726976

// Interrupt status bits.
const (
	InterruptUsedBuffer   = 1
	InterruptConfigChange = 2
)

// DefaultVendorID is reported in RegVendorID ("KVMK").
const DefaultVendorID = 0x4b4d564b

// ErrNotPaused is returned by SaveState on a running device that was not
// paused first.
var ErrNotPaused = errors.New("virtio-mmio: device running; Pause before SaveState")

// ErrNotFresh is returned by RestoreState on a transport the driver has
// already touched.
var ErrNotFresh = errors.New("virtio-mmio: restore into a transport that is not in reset state")

// Options configure a Transport.
type Options struct {
	// Logger receives device errors (DEVICE_NEEDS_RESET); default slog.Default().
	Logger *slog.Logger
	// VendorID overrides DefaultVendorID.
	VendorID uint32
}

// Transport is a virtio-mmio device window. It implements kvm.Device; every
// register access is 32 bits wide except in the configuration space.
type Transport struct {
	dev    virtio.Device
	mem    kvm.GuestMemory
	irq    kvm.IRQ
	log    *slog.Logger
	vendor uint32

	mu          sync.Mutex // guards the fields below and device lifecycle
	queues      []*virtio.Queue
	devFeatSel  uint32
	drvFeatSel  uint32
	drvFeatures uint64
	queueSel    uint32
	activated   bool
	paused      bool

	status    atomic.Uint32 // also set by NeedsReset from device goroutines
	configGen atomic.Uint32
	running   atomic.Bool // activated and not paused: notifications go through

	irqMu   sync.Mutex
	isr     uint32
	lastErr error
}

var _ kvm.Device = (*Transport)(nil)

// New returns a transport for dev that reads rings from mem and raises irq.
func New(dev virtio.Device, mem kvm.GuestMemory, irq kvm.IRQ, opts Options) *Transport {
	if irq == nil {
		irq = kvm.NoIRQ{}
	}
	t := &Transport{dev: dev, mem: mem, irq: irq, log: opts.Logger, vendor: opts.VendorID}
	if t.log == nil {
		t.log = slog.Default()
	}
	if t.vendor == 0 {
		t.vendor = DefaultVendorID
	}
	for _, n := range dev.QueueMaxSizes() {
		t.queues = append(t.queues, virtio.NewQueue(n))
	}
	return t
}

// CmdlineArg renders the kernel command-line option that makes Linux probe a
// virtio-mmio device at base (size bytes, interrupt line irq), for example
// "virtio_mmio.device=4K@0xd0000000:5".
func CmdlineArg(base, size uint64, irq uint32) string {
	s := fmt.Sprint(size)
	switch {
	case size != 0 && size%(1<<20) == 0:
		s = fmt.Sprintf("%dM", size>>20)
	case size != 0 && size%(1<<10) == 0:
		s = fmt.Sprintf("%dK", size>>10)
	}
	return fmt.Sprintf("virtio_mmio.device=%s@%#x:%d", s, base, irq)
}

// Device returns the device behind the transport.
func (t *Transport) Device() virtio.Device { return t.dev }

// Status returns the device status register.
func (t *Transport) Status() uint32 { return t.status.Load() }

// Err returns the error that put the device in DEVICE_NEEDS_RESET, or nil.
func (t *Transport) Err() error {
	t.irqMu.Lock()
	defer t.irqMu.Unlock()
	return t.lastErr
}

// NotifyQueue delivers a driver notification for queue i, exactly as a
// write of i to RegQueueNotify does. A VMM that registers an ioeventfd on
// base+RegQueueNotify (with datamatch i) calls it from the goroutine that
// reads the eventfd (see virtio.WatchEventFD).
func (t *Transport) NotifyQueue(i int) {
	if t.running.Load() {
		t.dev.QueueNotify(i)
	}
}

// Read implements kvm.Device.
func (t *Transport) Read(off uint64, data []byte) {
	clear(data)
	if off >= RegConfig {
		t.dev.ReadConfig(off-RegConfig, data)
		return
	}
	if len(data) != 4 || off%4 != 0 {
		return
	}
	binary.LittleEndian.PutUint32(data, t.readReg(off))
}

func (t *Transport) readReg(off uint64) uint32 {
	switch off {
	case RegMagicValue:
		return Magic
	case RegVersion:
		return 2
	case RegDeviceID:
		return uint32(t.dev.Type())
	case RegVendorID:
		return t.vendor
	case RegInterruptStatus:
		t.irqMu.Lock()
		defer t.irqMu.Unlock()
		return t.isr
	case RegStatus:
		return t.status.Load()
	case RegConfigGeneration:
		return t.configGen.Load()
	case RegSHMLenLow, RegSHMLenHigh, RegSHMBaseLow, RegSHMBaseHigh:
		return ^uint32(0) // no shared memory regions
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch off {
	case RegDeviceFeatures:
		f := t.offered()
		switch t.devFeatSel {
		case 0:
			return uint32(f)
		case 1:
			return uint32(f >> 32)
		}
		return 0
	case RegQueueNumMax:
		if q := t.selected(); q != nil {
			return uint32(q.MaxSize())
		}
	case RegQueueReady:
		if q := t.selected(); q != nil && q.Ready() {
			return 1
		}
	}
	return 0
}

func (t *Transport) offered() uint64 { return t.dev.Features() | virtio.TransportFeatures }

func (t *Transport) selected() *virtio.Queue {
	if int(t.queueSel) < len(t.queues) {
		return t.queues[t.queueSel]
	}
	return nil
}

// Write implements kvm.Device.
func (t *Transport) Write(off uint64, data []byte) {
	if off >= RegConfig {
		t.dev.WriteConfig(off-RegConfig, data)
		return
	}
	if len(data) != 4 || off%4 != 0 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	switch off {
	case RegQueueNotify:
		t.NotifyQueue(int(v))
		return
	case RegInterruptACK:
		t.irqMu.Lock()
		t.isr &^= v
		if t.isr == 0 {
			t.setLevel(false)
		}
		t.irqMu.Unlock()
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch off {
	case RegDeviceFeaturesSel:
		t.devFeatSel = v
	case RegDriverFeaturesSel:
		t.drvFeatSel = v
	case RegDriverFeatures:
		if t.status.Load()&virtio.StatusFeaturesOK != 0 {
			return
		}
		switch t.drvFeatSel {
		case 0:
			t.drvFeatures = t.drvFeatures&^0xffffffff | uint64(v)
		case 1:
			t.drvFeatures = t.drvFeatures&0xffffffff | uint64(v)<<32
		}
	case RegQueueSel:
		t.queueSel = v
	case RegStatus:
		t.writeStatus(v)
	default:
		t.writeQueueReg(off, v)
	}
}

func (t *Transport) writeQueueReg(off uint64, v uint32) {
	q := t.selected()
	if q == nil || t.activated {
		return
	}
	if off == RegQueueReady {
		q.SetReady(v == 1)
		return
	}
	if q.Ready() {
		return // the spec forbids changing a live queue's layout
	}
	lo := func(a uint64) uint64 { return a&^0xffffffff | uint64(v) }
	hi := func(a uint64) uint64 { return a&0xffffffff | uint64(v)<<32 }
	switch off {
	case RegQueueNum:
		q.SetSize(uint16(min(v, 0xffff)))
		if v > 0xffff {
			q.SetSize(0) // rejected by Activate
		}
	case RegQueueDescLow:
		q.SetDescAddr(lo(q.DescAddr()))
	case RegQueueDescHigh:
		q.SetDescAddr(hi(q.DescAddr()))
	case RegQueueDriverLow:
		q.SetAvailAddr(lo(q.AvailAddr()))
	case RegQueueDriverHigh:
		q.SetAvailAddr(hi(q.AvailAddr()))
	case RegQueueDeviceLow:
		q.SetUsedAddr(lo(q.UsedAddr()))
	case RegQueueDeviceHigh:
		q.SetUsedAddr(hi(q.UsedAddr()))
	}
}

// writeStatus handles a driver write of the status register; t.mu is held.
func (t *Transport) writeStatus(v uint32) {
	if v == 0 {
		t.reset()
		return
	}
	old := t.status.Load()
	if v&virtio.StatusFeaturesOK != 0 && old&virtio.StatusFeaturesOK == 0 {
		if t.drvFeatures&^t.offered() != 0 || t.drvFeatures&virtio.FeatureVersion1 == 0 {
			v &^= virtio.StatusFeaturesOK // the driver reads it back and gives up
		}
	}
	v |= old & virtio.StatusDeviceNeedsReset
	t.status.Store(v)
	if v&virtio.StatusDriverOK != 0 && v&virtio.StatusFeaturesOK != 0 && !t.activated && v&virtio.StatusFailed == 0 {
		if err := t.activate(); err != nil {
			t.needsReset(err)
		}
		if t.activated && t.paused {
			t.dev.Pause() // activated while paused: no worker runs until Resume
		}
	}
}

// activate starts the device; t.mu is held.
func (t *Transport) activate() error {
	qs := make([]*virtio.Queue, len(t.queues))
	for i, q := range t.queues {
		if !q.Ready() {
			continue
		}
		if err := q.Activate(t.mem, t.drvFeatures); err != nil {
			return &virtio.QueueError{Device: t.dev.Type(), Queue: i, Err: err}
		}
		qs[i] = q
	}
	err := t.dev.Activate(virtio.Activation{
		Mem: t.mem, Features: t.drvFeatures, Queues: qs, Interrupt: interrupter{t},
	})
	if err != nil {
		return fmt.Errorf("activate virtio-%s: %w", t.dev.Type(), err)
	}
	t.activated = true
	t.running.Store(!t.paused)
	return nil
}

// reset returns the transport and device to their initial state; t.mu is held.
func (t *Transport) reset() {
	t.running.Store(false)
	if t.activated {
		t.dev.Reset() // stops workers: no NeedsReset can race past this
	}
	t.activated = false
	for _, q := range t.queues {
		q.Reset()
	}
	t.devFeatSel, t.drvFeatSel, t.drvFeatures, t.queueSel = 0, 0, 0, 0
	t.status.Store(0)
	t.irqMu.Lock()
	t.isr = 0
	t.lastErr = nil
	t.setLevel(false)
	t.irqMu.Unlock()
}

// kickAll notifies every active queue; t.mu is held.
func (t *Transport) kickAll() {
	for i, q := range t.queues {
		if q.Ready() {
			t.dev.QueueNotify(i)
		}
	}
}

// raise sets ISR bits and asserts the line.
func (t *Transport) raise(bits uint32) {
	t.irqMu.Lock()
	t.isr |= bits
	t.setLevel(true)
	t.irqMu.Unlock()
}

func (t *Transport) setLevel(high bool) {
	if err := t.irq.SetLevel(high); err != nil {
		t.log.Warn("virtio-mmio: set interrupt level", "device", t.dev.Type().String(), "high", high, "err", err)
	}
}

func (t *Transport) needsReset(err error) {
	t.irqMu.Lock()
	first := t.lastErr == nil
	if first {
		t.lastErr = err
	}
	t.irqMu.Unlock()
	if first {
		t.log.Error("virtio device needs reset", "device", t.dev.Type().String(), "err", err)
	}
	t.configGen.Add(1)
	t.raise(InterruptConfigChange)
	// Status last: a driver that sees NEEDS_RESET also sees the interrupt.
	t.status.Or(virtio.StatusDeviceNeedsReset)
}

// interrupter is the transport's virtio.Interrupt given to the device.
type interrupter struct{ t *Transport }

func (i interrupter) SignalUsed(int) { i.t.raise(InterruptUsedBuffer) }

func (i interrupter) SignalConfig() {
	i.t.configGen.Add(1)
	i.t.raise(InterruptConfigChange)
}

func (i interrupter) NeedsReset(err error) { i.t.needsReset(err) }

// Pause stops the device from processing requests (after in-flight ones
// finish) and from taking notifications, so its state can be saved.
func (t *Transport) Pause() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.paused {
		return
	}
	t.paused = true
	t.running.Store(false)
	if t.activated {
		t.dev.Pause()
	}
}

// Resume undoes Pause.
func (t *Transport) Resume() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.paused {
		return
	}
	t.paused = false
	if t.activated {
		t.running.Store(true)
		t.dev.Resume()
	}
}

// stateVersion is the version of the encoded transport state.
const stateVersion = 1

type state struct {
	DeviceType     uint32              `json:"device_type"`
	Status         uint32              `json:"status"`
	DevFeatSel     uint32              `json:"dev_feat_sel"`
	DrvFeatSel     uint32              `json:"drv_feat_sel"`
	DriverFeatures uint64              `json:"driver_features"`
	QueueSel       uint32              `json:"queue_sel"`
	ConfigGen      uint32              `json:"config_gen"`
	ISR            uint32              `json:"isr"`
	Queues         []virtio.QueueState `json:"queues"`
	Device         json.RawMessage     `json:"device"`
}

// SaveState encodes the transport, queue and device state. A running device
// must be paused first.
func (t *Transport) SaveState() ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.activated && !t.paused {
		return nil, ErrNotPaused
	}
	dev, err := t.dev.SaveState()
	if err != nil {
		return nil, fmt.Errorf("save virtio-%s: %w", t.dev.Type(), err)
	}
	t.irqMu.Lock()
	isr := t.isr
	t.irqMu.Unlock()
	s := state{
		DeviceType: uint32(t.dev.Type()), Status: t.status.Load(),
		DevFeatSel: t.devFeatSel, DrvFeatSel: t.drvFeatSel, DriverFeatures: t.drvFeatures,
		QueueSel: t.queueSel, ConfigGen: t.configGen.Load(), ISR: isr, Device: dev,
	}
	for _, q := range t.queues {
		s.Queues = append(s.Queues, q.State())
	}
	return virtio.EncodeState("virtio-mmio", stateVersion, s)
}

// RestoreState loads state from SaveState into a fresh transport built for
// an identically configured device. Guest memory must already hold the saved
// RAM. A device that was running is activated again; it starts processing
// at once unless Pause was called on this transport before RestoreState (then
// Resume starts it).
func (t *Transport) RestoreState(b []byte) error {
	var s state
	if err := virtio.DecodeState(b, "virtio-mmio", stateVersion, &s); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.activated || t.status.Load() != 0 {
		return ErrNotFresh
	}
	if s.DeviceType != uint32(t.dev.Type()) || len(s.Queues) != len(t.queues) {
		return &virtio.StateError{What: "virtio-mmio", Err: fmt.Errorf("%w: saved %d queues of device type %d, have %d of type %d",
			virtio.ErrStateMismatch, len(s.Queues), s.DeviceType, len(t.queues), t.dev.Type())}
	}
	for i, qs := range s.Queues {
		if err := t.queues[i].SetState(qs); err != nil {
			return err
		}
	}
	if err := t.dev.RestoreState(s.Device); err != nil {
		return err
	}
	t.devFeatSel, t.drvFeatSel, t.drvFeatures, t.queueSel = s.DevFeatSel, s.DrvFeatSel, s.DriverFeatures, s.QueueSel
	t.configGen.Store(s.ConfigGen)
	t.status.Store(s.Status)
	if s.Status&virtio.StatusDriverOK != 0 && s.Status&(virtio.StatusDeviceNeedsReset|virtio.StatusFailed) == 0 {
		if err := t.activate(); err != nil {
			t.needsReset(err)
		}
		if t.activated {
			if t.paused {
				t.dev.Pause()
			} else {
				t.kickAll() // pick up buffers made available before the save
			}
		}
	}
	if s.ISR != 0 {
		t.raise(s.ISR)
	}
	return nil
}
