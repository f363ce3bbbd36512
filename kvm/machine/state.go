package machine

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/kvmkit/kvmkit/kvm"
)

// StateVersion is the version of the encoded machine state that Encode
// writes: 2 is the binary layout described on appendBinary. DecodeState
// also reads version 1 (gob) states from earlier builds and rejects any
// other version.
const StateVersion = 2

// stateVersionGob is the first version: a gob-encoded State.
const stateVersionGob = 1

// stateMagic starts an encoded State.
const stateMagic = "KVMKSTAT"

// maxStateSize bounds an encoded State read from a stream.
const maxStateSize = 64 << 20

// State is a machine's complete non-memory state: every vCPU, the VM-wide
// interrupt controllers, PIT and clock, and device state by device name.
type State struct {
	VCPUs   []kvm.VCPUState
	VM      kvm.VMState
	Devices map[string][]byte
}

// StateSaver is a device whose state travels with the machine.
type StateSaver interface {
	SaveState() ([]byte, error)
	RestoreState([]byte) error
}

// SaveState reads the state of a paused or stopped machine.
func (m *Machine) SaveState() (*State, error) {
	if r := m.Runner(); r != nil && !r.Paused() {
		select {
		case <-r.Done():
		default:
			return nil, errors.New("machine: save state: pause the machine first")
		}
	}
	s := &State{Devices: map[string][]byte{}}
	for _, c := range m.vcpus {
		vs, err := c.SaveState()
		if err != nil {
			return nil, err
		}
		s.VCPUs = append(s.VCPUs, *vs)
	}
	vms, err := m.vm.SaveState(!m.cfg.NoIRQChip, !m.cfg.NoIRQChip)
	if err != nil {
		return nil, err
	}
	s.VM = *vms
	for name, d := range m.savers() {
		b, err := d.SaveState()
		if err != nil {
			return nil, fmt.Errorf("save device %s: %w", name, err)
		}
		s.Devices[name] = b
	}
	return s, nil
}

// RestoreState loads s into a machine built with the same configuration
// that has not started running: VM-wide state first, then each vCPU (see
// kvm.VCPU.RestoreState for the order), then devices.
func (m *Machine) RestoreState(s *State) error {
	if len(s.VCPUs) != len(m.vcpus) {
		return fmt.Errorf("machine: restore: state has %d vCPUs, machine has %d", len(s.VCPUs), len(m.vcpus))
	}
	if s.VM.HasIRQChip == m.cfg.NoIRQChip {
		return fmt.Errorf("machine: restore: irqchip mismatch (state %v)", s.VM.HasIRQChip)
	}
	if err := m.vm.RestoreState(&s.VM); err != nil {
		return err
	}
	for i, c := range m.vcpus {
		if err := c.RestoreState(&s.VCPUs[i]); err != nil {
			return err
		}
	}
	savers := m.savers()
	for name, b := range s.Devices {
		d, ok := savers[name]
		if !ok {
			return fmt.Errorf("machine: restore: state for unknown device %q", name)
		}
		if err := d.RestoreState(b); err != nil {
			return fmt.Errorf("restore device %s: %w", name, err)
		}
	}
	return nil
}

// savers returns the devices whose state is saved, by name.
func (m *Machine) savers() map[string]StateSaver {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]StateSaver{}
	for name, d := range m.stateDevs {
		out[name] = d
	}
	return out
}

// AddStateDevice makes a device's state part of SaveState/RestoreState;
// a device that is also a Pauser is paused and resumed with the machine.
func (m *Machine) AddStateDevice(name string, d StateSaver) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stateDevs == nil {
		m.stateDevs = map[string]StateSaver{}
	}
	m.stateDevs[name] = d
}

// Encode writes s as: magic, version (uint32), length (uint32), payload
// (the binary layout described on appendBinary), CRC32C of the payload.
func (s *State) Encode(w io.Writer) error {
	b, err := s.Bytes()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// Bytes returns the encoded state.
func (s *State) Bytes() ([]byte, error) {
	b := make([]byte, 16, 16+len(s.VCPUs)*16<<10+4<<10)
	copy(b, stateMagic)
	binary.LittleEndian.PutUint32(b[8:], StateVersion)
	b, err := s.appendBinary(b)
	if err != nil {
		return nil, err
	}
	n := len(b) - 16
	if n > maxStateSize {
		return nil, fmt.Errorf("encode machine state: %d bytes above the limit of %d", n, maxStateSize)
	}
	binary.LittleEndian.PutUint32(b[12:], uint32(n))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[16:], crc32.MakeTable(crc32.Castagnoli))), nil
}

// StateError reports a malformed encoded state.
type StateError struct{ Reason string }

func (e *StateError) Error() string { return "machine state: " + e.Reason }

// DecodeState reads a State written by Encode, rejecting a foreign magic,
// another version, an oversized length or a checksum mismatch.
func DecodeState(r io.Reader) (*State, error) {
	hdr := make([]byte, 16)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, &StateError{Reason: fmt.Sprintf("header: %v", err)}
	}
	if string(hdr[:8]) != stateMagic {
		return nil, &StateError{Reason: fmt.Sprintf("bad magic %q", hdr[:8])}
	}
	version := binary.LittleEndian.Uint32(hdr[8:])
	if version != StateVersion && version != stateVersionGob {
		return nil, &StateError{Reason: fmt.Sprintf("version %d, this build reads versions %d and %d", version, stateVersionGob, StateVersion)}
	}
	n := binary.LittleEndian.Uint32(hdr[12:])
	if n > maxStateSize {
		return nil, &StateError{Reason: fmt.Sprintf("length %d above the limit of %d", n, maxStateSize)}
	}
	payload := make([]byte, n+4)
	if _, err := io.ReadFull(r, payload); err != nil {
		return nil, &StateError{Reason: fmt.Sprintf("payload: %v", err)}
	}
	want := binary.LittleEndian.Uint32(payload[n:])
	if got := crc32.Checksum(payload[:n], crc32.MakeTable(crc32.Castagnoli)); got != want {
		return nil, &StateError{Reason: fmt.Sprintf("checksum %#x, want %#x", got, want)}
	}
	if version == StateVersion {
		return decodeBinary(payload[:n])
	}
	var s State
	if err := gob.NewDecoder(bytes.NewReader(payload[:n])).Decode(&s); err != nil {
		return nil, &StateError{Reason: fmt.Sprintf("decode: %v", err)}
	}
	// The same shapes as a version-2 decode: gob leaves empty values nil.
	if s.Devices == nil {
		s.Devices = map[string][]byte{}
	}
	for name, b := range s.Devices {
		if b == nil {
			s.Devices[name] = []byte{}
		}
	}
	for i := range s.VCPUs {
		c := &s.VCPUs[i]
		if len(c.CPUID) == 0 {
			c.CPUID = nil
		}
		if len(c.MSRs) == 0 {
			c.MSRs = nil
		}
		if len(c.XSave.Extra) == 0 {
			c.XSave.Extra = nil
		}
	}
	return &s, nil
}
