package kvm

import (
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine (a VM fd).
type VM struct {
	fd  int
	sys *System

	mu       sync.Mutex
	slots    map[uint32]*memSlot
	readable []uint32 // MSRs a vCPU of this VM can read, probed once

	irqchip      bool // KVM_CREATE_IRQCHIP done
	manualDirty  bool // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled
	dirtyInitSet bool // ... with KVM_DIRTY_LOG_INITIALLY_SET
}

type memSlot struct {
	gpa   uint64
	host  []byte
	flags uint32
}

// FD returns the VM file descriptor.
func (vm *VM) FD() int { return vm.fd }

// System returns the System the VM was created from.
func (vm *VM) System() *System { return vm.sys }

// Close closes the VM fd. Close the vCPUs first.
func (vm *VM) Close() error {
	return closeFD(&vm.fd)
}

// CheckExtension issues KVM_CHECK_EXTENSION on the VM fd (the answer can
// differ from the system's for VM-specific capabilities).
func (vm *VM) CheckExtension(c Cap) (int, error) {
	r, err := ioctlVal(vm.fd, kvmCheckExtension, uintptr(c), "KVM_CHECK_EXTENSION")
	return int(r), err
}

// EnableCap issues KVM_ENABLE_CAP on the VM.
func (vm *VM) EnableCap(c Cap, flags uint32, args ...uint64) error {
	ec := enableCap{Cap: uint32(c), Flags: flags}
	if len(args) > len(ec.Args) {
		return fmt.Errorf("KVM_ENABLE_CAP %d: %d args, at most %d", c, len(args), len(ec.Args))
	}
	copy(ec.Args[:], args)
	_, err := ioctlRetry(vm.fd, kvmEnableCap, unsafe.Pointer(&ec), "KVM_ENABLE_CAP")
	return err
}

// SetUserMemoryRegion issues KVM_SET_USER_MEMORY_REGION: it maps host into
// the guest at gpa as slot, with flags (MemLogDirtyPages, MemReadonly).
// A nil or empty host deletes the slot.
func (vm *VM) SetUserMemoryRegion(slot uint32, flags uint32, gpa uint64, host []byte) error {
	r := userspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: uint64(len(host))}
	if len(host) > 0 {
		r.UserspaceAddr = uint64(uintptr(unsafe.Pointer(&host[0])))
	}
	if _, err := ioctlRetry(vm.fd, kvmSetUserMemoryRegion, unsafe.Pointer(&r), "KVM_SET_USER_MEMORY_REGION"); err != nil {
		return err
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if len(host) == 0 {
		delete(vm.slots, slot)
	} else {
		vm.slots[slot] = &memSlot{gpa: gpa, host: host, flags: flags}
	}
	return nil
}

// RemoveMemoryRegion deletes a slot.
func (vm *VM) RemoveMemoryRegion(slot uint32) error {
	return vm.SetUserMemoryRegion(slot, 0, 0, nil)
}

// SetSlotFlags changes the flags of an existing slot (for example to turn
// dirty logging on or off).
func (vm *VM) SetSlotFlags(slot uint32, flags uint32) error {
	vm.mu.Lock()
	s, ok := vm.slots[slot]
	vm.mu.Unlock()
	if !ok {
		return fmt.Errorf("memory slot %d: not registered", slot)
	}
	return vm.SetUserMemoryRegion(slot, flags, s.gpa, s.host)
}

// AddMemory registers every region of mem as slots first, first+1, ...
func (vm *VM) AddMemory(mem *Memory, first uint32, flags uint32) error {
	for i, r := range mem.Regions() {
		if err := vm.SetUserMemoryRegion(first+uint32(i), flags, r.GPA, r.Host); err != nil {
			return fmt.Errorf("region %d at %#x: %w", i, r.GPA, err)
		}
	}
	return nil
}

// CreateIRQChip issues KVM_CREATE_IRQCHIP (PIC x2, IOAPIC, LAPICs in kernel).
func (vm *VM) CreateIRQChip() error {
	if _, err := ioctlValRetry(vm.fd, kvmCreateIRQChip, 0, "KVM_CREATE_IRQCHIP"); err != nil {
		return err
	}
	vm.mu.Lock()
	vm.irqchip = true
	vm.mu.Unlock()
	return nil
}

// HasIRQChip reports whether CreateIRQChip succeeded on this VM.
func (vm *VM) HasIRQChip() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.irqchip
}

// PIT2 flags.
const (
	// PITSpeakerDummy makes the in-kernel PIT emulate port 0x61's speaker bits.
	PITSpeakerDummy = 1
)

// CreatePIT2 issues KVM_CREATE_PIT2.
func (vm *VM) CreatePIT2(flags uint32) error {
	c := pitConfig{Flags: flags}
	_, err := ioctlRetry(vm.fd, kvmCreatePIT2, unsafe.Pointer(&c), "KVM_CREATE_PIT2")
	return err
}

// SetTSSAddr issues KVM_SET_TSS_ADDR (three pages the guest must not use).
func (vm *VM) SetTSSAddr(addr uint64) error {
	_, err := ioctlValRetry(vm.fd, kvmSetTSSAddr, uintptr(addr), "KVM_SET_TSS_ADDR")
	return err
}

// SetIdentityMapAddr issues KVM_SET_IDENTITY_MAP_ADDR (one page).
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	_, err := ioctlRetry(vm.fd, kvmSetIdentityMapAddr, unsafe.Pointer(&addr), "KVM_SET_IDENTITY_MAP_ADDR")
	return err
}

// IRQLine issues KVM_IRQ_LINE: drives GSI irq to level.
func (vm *VM) IRQLine(irq uint32, high bool) error {
	l := irqLevel{IRQ: irq}
	if high {
		l.Level = 1
	}
	_, err := ioctlRetry(vm.fd, kvmIRQLine, unsafe.Pointer(&l), "KVM_IRQ_LINE")
	return err
}

// Line returns GSI irq as an IRQ for devices.
func (vm *VM) Line(irq uint32) IRQ {
	return IRQFunc(func(high bool) error { return vm.IRQLine(irq, high) })
}

// SendMSI issues KVM_SIGNAL_MSI: injects the message-signalled interrupt
// (address, data) through the in-kernel irqchip. A message the guest's
// local APICs block is dropped, as on hardware; that is not an error.
func (vm *VM) SendMSI(addr uint64, data uint32) error {
	m := kvmMSI{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	_, err := ioctlRetry(vm.fd, kvmSignalMSI, unsafe.Pointer(&m), "KVM_SIGNAL_MSI")
	return err
}

// IRQFD issues KVM_IRQFD: a write to eventfd fd injects GSI gsi (edge).
func (vm *VM) IRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi}
	_, err := ioctlRetry(vm.fd, kvmIRQFD, unsafe.Pointer(&f), "KVM_IRQFD")
	return err
}

// RemoveIRQFD deassigns an irqfd.
func (vm *VM) RemoveIRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi, Flags: irqfdDeassign}
	_, err := ioctlRetry(vm.fd, kvmIRQFD, unsafe.Pointer(&f), "KVM_IRQFD")
	return err
}

// IOEventFD describes one ioeventfd registration.
type IOEventFD struct {
	FD        int    // eventfd signalled on a matching guest write
	Addr      uint64 // port or guest-physical address
	Len       uint32 // access size: 0 (any), 1, 2, 4 or 8
	PIO       bool   // a port rather than an MMIO address
	Datamatch *uint64
}

func (e IOEventFD) raw(deassign bool) ioeventfd {
	r := ioeventfd{Addr: e.Addr, Len: e.Len, FD: int32(e.FD)}
	if e.PIO {
		r.Flags |= ioeventfdPIO
	}
	if e.Datamatch != nil {
		r.Flags |= ioeventfdDatamatch
		r.Datamatch = *e.Datamatch
	}
	if deassign {
		r.Flags |= ioeventfdDeassign
	}
	return r
}

// AddIOEventFD issues KVM_IOEVENTFD.
func (vm *VM) AddIOEventFD(e IOEventFD) error {
	r := e.raw(false)
	_, err := ioctlRetry(vm.fd, kvmIOEventFD, unsafe.Pointer(&r), "KVM_IOEVENTFD")
	return err
}

// RemoveIOEventFD deassigns an ioeventfd.
func (vm *VM) RemoveIOEventFD(e IOEventFD) error {
	r := e.raw(true)
	_, err := ioctlRetry(vm.fd, kvmIOEventFD, unsafe.Pointer(&r), "KVM_IOEVENTFD")
	return err
}

// Clock issues KVM_GET_CLOCK.
func (vm *VM) Clock() (ClockData, error) {
	var c ClockData
	_, err := ioctlRetry(vm.fd, kvmGetClock, unsafe.Pointer(&c), "KVM_GET_CLOCK")
	return c, err
}

// SetClock issues KVM_SET_CLOCK. Only Clock (and Realtime with
// ClockRealtime in Flags) are used by the kernel.
func (vm *VM) SetClock(c ClockData) error {
	c.Flags &= ClockRealtime
	_, err := ioctlRetry(vm.fd, kvmSetClock, unsafe.Pointer(&c), "KVM_SET_CLOCK")
	return err
}

// IRQChip issues KVM_GET_IRQCHIP for chip (IRQChipPICMaster, ...).
func (vm *VM) IRQChip(chip uint32) (IRQChipState, error) {
	s := IRQChipState{ChipID: chip}
	_, err := ioctlRetry(vm.fd, kvmGetIRQChip, unsafe.Pointer(&s), "KVM_GET_IRQCHIP")
	return s, err
}

// SetIRQChip issues KVM_SET_IRQCHIP.
func (vm *VM) SetIRQChip(s IRQChipState) error {
	_, err := ioctlRetry(vm.fd, kvmSetIRQChip, unsafe.Pointer(&s), "KVM_SET_IRQCHIP")
	return err
}

// PIT2 issues KVM_GET_PIT2.
func (vm *VM) PIT2() (PITState2, error) {
	var s PITState2
	_, err := ioctlRetry(vm.fd, kvmGetPIT2, unsafe.Pointer(&s), "KVM_GET_PIT2")
	return s, err
}

// SetPIT2 issues KVM_SET_PIT2.
func (vm *VM) SetPIT2(s PITState2) error {
	_, err := ioctlRetry(vm.fd, kvmSetPIT2, unsafe.Pointer(&s), "KVM_SET_PIT2")
	return err
}

// CreateVCPU issues KVM_CREATE_VCPU and maps its kvm_run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	r, err := ioctlValRetry(vm.fd, kvmCreateVCPU, uintptr(id), "KVM_CREATE_VCPU")
	if err != nil {
		return nil, err
	}
	fd := int(r)
	run, err := unix.Mmap(fd, 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{fd: fd, id: id, vm: vm, run: run}, nil
}
