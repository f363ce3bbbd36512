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

// StateVersion is the version of the encoded machine state. Decode rejects
// any other version.
const StateVersion = 1

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

// Encode writes s as: magic, version (uint32), length (uint32), gob
// payload, CRC32C of the payload.
func (s *State) Encode(w io.Writer) error {
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(s); err != nil {
		return fmt.Errorf("encode machine state: %w", err)
	}
	hdr := make([]byte, 16)
	copy(hdr, stateMagic)
	binary.LittleEndian.PutUint32(hdr[8:], StateVersion)
	binary.LittleEndian.PutUint32(hdr[12:], uint32(buf.Len()))
	sum := crc32.Checksum(buf.Bytes(), crc32.MakeTable(crc32.Castagnoli))
	var tail [4]byte
	binary.LittleEndian.PutUint32(tail[:], sum)
	for _, b := range [][]byte{hdr, buf.Bytes(), tail[:]} {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// Bytes returns the encoded state.
func (s *State) Bytes() ([]byte, error) {
	var b bytes.Buffer
	err := s.Encode(&b)
	return b.Bytes(), err
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
	if v := binary.LittleEndian.Uint32(hdr[8:]); v != StateVersion {
		return nil, &StateError{Reason: fmt.Sprintf("version %d, this build reads version %d", v, StateVersion)}
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
	var s State
	if err := gob.NewDecoder(bytes.NewReader(payload[:n])).Decode(&s); err != nil {
		return nil, &StateError{Reason: fmt.Sprintf("decode: %v", err)}
	}
	return &s, nil
}
