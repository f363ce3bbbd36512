package machine

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/boot"
)

// Mode selects the bare-metal ABI of a flat image.
type Mode = boot.FlatMode

// ParseMode parses "long" or "real".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "", "long":
		return boot.FlatLong, nil
	case "real":
		return boot.FlatReal, nil
	}
	return 0, fmt.Errorf("mode %q: want long or real", s)
}

// LoadFlat loads a flat bare-metal image per kvmkit's guest ABI and sets
// every vCPU's entry registers.
func (m *Machine) LoadFlat(image []byte, mode Mode) error {
	e, err := boot.LoadFlat(m.mem, image, boot.FlatOptions{Mode: mode, VCPUs: len(m.vcpus)})
	if err != nil {
		return err
	}
	return m.applyEntry(e)
}

// applyEntry loads e's registers into the vCPUs that start at it. With the
// in-kernel irqchip, KVM holds application processors in
// MP_STATE_UNINITIALIZED; an ABI where every vCPU starts at the entry makes
// them runnable.
func (m *Machine) applyEntry(e *boot.Entry) error {
	for i, c := range m.vcpus {
		if !e.Starts(i) {
			continue
		}
		regs, err := c.Regs()
		if err != nil {
			return err
		}
		sregs, err := c.Sregs()
		if err != nil {
			return err
		}
		e.Apply(i, len(m.vcpus), &regs, &sregs)
		if err := c.SetSregs(sregs); err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
		if err := c.SetRegs(regs); err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
		if i > 0 && !m.cfg.NoIRQChip {
			if err := c.SetMPState(kvm.MPStateRunnable); err != nil {
				return fmt.Errorf("vCPU %d: %w", i, err)
			}
		}
	}
	return nil
}
