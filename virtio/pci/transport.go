package pci

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
)

// BAR0 layout of a virtio-pci Transport.
const (
	BARSize       = 0x8000
	CommonOffset  = 0x0000
	ISROffset     = 0x1000
	DeviceOffset  = 0x2000
	NotifyOffset  = 0x3000
	MSIXTableOff  = 0x4000
	MSIXPBAOffset = 0x6000
	// NotifyMultiplier is notify_off_multiplier: queue i is notified by a
	// write at NotifyOffset + i*NotifyMultiplier.
	NotifyMultiplier = 4
)

// VendorID is the virtio PCI vendor; device IDs are 0x1040 + device type.
const VendorID = 0x1af4

// NoVector is the MSI-X vector value meaning "no interrupt".
const NoVector = 0xffff

// MSISender delivers a message-signalled interrupt (KVM_SIGNAL_MSI or an
// irqfd routed to an MSI route).
type MSISender interface {
	SendMSI(addr uint64, data uint32) error
}

// Options configure a virtio-pci Transport.
type Options struct {
	// Bus is the MMIO bus on which the transport registers BAR0 wherever the
	// guest places it (and, at creation, at BARAddr).
	Bus *kvm.Bus
	// BARAddr is the initial guest-physical address of BAR0 (32 KiB
	// aligned); the VMM assigns it because there is no firmware to.
	BARAddr uint64
	// MSI delivers MSI-X messages; nil disables MSI-X (INTx only).
	MSI MSISender
	// IRQ is the INTx line used while MSI-X is off; IRQLine is its number
	// as reported in the interrupt-line register.
	IRQ     kvm.IRQ
	IRQLine uint8
	// Vectors is the MSI-X table size (default queues+1).
	Vectors int
	// Logger receives device errors; default slog.Default().
	Logger *slog.Logger
}

// capability chain in configuration space
const (
	capCommon = 0x40
	capNotify = 0x50
	capISR    = 0x64
	capDevice = 0x74
	capMSIX   = 0x84
)

// Transport is a virtio-pci modern function: its configuration space is a
// Function for the HostBridge and its BAR0 a kvm.Device on the MMIO bus.
type Transport struct {
	dev  virtio.Device
	mem  kvm.GuestMemory
	opts Options
	log  *slog.Logger

	// life serializes device lifecycle changes (activation, reset, Pause,
	// Resume, SaveState, RestoreState) that call into the device without
	// holding mu: a device's workers take mu to raise interrupts, so mu must
	// not be held while waiting for them. Lock order: life, then mu.
	life sync.Mutex

	mu          sync.Mutex
	cfg         [256]byte
	barAddr     uint64 // currently programmed BAR0 address
	registered  uint64 // address BAR0 is registered at on the bus, 0 if none
	queues      []*virtio.Queue
	queueVec    []uint16
	configVec   uint16
	devFeatSel  uint32
	drvFeatSel  uint32
	drvFeatures uint64
	queueSel    uint16
	status      uint32
	configGen   uint8
	activated   bool
	paused      bool // Pause called: no notifications, device paused once activated
	isr         uint8
	lastErr     error
	msix        []msixEntry
	pending     []bool
	msixCtl     uint16
}

type msixEntry struct {
	addr uint64
	data uint32
	ctl  uint32
}

// New returns a virtio-pci transport for dev and registers BAR0 at
// opts.BARAddr on opts.Bus.
func New(dev virtio.Device, mem kvm.GuestMemory, opts Options) (*Transport, error) {
	if opts.BARAddr%BARSize != 0 {
		return nil, fmt.Errorf("virtio-pci: BAR address %#x not aligned to %#x", opts.BARAddr, BARSize)
	}
	if opts.IRQ == nil {
		opts.IRQ = kvm.NoIRQ{}
	}
	t := &Transport{dev: dev, mem: mem, opts: opts, log: opts.Logger, configVec: NoVector}
	if t.log == nil {
		t.log = slog.Default()
	}
	for _, n := range dev.QueueMaxSizes() {
		t.queues = append(t.queues, virtio.NewQueue(n))
		t.queueVec = append(t.queueVec, NoVector)
	}
	nvec := opts.Vectors
	if nvec <= 0 {
		nvec = len(t.queues) + 1
	}
	nvec = min(nvec, 2048)
	t.msix = make([]msixEntry, nvec)
	for i := range t.msix {
		t.msix[i].ctl = 1 // masked
	}
	t.pending = make([]bool, nvec)
	t.buildConfig()
	t.barAddr = opts.BARAddr
	t.cfg[0x04] = 0x06 // memory space + bus master enabled, as firmware would leave it
	if err := t.remap(); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Transport) buildConfig() {
	c := t.cfg[:]
	le := binary.LittleEndian
	le.PutUint16(c[0x00:], VendorID)
	le.PutUint16(c[0x02:], 0x1040+uint16(t.dev.Type()))
	le.PutUint16(c[0x06:], 1<<4) // capabilities list
	c[0x08] = 1                  // revision: modern
	class, sub := byte(0xff), byte(0)
	switch t.dev.Type() {
	case virtio.DeviceNet:
		class, sub = 0x02, 0x00
	case virtio.DeviceBlock:
		class, sub = 0x01, 0x00
	case virtio.DeviceConsole:
		class, sub = 0x07, 0x80
	}
	c[0x0a], c[0x0b] = sub, class
	le.PutUint16(c[0x2c:], VendorID)
	le.PutUint16(c[0x2e:], 0x40+uint16(t.dev.Type()))
	c[0x34] = capCommon
	c[0x3c] = t.opts.IRQLine
	c[0x3d] = 1 // INTA#
	vcap := func(at, next, typ byte, off, length uint32, extra int) {
		c[at] = 0x09 // vendor specific
		c[at+1] = next
		c[at+2] = byte(16 + extra)
		c[at+3] = typ
		c[at+4] = 0 // BAR0
		le.PutUint32(c[at+8:], off)
		le.PutUint32(c[at+12:], length)
	}
	vcap(capCommon, capNotify, 1, CommonOffset, 0x40, 0)
	vcap(capNotify, capISR, 2, NotifyOffset, uint32(NotifyMultiplier*len(t.queues)), 4)
	le.PutUint32(c[capNotify+16:], NotifyMultiplier)
	vcap(capISR, capDevice, 3, ISROffset, 1, 0)
	vcap(capDevice, capMSIX, 4, DeviceOffset, 0x1000, 0)
	next := byte(0)
	c[capMSIX] = 0x11
	c[capMSIX+1] = next
	le.PutUint16(c[capMSIX+2:], uint16(len(t.msix)-1))
	le.PutUint32(c[capMSIX+4:], MSIXTableOff) // BIR 0
	le.PutUint32(c[capMSIX+8:], MSIXPBAOffset)
	if t.opts.MSI == nil {
		// No MSI-X: unlink the capability.
		c[capDevice+1] = 0
	}
}

// ReadConfig implements Function.
func (t *Transport) ReadConfig(off uint64, data []byte) {
	clear(data)
	if off >= uint64(len(t.cfg)) || off+uint64(len(data)) > uint64(len(t.cfg)) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	copy(data, t.cfg[off:])
	if off <= capMSIX+2 && off+uint64(len(data)) > capMSIX+2 {
		var ctl [2]byte
		binary.LittleEndian.PutUint16(ctl[:], uint16(len(t.msix)-1)|t.msixCtl)
		for i := range data {
			if o := off + uint64(i); o == capMSIX+2 || o == capMSIX+3 {
				data[i] = ctl[o-(capMSIX+2)]
			}
		}
	}
}

// WriteConfig implements Function: command, BAR0, interrupt line and the
// MSI-X enable and mask bits are writable.
func (t *Transport) WriteConfig(off uint64, data []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, v := range data {
		o := off + uint64(i)
		switch {
		case o == 0x04:
			t.cfg[o] = v & 0x07
		case o >= 0x10 && o < 0x18:
			t.cfg[o] = v
		case o == 0x3c:
			t.cfg[o] = v
		case o == capMSIX+3 && t.opts.MSI != nil:
			t.msixCtl = uint16(v&0xc0) << 8
		}
	}
	if off <= 0x17 && off+uint64(len(data)) > 0x04 {
		lo := binary.LittleEndian.Uint32(t.cfg[0x10:]) &^ (BARSize - 1)
		hi := binary.LittleEndian.Uint32(t.cfg[0x14:])
		// Present the BAR as 64-bit memory; sizing writes read back the mask.
		binary.LittleEndian.PutUint32(t.cfg[0x10:], lo|0x4)
		t.barAddr = uint64(hi)<<32 | uint64(lo)
		if err := t.remap(); err != nil {
			t.log.Warn("virtio-pci: cannot map BAR0", "addr", fmt.Sprintf("%#x", t.barAddr), "err", err)
		}
	}
	t.deliverPending()
}

// remap registers BAR0 on the bus at barAddr if memory decoding is on.
func (t *Transport) remap() error {
	binary.LittleEndian.PutUint32(t.cfg[0x10:], uint32(t.barAddr)|0x4)
	binary.LittleEndian.PutUint32(t.cfg[0x14:], uint32(t.barAddr>>32))
	if t.opts.Bus == nil {
		return nil
	}
	want := uint64(0)
	if t.cfg[0x04]&0x2 != 0 && t.barAddr != 0 && t.barAddr+BARSize > t.barAddr && t.barAddr < 1<<48 {
		want = t.barAddr
	}
	if want == t.registered {
		return nil
	}
	if t.registered != 0 {
		t.opts.Bus.Unregister(t.registered)
		t.registered = 0
	}
	if want != 0 {
		if err := t.opts.Bus.Register(want, BARSize, bar{t}); err != nil {
			return err
		}
		t.registered = want
	}
	return nil
}

// BAR returns the kvm.Device serving BAR0, for VMMs that manage the MMIO
// bus themselves (leave Options.Bus nil then).
func (t *Transport) BAR() kvm.Device { return bar{t} }

// NotifyQueue delivers a notification for queue i, as a write to its notify
// address does (for ioeventfd: register base+NotifyOffset+i*NotifyMultiplier).
// It is ignored while the device is not activated or the transport is paused.
func (t *Transport) NotifyQueue(i int) {
	t.mu.Lock()
	ok := t.activated && !t.paused
	t.mu.Unlock()
	if ok {
		t.dev.QueueNotify(i)
	}
}

// Err returns the error that put the device in DEVICE_NEEDS_RESET, or nil.
func (t *Transport) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastErr
}

// bar is the BAR0 window.
type bar struct{ t *Transport }

func (b bar) Read(off uint64, data []byte) {
	clear(data)
	t := b.t
	switch {
	case off >= DeviceOffset && off < NotifyOffset:
		t.dev.ReadConfig(off-DeviceOffset, data)
		return
	case off >= NotifyOffset && off < MSIXTableOff:
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case off < ISROffset:
		t.readCommon(off, data)
	case off == ISROffset:
		data[0] = t.isr
		t.isr = 0
		t.setINTx(false)
	case off >= MSIXTableOff && off < MSIXPBAOffset:
		t.readMSIX(off-MSIXTableOff, data)
	case off >= MSIXPBAOffset:
		base := (off - MSIXPBAOffset) * 8
		for i := range data {
			for bit := range 8 {
				if v := base + uint64(i*8+bit); v < uint64(len(t.pending)) && t.pending[v] {
					data[i] |= 1 << bit
				}
			}
		}
	}
}

func (b bar) Write(off uint64, data []byte) {
	t := b.t
	switch {
	case off >= DeviceOffset && off < NotifyOffset:
		t.dev.WriteConfig(off-DeviceOffset, data)
		return
	case off >= NotifyOffset && off < MSIXTableOff:
		t.NotifyQueue(int((off - NotifyOffset) / NotifyMultiplier))
		return
	}
	t.life.Lock() // a status write may activate, pause or reset the device
	defer t.life.Unlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case off < ISROffset:
		t.writeCommon(off, data)
	case off >= MSIXTableOff && off < MSIXPBAOffset:
		t.writeMSIX(off-MSIXTableOff, data)
		t.deliverPending()
	}
}

func getLE(data []byte) uint64 {
	var b [8]byte
	copy(b[:], data)
	return binary.LittleEndian.Uint64(b[:])
}

func putLE(data []byte, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	copy(data, b[:])
}

func (t *Transport) selected() (*virtio.Queue, int) {
	if int(t.queueSel) < len(t.queues) {
		return t.queues[t.queueSel], int(t.queueSel)
	}
	return nil, -1
}

// readCommon serves struct virtio_pci_common_cfg.
func (t *Transport) readCommon(off uint64, data []byte) {
	q, qi := t.selected()
	var v uint64
	switch off {
	case 0x00:
		v = uint64(t.devFeatSel)
	case 0x04:
		f := t.dev.Features() | virtio.TransportFeatures
		if t.devFeatSel < 2 {
			v = uint64(uint32(f >> (32 * t.devFeatSel)))
		}
	case 0x08:
		v = uint64(t.drvFeatSel)
	case 0x0c:
		if t.drvFeatSel < 2 {
			v = uint64(uint32(t.drvFeatures >> (32 * t.drvFeatSel)))
		}
	case 0x10:
		v = uint64(t.configVec)
	case 0x12:
		v = uint64(len(t.queues))
	case 0x14:
		v = uint64(t.status)
	case 0x15:
		v = uint64(t.configGen)
	case 0x16:
		v = uint64(t.queueSel)
	case 0x18:
		if q != nil {
			v = uint64(q.Size())
		}
	case 0x1a:
		v = NoVector
		if q != nil {
			v = uint64(t.queueVec[qi])
		}
	case 0x1c:
		if q != nil && q.Ready() {
			v = 1
		}
	case 0x1e:
		if q != nil {
			v = uint64(qi)
		}
	case 0x20, 0x24, 0x28, 0x2c, 0x30, 0x34:
		if q != nil {
			a := [...]uint64{q.DescAddr(), q.AvailAddr(), q.UsedAddr()}[(off-0x20)/8]
			if off%8 != 0 {
				a >>= 32
			}
			v = a
		}
	}
	putLE(data, v)
}

// writeCommon handles driver writes to struct virtio_pci_common_cfg; t.life
// and t.mu are held.
func (t *Transport) writeCommon(off uint64, data []byte) {
	v := getLE(data)
	q, qi := t.selected()
	switch off {
	case 0x00:
		t.devFeatSel = uint32(v)
	case 0x08:
		t.drvFeatSel = uint32(v)
	case 0x0c:
		if t.status&virtio.StatusFeaturesOK == 0 && t.drvFeatSel < 2 {
			sh := 32 * t.drvFeatSel
			t.drvFeatures = t.drvFeatures&^(0xffffffff<<sh) | uint64(uint32(v))<<sh
		}
	case 0x10:
		t.configVec = t.checkVector(uint16(v))
	case 0x14:
		t.writeStatus(uint32(uint8(v)))
	case 0x16:
		t.queueSel = uint16(v)
	}
	if q == nil || t.activated {
		return
	}
	switch off {
	case 0x1a:
		t.queueVec[qi] = t.checkVector(uint16(v))
	case 0x1c:
		q.SetReady(v&1 == 1)
	}
	if q.Ready() {
		return
	}
	set := func(get func() uint64, put func(uint64)) {
		a := get()
		if off%8 == 0 && len(data) == 8 {
			a = v
		} else if off%8 == 0 {
			a = a&^0xffffffff | uint64(uint32(v))
		} else {
			a = a&0xffffffff | uint64(uint32(v))<<32
		}
		put(a)
	}
	switch off {
	case 0x18:
		q.SetSize(uint16(v))
	case 0x20, 0x24:
		set(q.DescAddr, q.SetDescAddr)
	case 0x28, 0x2c:
		set(q.AvailAddr, q.SetAvailAddr)
	case 0x30, 0x34:
		set(q.UsedAddr, q.SetUsedAddr)
	}
}

// checkVector returns v if it names a table entry, else NoVector (which the
// driver reads back to learn the assignment failed).
func (t *Transport) checkVector(v uint16) uint16 {
	if int(v) < len(t.msix) && t.opts.MSI != nil {
		return v
	}
	return NoVector
}

// writeStatus handles a driver write of device_status; t.life and t.mu are
// held.
func (t *Transport) writeStatus(v uint32) {
	if v == 0 {
		t.resetLocked()
		return
	}
	if v&virtio.StatusFeaturesOK != 0 && t.status&virtio.StatusFeaturesOK == 0 {
		offered := t.dev.Features() | virtio.TransportFeatures
		if t.drvFeatures&^offered != 0 || t.drvFeatures&virtio.FeatureVersion1 == 0 {
			v &^= virtio.StatusFeaturesOK
		}
	}
	v |= t.status & virtio.StatusDeviceNeedsReset
	t.status = v
	if v&virtio.StatusDriverOK != 0 && v&virtio.StatusFeaturesOK != 0 && !t.activated && v&virtio.StatusFailed == 0 {
		if err := t.activate(); err != nil {
			t.needsResetLocked(err)
		} else if t.paused {
			t.pauseDeviceLocked() // activated while paused: stay paused
		}
	}
}

// pauseDeviceLocked pauses the activated device. Like resetLocked it waits
// for the device's workers without holding t.mu; t.life keeps the lifecycle
// from changing meanwhile. t.life and t.mu are held.
func (t *Transport) pauseDeviceLocked() {
	t.mu.Unlock()
	t.dev.Pause()
	t.mu.Lock()
}

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
	if err := t.dev.Activate(virtio.Activation{Mem: t.mem, Features: t.drvFeatures, Queues: qs, Interrupt: interrupter{t}}); err != nil {
		return fmt.Errorf("activate virtio-%s: %w", t.dev.Type(), err)
	}
	t.activated = true
	return nil
}

// resetLocked resets the device. The device's workers are stopped without
// holding t.mu, because they may be waiting for it to raise an interrupt.
// t.life and t.mu are held. A paused transport stays paused.
func (t *Transport) resetLocked() {
	if t.activated {
		t.activated = false
		t.mu.Unlock()
		t.dev.Reset()
		t.mu.Lock()
	}
	for i, q := range t.queues {
		q.Reset()
		t.queueVec[i] = NoVector
	}
	t.configVec = NoVector
	t.devFeatSel, t.drvFeatSel, t.drvFeatures, t.queueSel = 0, 0, 0, 0
	t.status, t.isr, t.lastErr = 0, 0, nil
	t.setINTx(false)
}

func (t *Transport) setINTx(high bool) {
	if err := t.opts.IRQ.SetLevel(high); err != nil {
		t.log.Warn("virtio-pci: set INTx level", "err", err)
	}
}

// msixOn reports whether MSI-X is enabled.
func (t *Transport) msixOn() bool { return t.opts.MSI != nil && t.msixCtl&0x8000 != 0 }

// signal raises vector vec (MSI-X) or ISR bits (INTx); t.mu is held.
func (t *Transport) signal(vec uint16, isrBit uint8) {
	if !t.msixOn() {
		t.isr |= isrBit
		t.setINTx(true)
		return
	}
	if int(vec) >= len(t.msix) {
		return // NoVector: the driver asked for no interrupt
	}
	e := t.msix[vec]
	if e.ctl&1 != 0 || t.msixCtl&0x4000 != 0 {
		t.pending[vec] = true
		return
	}
	if err := t.opts.MSI.SendMSI(e.addr, e.data); err != nil {
		t.log.Warn("virtio-pci: send MSI", "vector", vec, "err", err)
	}
}

// deliverPending sends pending vectors that are no longer masked.
func (t *Transport) deliverPending() {
	if !t.msixOn() || t.msixCtl&0x4000 != 0 {
		return
	}
	for v, p := range t.pending {
		if p && t.msix[v].ctl&1 == 0 {
			t.pending[v] = false
			t.signal(uint16(v), 0)
		}
	}
}

func (t *Transport) readMSIX(off uint64, data []byte) {
	i := off / 16
	if i >= uint64(len(t.msix)) {
		return
	}
	e := t.msix[i]
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], e.addr)
	binary.LittleEndian.PutUint32(b[8:], e.data)
	binary.LittleEndian.PutUint32(b[12:], e.ctl)
	copy(data, b[off%16:])
}

func (t *Transport) writeMSIX(off uint64, data []byte) {
	i := off / 16
	if i >= uint64(len(t.msix)) {
		return
	}
	var b [16]byte
	e := &t.msix[i]
	binary.LittleEndian.PutUint64(b[0:], e.addr)
	binary.LittleEndian.PutUint32(b[8:], e.data)
	binary.LittleEndian.PutUint32(b[12:], e.ctl)
	copy(b[off%16:], data)
	e.addr = binary.LittleEndian.Uint64(b[0:])
	e.data = binary.LittleEndian.Uint32(b[8:])
	e.ctl = binary.LittleEndian.Uint32(b[12:]) & 1
}

func (t *Transport) needsResetLocked(err error) {
	if t.lastErr == nil {
		t.lastErr = err
		t.log.Error("virtio device needs reset", "device", t.dev.Type().String(), "err", err)
	}
	t.configGen++
	t.status |= virtio.StatusDeviceNeedsReset
	t.signal(t.configVec, 2)
}

// interrupter is the virtio.Interrupt handed to the device.
type interrupter struct{ t *Transport }

func (i interrupter) SignalUsed(q int) {
	i.t.mu.Lock()
	defer i.t.mu.Unlock()
	if q >= 0 && q < len(i.t.queueVec) {
		i.t.signal(i.t.queueVec[q], 1)
	}
}

func (i interrupter) SignalConfig() {
	i.t.mu.Lock()
	defer i.t.mu.Unlock()
	i.t.configGen++
	i.t.signal(i.t.configVec, 2)
}

func (i interrupter) NeedsReset(err error) {
	i.t.mu.Lock()
	defer i.t.mu.Unlock()
	i.t.needsResetLocked(err)
}
