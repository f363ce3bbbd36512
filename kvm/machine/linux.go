package machine

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/boot"
	"github.com/kvmkit/kvmkit/kvm/devices"
	"github.com/kvmkit/kvmkit/kvm/x86"
)

// LinuxOptions tune LoadLinux.
type LinuxOptions struct {
	// NoPVH boots an ELF kernel through its 64-bit entry even when it has a
	// PVH note.
	NoPVH bool
	// NoACPI leaves out the ACPI tables: the kernel then finds its CPUs and
	// interrupt routing in the MP table alone, and cannot power the machine
	// off (poweroff halts the vCPUs; reboot still ends the run).
	NoACPI bool
}

// SCIGSI is the GSI the ACPI tables name as the system control interrupt.
// Nothing raises it; it is ISA IRQ 13 (the unused x87 error line), clear of
// COM1, the RTC, the i8042 and the lines vmm gives virtio devices.
const SCIGSI = 13

// LAPIC register offsets and delivery modes used for the BSP's LINT pins.
const (
	lapicLVT0     = 0x350
	lapicLVT1     = 0x360
	lvtModeExtINT = 7 << 8
	lvtModeNMI    = 4 << 8
)

// LoadLinux loads a Linux kernel (bzImage, vmlinux ELF or PVH ELF) with an
// optional initrd and command line, writes an MP table and (unless
// opts.NoACPI) PC-compatible ACPI tables for the vCPUs, adds the ACPI PM
// registers through which the guest powers off (the run then ends with
// kvm.StopPowerOff), sets the boot MSRs and FPU state, wires the BSP's LINT0 to the PIC
// (ExtINT) and LINT1 to NMI, and sets vCPU 0's entry registers. The
// application processors wait, uninitialized, for the kernel's INIT/SIPI
// through the in-kernel LAPIC.
func (m *Machine) LoadLinux(kernel, initrd []byte, cmdline string, opts LinuxOptions) (*boot.Entry, error) {
	if m.cfg.NoIRQChip {
		return nil, fmt.Errorf("machine: Linux needs the in-kernel irqchip")
	}
	var rsdp uint64
	if !opts.NoACPI {
		at, err := x86.WriteACPI(m.mem, x86.ACPIAddr, len(m.vcpus), x86.ACPIOptions{
			IdentityIRQ0: true, I8042: true, PMPort: devices.ACPIPMBase, SCI: SCIGSI,
		})
		if err != nil {
			return nil, fmt.Errorf("machine: ACPI tables: %w", err)
		}
		if err := m.addACPIPM(); err != nil {
			return nil, err
		}
		rsdp = at.RSDP
	}
	e, err := boot.LoadLinux(m.mem, kernel, initrd, cmdline, boot.LinuxOptions{
		Reserved: []boot.E820Entry{{Addr: MMIOHoleStart, Size: HighRAMStart - MMIOHoleStart}},
		RSDP:     rsdp,
		NoPVH:    opts.NoPVH,
	})
	if err != nil {
		return nil, err
	}
	if _, err := x86.WriteMPTable(m.mem, x86.MPTableAddr, len(m.vcpus), x86.MPOptions{IdentityIRQ0: true}); err != nil {
		return nil, fmt.Errorf("machine: MP table: %w", err)
	}
	for i, c := range m.vcpus {
		if err := c.SetMSRs(x86.BootMSRs()); err != nil {
			return nil, fmt.Errorf("vCPU %d: %w", i, err)
		}
		if err := c.SetFPU(x86.BootFPU()); err != nil {
			return nil, fmt.Errorf("vCPU %d: %w", i, err)
		}
		if err := setupLINT(c); err != nil {
			return nil, fmt.Errorf("vCPU %d: %w", i, err)
		}
	}
	if err := m.applyEntry(e); err != nil {
		return nil, err
	}
	return e, nil
}

// addACPIPM registers the ACPI PM1a registers (once per machine): a write
// of the \_S5 sleep type powers the machine off.
func (m *Machine) addACPIPM() error {
	if _, _, ok := m.pio.Lookup(devices.ACPIPMBase); ok {
		return nil
	}
	pm := devices.NewACPIPM(func(typ uint8) {
		if typ == x86.SleepTypeS5 {
			m.stop(kvm.Result{Reason: kvm.StopPowerOff})
			return
		}
		m.log.Warn("guest asked for an unsupported ACPI sleep state", "slp_typ", typ)
	})
	if err := m.pio.Register(devices.ACPIPMBase, devices.ACPIPMSize, pm); err != nil {
		return fmt.Errorf("machine: ACPI PM registers: %w", err)
	}
	return nil
}

// setupLINT programs LVT0 as ExtINT (the 8259 PIC's output) and LVT1 as
// NMI, as PC firmware leaves them for the kernel.
func setupLINT(c *kvm.VCPU) error {
	l, err := c.LAPIC()
	if err != nil {
		return err
	}
	lvt0 := binary.LittleEndian.Uint32(l.Regs[lapicLVT0:])
	lvt1 := binary.LittleEndian.Uint32(l.Regs[lapicLVT1:])
	binary.LittleEndian.PutUint32(l.Regs[lapicLVT0:], lvt0&^0x10700|lvtModeExtINT)
	binary.LittleEndian.PutUint32(l.Regs[lapicLVT1:], lvt1&^0x10700|lvtModeNMI)
	return c.SetLAPIC(l)
}
