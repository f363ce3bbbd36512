package pci

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/kvmkit/kvmkit/virtio"
)

// ErrNotPaused is returned by SaveState on an activated transport that was
// not paused first.
var ErrNotPaused = errors.New("virtio-pci: device running; Pause before SaveState")

// ErrNotFresh is returned by RestoreState on a transport the driver has
// already started (status not zero or device activated).
var ErrNotFresh = errors.New("virtio-pci: restore into a transport that is not in reset state")

// stateKind names the encoded transport state in its envelope (see
// virtio.EncodeState).
const stateKind = "virtio-pci"

// stateVersion is the version of the encoded transport state written by
// SaveState and the only version RestoreState reads.
const stateVersion = 1

// msixState is one saved MSI-X table entry.
type msixState struct {
	Addr uint64 `json:"addr"`
	Data uint32 `json:"data"`
	Ctl  uint32 `json:"ctl"`
}

// state is the encoded transport state. Registers narrower than 32 bits are
// stored in their own width so that out-of-range values fail to decode.
type state struct {
	DeviceType     uint32              `json:"device_type"`
	Config         []byte              `json:"config"` // the 256-byte configuration space
	BARAddr        uint64              `json:"bar_addr"`
	Status         uint8               `json:"status"`
	DevFeatSel     uint32              `json:"dev_feat_sel"`
	DrvFeatSel     uint32              `json:"drv_feat_sel"`
	DriverFeatures uint64              `json:"driver_features"`
	QueueSel       uint16              `json:"queue_sel"`
	ConfigGen      uint8               `json:"config_gen"`
	ISR            uint8               `json:"isr"`
	ConfigVector   uint16              `json:"config_vector"`
	Queues         []virtio.QueueState `json:"queues"`
	QueueVectors   []uint16            `json:"queue_vectors"`
	MSIXControl    uint16              `json:"msix_control"`
	MSIX           []msixState         `json:"msix"`
	Pending        []uint16            `json:"pending"` // vectors whose pending bit is set
	Device         json.RawMessage     `json:"device"`
}

// Pause stops the device from processing requests (after in-flight ones
// finish) and from taking notifications, so its state can be saved. A device
// the driver activates while the transport is paused starts paused. Pause is
// idempotent; Resume undoes it.
func (t *Transport) Pause() {
	t.life.Lock()
	defer t.life.Unlock()
	t.mu.Lock()
	if t.paused {
		t.mu.Unlock()
		return
	}
	t.paused = true
	active := t.activated
	t.mu.Unlock()
	if active {
		t.dev.Pause() // waits for handlers, which may need t.mu
	}
}

// Resume undoes Pause: an activated device resumes processing and picks up
// buffers made available meanwhile. Resume on a running transport does
// nothing.
func (t *Transport) Resume() {
	t.life.Lock()
	defer t.life.Unlock()
	t.mu.Lock()
	if !t.paused {
		t.mu.Unlock()
		return
	}
	t.paused = false
	active := t.activated
	t.mu.Unlock()
	if active {
		t.dev.Resume()
	}
}

// SaveState encodes the transport state (configuration space, BAR0 address,
// common configuration, MSI-X table and pending bits), the queue states and
// the device's own state, as version 1 of kind "virtio-pci". An
// activated device must be paused first (else ErrNotPaused).
func (t *Transport) SaveState() ([]byte, error) {
	t.life.Lock()
	defer t.life.Unlock()
	t.mu.Lock()
	if t.activated && !t.paused {
		t.mu.Unlock()
		return nil, ErrNotPaused
	}
	s := t.stateLocked()
	t.mu.Unlock()
	// Outside t.mu: the device may synchronize with goroutines that raise
	// interrupts through the transport.
	dev, err := t.dev.SaveState()
	if err != nil {
		return nil, fmt.Errorf("save virtio-%s: %w", t.dev.Type(), err)
	}
	s.Device = dev
	return virtio.EncodeState(stateKind, stateVersion, s)
}

// stateLocked captures the transport state except the device's; t.mu is held.
func (t *Transport) stateLocked() state {
	s := state{
		DeviceType:     uint32(t.dev.Type()),
		Config:         append([]byte(nil), t.cfg[:]...),
		BARAddr:        t.barAddr,
		Status:         uint8(t.status),
		DevFeatSel:     t.devFeatSel,
		DrvFeatSel:     t.drvFeatSel,
		DriverFeatures: t.drvFeatures,
		QueueSel:       t.queueSel,
		ConfigGen:      t.configGen,
		ISR:            t.isr,
		ConfigVector:   t.configVec,
		QueueVectors:   append([]uint16(nil), t.queueVec...),
		MSIXControl:    t.msixCtl,
		MSIX:           make([]msixState, len(t.msix)),
	}
	for _, q := range t.queues {
		s.Queues = append(s.Queues, q.State())
	}
	for i, e := range t.msix {
		s.MSIX[i] = msixState{Addr: e.addr, Data: e.data, Ctl: e.ctl}
	}
	for v, p := range t.pending {
		if p {
			s.Pending = append(s.Pending, uint16(v))
		}
	}
	return s
}

// RestoreState loads state from SaveState into a fresh transport (else
// ErrNotFresh) built for an identically configured device: the same device
// type, queue count and sizes, MSI-X table size and presence of MSI-X (else
// a *virtio.StateError wrapping virtio.ErrStateMismatch). Malformed state
// is rejected with virtio.ErrStateCorrupt or a *virtio.StateVersionError,
// and leaves the transport unchanged. Guest memory must already hold the
// saved RAM.
//
// BAR0 is registered on Options.Bus at the saved address. A device that was
// running (DRIVER_OK, neither FAILED nor DEVICE_NEEDS_RESET) is activated
// again; it processes the buffers made available before the save at once,
// unless Pause was called on this transport before RestoreState (then
// Resume starts it).
func (t *Transport) RestoreState(b []byte) error {
	var s state
	if err := virtio.DecodeState(b, stateKind, stateVersion, &s); err != nil {
		return err
	}
	t.life.Lock()
	defer t.life.Unlock()
	t.mu.Lock()
	pause, kick, err := t.restoreLocked(&s)
	t.mu.Unlock()
	if err != nil {
		return err
	}
	// Outside t.mu (see pauseDeviceLocked); t.life keeps Pause, Resume and
	// driver status writes out until the device is settled.
	if pause {
		t.dev.Pause()
	}
	for _, i := range kick {
		t.dev.QueueNotify(i) // pick up buffers made available before the save
	}
	return nil
}

// restoreLocked checks and applies s. It reports whether the reactivated
// device must be paused and which queues to notify. t.life and t.mu are held.
func (t *Transport) restoreLocked(s *state) (pause bool, kick []int, err error) {
	if t.activated || t.status != 0 {
		return false, nil, ErrNotFresh
	}
	if err := t.checkState(s); err != nil {
		return false, nil, err
	}
	if err := t.dev.RestoreState(s.Device); err != nil {
		return false, nil, fmt.Errorf("restore virtio-%s: %w", t.dev.Type(), err)
	}

	// Configuration space: only the guest-writable bytes differ from what
	// New built (checkState compared the rest). Move BAR0 first, the only
	// step that can fail, and undo it on failure.
	oldCmd, oldLine, oldBAR := t.cfg[0x04], t.cfg[0x3c], t.barAddr
	t.cfg[0x04], t.cfg[0x3c], t.barAddr = s.Config[0x04], s.Config[0x3c], s.BARAddr
	if err := t.remap(); err != nil {
		t.cfg[0x04], t.cfg[0x3c], t.barAddr = oldCmd, oldLine, oldBAR
		if err2 := t.remap(); err2 != nil {
			t.log.Warn("virtio-pci: cannot map BAR0 back", "addr", fmt.Sprintf("%#x", t.barAddr), "err", err2)
		}
		return false, nil, fmt.Errorf("virtio-pci: map restored BAR0 at %#x: %w", s.BARAddr, err)
	}

	for i, qs := range s.Queues {
		if err := t.queues[i].SetState(qs); err != nil {
			return false, nil, err // not reached: checkState compared max sizes
		}
	}
	copy(t.queueVec, s.QueueVectors)
	t.configVec = s.ConfigVector
	t.devFeatSel, t.drvFeatSel, t.drvFeatures, t.queueSel = s.DevFeatSel, s.DrvFeatSel, s.DriverFeatures, s.QueueSel
	t.configGen = s.ConfigGen
	t.msixCtl = s.MSIXControl
	for i, e := range s.MSIX {
		t.msix[i] = msixEntry{addr: e.Addr, data: e.Data, ctl: e.Ctl}
	}
	clear(t.pending)
	for _, v := range s.Pending {
		t.pending[v] = true
	}
	t.isr = s.ISR
	if t.isr != 0 {
		t.setINTx(true) // the line was asserted until the driver read the ISR
	}
	t.status = uint32(s.Status)

	st := t.status
	if st&virtio.StatusDriverOK != 0 && st&virtio.StatusFeaturesOK != 0 &&
		st&(virtio.StatusFailed|virtio.StatusDeviceNeedsReset) == 0 {
		if err := t.activate(); err != nil {
			t.needsResetLocked(err)
		} else if t.paused {
			pause = true
		} else {
			for i, q := range t.queues {
				if q.Ready() {
					kick = append(kick, i)
				}
			}
		}
	}
	t.deliverPending()
	return pause, kick, nil
}

// writableConfig reports whether configuration-space byte off is writable by
// the guest (command, BAR0, interrupt line); the others are fixed by New.
func writableConfig(off int) bool {
	return off == 0x04 || off >= 0x10 && off < 0x18 || off == 0x3c
}

// checkState validates s against this transport without changing anything.
func (t *Transport) checkState(s *state) error {
	mismatch := func(format string, args ...any) error {
		return &virtio.StateError{What: stateKind, Err: fmt.Errorf("%w: "+format, append([]any{virtio.ErrStateMismatch}, args...)...)}
	}
	corrupt := func(format string, args ...any) error {
		return &virtio.StateError{What: stateKind, Err: fmt.Errorf("%w: "+format, append([]any{virtio.ErrStateCorrupt}, args...)...)}
	}
	if s.DeviceType != uint32(t.dev.Type()) || len(s.Queues) != len(t.queues) {
		return mismatch("saved %d queues of device type %d, have %d of type %d",
			len(s.Queues), s.DeviceType, len(t.queues), t.dev.Type())
	}
	for i, qs := range s.Queues {
		if qs.MaxSize != t.queues[i].MaxSize() {
			return mismatch("queue %d: saved maximum size %d, have %d", i, qs.MaxSize, t.queues[i].MaxSize())
		}
	}
	if len(s.MSIX) != len(t.msix) {
		return mismatch("saved %d MSI-X vectors, have %d", len(s.MSIX), len(t.msix))
	}
	if len(s.Config) != len(t.cfg) {
		return corrupt("configuration space is %d bytes, want %d", len(s.Config), len(t.cfg))
	}
	for i, v := range s.Config {
		if !writableConfig(i) && v != t.cfg[i] {
			return mismatch("configuration space byte %#x is %#x, have %#x", i, v, t.cfg[i])
		}
	}
	if s.Config[0x04]&^0x07 != 0 {
		return corrupt("command register %#x", s.Config[0x04])
	}
	if s.BARAddr%BARSize != 0 {
		return corrupt("BAR0 address %#x not aligned to %#x", s.BARAddr, BARSize)
	}
	var bar [8]byte
	binary.LittleEndian.PutUint32(bar[0:], uint32(s.BARAddr)|0x4)
	binary.LittleEndian.PutUint32(bar[4:], uint32(s.BARAddr>>32))
	if string(s.Config[0x10:0x18]) != string(bar[:]) {
		return corrupt("BAR0 register % x does not match address %#x", s.Config[0x10:0x18], s.BARAddr)
	}
	if uint32(s.Status)&virtio.StatusFeaturesOK != 0 {
		if extra := s.DriverFeatures &^ (t.dev.Features() | virtio.TransportFeatures); extra != 0 {
			return mismatch("negotiated features %#x not offered", extra)
		}
	}
	if s.MSIXControl&^0xc000 != 0 {
		return corrupt("MSI-X control %#x", s.MSIXControl)
	}
	if s.MSIXControl != 0 && t.opts.MSI == nil {
		return mismatch("MSI-X enabled in saved state, transport has no MSI sender")
	}
	vectorOK := func(v uint16) bool { return v == NoVector || int(v) < len(t.msix) && t.opts.MSI != nil }
	if !vectorOK(s.ConfigVector) {
		return corrupt("config vector %d", s.ConfigVector)
	}
	if len(s.QueueVectors) != len(s.Queues) {
		return corrupt("%d queue vectors for %d queues", len(s.QueueVectors), len(s.Queues))
	}
	for i, v := range s.QueueVectors {
		if !vectorOK(v) {
			return corrupt("queue %d vector %d", i, v)
		}
	}
	for i, e := range s.MSIX {
		if e.Ctl&^1 != 0 {
			return corrupt("MSI-X entry %d control %#x", i, e.Ctl)
		}
	}
	for _, v := range s.Pending {
		if int(v) >= len(t.msix) {
			return corrupt("pending vector %d", v)
		}
	}
	return nil
}
