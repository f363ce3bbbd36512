package machine

import (
	"errors"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// StartDirtyLog starts dirty-page tracking on every RAM region, with every
// page clean (see kvm.DirtyLog). Calling it again while tracking is a no-op.
func (m *Machine) StartDirtyLog() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dirty != nil {
		return nil
	}
	if !m.manualTried {
		m.manualTried = true
		if _, err := m.vm.EnableManualDirtyLog(); err != nil {
			m.log.Debug("manual dirty log protection unavailable", "err", err)
		}
	}
	slots := make([]uint32, len(m.mem.Regions()))
	for i := range slots {
		slots[i] = uint32(i)
	}
	d, err := m.vm.StartDirtyLog(slots...)
	if err != nil {
		return err
	}
	m.dirty = d
	return nil
}

// DirtyBitmap copies into bitmap the pages of RAM region i written since
// the previous call (or StartDirtyLog), and re-arms tracking for them.
func (m *Machine) DirtyBitmap(i int, bitmap []uint64) error {
	m.mu.Lock()
	d := m.dirty
	m.mu.Unlock()
	if d == nil {
		return errors.New("machine: dirty log not started")
	}
	bm, err := d.Harvest(uint32(i))
	if err != nil {
		return err
	}
	if len(bitmap) != len(bm) {
		return fmt.Errorf("machine: dirty bitmap of region %d has %d words, want %d", i, len(bitmap), len(bm))
	}
	copy(bitmap, bm)
	return nil
}

// StopDirtyLog stops dirty-page tracking.
func (m *Machine) StopDirtyLog() error {
	m.mu.Lock()
	d := m.dirty
	m.dirty = nil
	m.mu.Unlock()
	if d == nil {
		return nil
	}
	return d.Stop()
}

// CPUID returns the CPUID entries of vCPU i as set at creation.
func (m *Machine) CPUID(i int) []kvm.CPUIDEntry { return m.cpuid[i] }

// Config returns the configuration the machine was built with.
func (m *Machine) Config() Config { return m.cfg }

// Devices returns the names of devices added with AddDevice.
func (m *Machine) Devices() []string { return append([]string(nil), m.devNames...) }
