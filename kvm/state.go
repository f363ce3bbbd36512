package kvm

import "fmt"

// VCPUState is everything KVM keeps for one vCPU, as plain values that can
// be encoded and compared. SaveState and RestoreState move it in the order
// documented on RestoreState.
type VCPUState struct {
	ID        int
	CPUID     []CPUIDEntry
	MPState   uint32
	Regs      Regs
	Sregs     Sregs
	XSave     XSave
	XCRs      XCRs
	DebugRegs DebugRegs
	LAPIC     LAPICState
	MSRs      []MSREntry
	Events    VCPUEvents
	TSCKHz    uint32
}

// ProbeMSRs finds which of the host's MSRs this VM's vCPUs can read and
// caches the list on the VM for SaveState. Call it once the CPUID is set
// and before the vCPU runs (a vCPU ioctl waits for a running KVM_RUN), so
// that the first SaveState, often inside a migration's downtime, does not
// pay for it.
func (c *VCPU) ProbeMSRs() error {
	_, err := c.readableMSRs()
	return err
}

// readableMSRs returns the VM's cached list of MSRs its vCPUs can read,
// filtering the host's MSR index list down to it on the first call
// (KVM_GET_MSRS stops at the first MSR it cannot read).
func (c *VCPU) readableMSRs() ([]uint32, error) {
	c.vm.mu.Lock()
	cached := c.vm.readable
	c.vm.mu.Unlock()
	if cached != nil {
		return cached, nil
	}
	all, err := c.vm.sys.cachedMSRIndexList()
	if err != nil {
		return nil, err
	}
	// KVM_GET_MSRS stops at the first MSR it cannot read and returns how
	// many it read, so one call per unreadable MSR (plus one) finds the
	// set: this runs during a migration's downtime the first time.
	out := make([]uint32, 0, len(all))
	for rest := all; len(rest) > 0; {
		chunk := rest[:min(len(rest), maxMSRs)]
		e, err := c.GetMSRs(chunk)
		if err != nil {
			rest = rest[1:] // the first one failed the whole call
			continue
		}
		out = append(out, chunk[:len(e)]...)
		if len(e) < len(chunk) {
			rest = rest[len(e)+1:] // skip the unreadable MSR
		} else {
			rest = rest[len(chunk):]
		}
	}
	c.vm.mu.Lock()
	c.vm.readable = out
	c.vm.mu.Unlock()
	return out, nil
}

// SaveState reads the complete state of a vCPU that is not running.
//
// Order: MP state first (it can flush pending events into registers), then
// registers, segment registers, XSAVE, XCRs, debug registers, LAPIC, MSRs
// (including the TSC and the TSC deadline), and vCPU events last.
func (c *VCPU) SaveState() (*VCPUState, error) {
	s := &VCPUState{ID: c.id}
	var err error
	step := func(name string, f func() error) {
		if err == nil {
			if e := f(); e != nil {
				err = fmt.Errorf("save vCPU %d %s: %w", c.id, name, e)
			}
		}
	}
	step("cpuid", func() (e error) { s.CPUID, e = c.CPUID(); return })
	step("mp state", func() (e error) { s.MPState, e = c.MPState(); return })
	step("regs", func() (e error) { s.Regs, e = c.Regs(); return })
	step("sregs", func() (e error) { s.Sregs, e = c.Sregs(); return })
	step("xsave", func() (e error) { s.XSave, e = c.XSave(); return })
	step("xcrs", func() (e error) { s.XCRs, e = c.XCRs(); return })
	step("debug regs", func() (e error) { s.DebugRegs, e = c.DebugRegs(); return })
	if c.vm.HasIRQChip() { // the LAPIC is in the kernel only with an irqchip
		step("lapic", func() (e error) { s.LAPIC, e = c.LAPIC(); return })
	}
	step("msrs", func() error {
		idx, e := c.readableMSRs()
		if e != nil {
			return e
		}
		s.MSRs, e = c.GetMSRs(idx)
		return e
	})
	step("tsc khz", func() (e error) { s.TSCKHz, e = c.TSCKHz(); return })
	step("events", func() (e error) { s.Events, e = c.VCPUEvents(); return })
	if err != nil {
		return nil, err
	}
	return s, nil
}

// RestoreState writes s into a vCPU that is not running, typically a
// fresh one in a new VM.
//
// Order (each step depends on the ones before it): CPUID (decides which
// XSAVE features and MSRs exist), TSC frequency, MP state, registers,
// segment registers (EFER, CR0/CR4 and the APIC base before anything that
// depends on the mode), XSAVE, XCRs, debug registers, LAPIC (after the
// APIC base in sregs), MSRs (after the LAPIC, so TSC_DEADLINE sticks),
// vCPU events last (pending exceptions and interrupts refer to all of the
// above).
func (c *VCPU) RestoreState(s *VCPUState) error {
	var err error
	step := func(name string, f func() error) {
		if err == nil {
			if e := f(); e != nil {
				err = fmt.Errorf("restore vCPU %d %s: %w", c.id, name, e)
			}
		}
	}
	if len(s.CPUID) > 0 {
		step("cpuid", func() error { return c.SetCPUID(s.CPUID) })
	}
	if s.TSCKHz != 0 {
		step("tsc khz", func() error {
			cur, e := c.TSCKHz()
			if e != nil || cur == s.TSCKHz {
				return e
			}
			return c.SetTSCKHz(s.TSCKHz)
		})
	}
	step("mp state", func() error { return c.SetMPState(s.MPState) })
	step("regs", func() error { return c.SetRegs(s.Regs) })
	step("sregs", func() error { return c.SetSregs(s.Sregs) })
	step("xsave", func() error { return c.SetXSave(s.XSave) })
	step("xcrs", func() error { return c.SetXCRs(s.XCRs) })
	step("debug regs", func() error { return c.SetDebugRegs(s.DebugRegs) })
	step("lapic", func() error {
		if s.LAPIC == (LAPICState{}) {
			return nil
		}
		return c.SetLAPIC(s.LAPIC)
	})
	step("msrs", func() error {
		_, err := c.SetMSRsBestEffort(s.MSRs)
		return err
	})
	step("events", func() error { return c.SetVCPUEvents(s.Events) })
	return err
}

// VMState is the VM-wide state KVM keeps outside the vCPUs: both PICs, the
// IOAPIC, the PIT and kvmclock. HasIRQChip/HasPIT say which parts exist.
type VMState struct {
	HasIRQChip bool
	PICMaster  IRQChipState
	PICSlave   IRQChipState
	IOAPIC     IRQChipState
	HasPIT     bool
	PIT        PITState2
	Clock      ClockData
}

// SaveState reads the VM-wide state. hasIRQChip and hasPIT say whether the
// VM was created with KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2.
func (vm *VM) SaveState(hasIRQChip, hasPIT bool) (*VMState, error) {
	s := &VMState{HasIRQChip: hasIRQChip, HasPIT: hasPIT}
	var err error
	if hasIRQChip {
		if s.PICMaster, err = vm.IRQChip(IRQChipPICMaster); err != nil {
			return nil, fmt.Errorf("save PIC master: %w", err)
		}
		if s.PICSlave, err = vm.IRQChip(IRQChipPICSlave); err != nil {
			return nil, fmt.Errorf("save PIC slave: %w", err)
		}
		if s.IOAPIC, err = vm.IRQChip(IRQChipIOAPIC); err != nil {
			return nil, fmt.Errorf("save IOAPIC: %w", err)
		}
	}
	if hasPIT {
		if s.PIT, err = vm.PIT2(); err != nil {
			return nil, fmt.Errorf("save PIT: %w", err)
		}
	}
	if s.Clock, err = vm.Clock(); err != nil {
		return nil, fmt.Errorf("save clock: %w", err)
	}
	return s, nil
}

// RestoreState writes s into a VM that was created with the same irqchip
// and PIT. Order: PICs, IOAPIC, PIT, then the clock last so kvmclock
// continues from the saved value when vCPUs resume.
func (vm *VM) RestoreState(s *VMState) error {
	if s.HasIRQChip {
		for _, c := range []IRQChipState{s.PICMaster, s.PICSlave, s.IOAPIC} {
			if err := vm.SetIRQChip(c); err != nil {
				return fmt.Errorf("restore irqchip %d: %w", c.ChipID, err)
			}
		}
	}
	if s.HasPIT {
		if err := vm.SetPIT2(s.PIT); err != nil {
			return fmt.Errorf("restore PIT: %w", err)
		}
	}
	if err := vm.SetClock(s.Clock); err != nil {
		return fmt.Errorf("restore clock: %w", err)
	}
	return nil
}
