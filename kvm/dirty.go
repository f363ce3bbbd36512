package kvm

import (
	"fmt"
	"math/bits"
	"unsafe"
)

// DirtyLog tracks the pages the guest writes, per memory slot. It uses
// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (with INITIALLY_SET when offered) and
// KVM_CLEAR_DIRTY_LOG where the kernel has it, and the legacy
// KVM_GET_DIRTY_LOG (which clears as it reads) otherwise.
//
// Harvest returns, for one slot, the pages written since the last Harvest
// or, the first time, since StartDirtyLog returned: tracking starts with
// every page clean.
type DirtyLog struct {
	vm     *VM
	manual bool
	slots  map[uint32]*dirtySlot
}

type dirtySlot struct {
	pages  uint64
	bitmap []uint64
}

// EnableManualDirtyLog turns on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 for the
// VM. It must be called before any slot gets MemLogDirtyPages. It returns
// false if the kernel does not offer it.
func (vm *VM) EnableManualDirtyLog() (bool, error) {
	caps, err := vm.CheckExtension(CapManualDirtyLogProtect2)
	if err != nil || caps == 0 {
		return false, nil
	}
	flags := uint64(dirtyLogManualProtectEnable)
	if caps&dirtyLogInitiallySet != 0 {
		flags |= dirtyLogInitiallySet
	}
	if err := vm.EnableCap(CapManualDirtyLogProtect2, 0, flags); err != nil {
		return false, err
	}
	vm.mu.Lock()
	vm.manualDirty = true
	vm.dirtyInitSet = flags&dirtyLogInitiallySet != 0
	vm.mu.Unlock()
	return true, nil
}

// StartDirtyLog turns dirty logging on for the given slots and returns the
// tracker.
func (vm *VM) StartDirtyLog(slots ...uint32) (*DirtyLog, error) {
	vm.mu.Lock()
	manual, initSet := vm.manualDirty, vm.dirtyInitSet
	vm.mu.Unlock()
	d := &DirtyLog{vm: vm, manual: manual, slots: map[uint32]*dirtySlot{}}
	for _, slot := range slots {
		vm.mu.Lock()
		s, ok := vm.slots[slot]
		vm.mu.Unlock()
		if !ok {
			d.Stop()
			return nil, fmt.Errorf("dirty log: memory slot %d not registered", slot)
		}
		if err := vm.SetSlotFlags(slot, s.flags|MemLogDirtyPages); err != nil {
			d.Stop()
			return nil, fmt.Errorf("dirty log: enable on slot %d: %w", slot, err)
		}
		pages := uint64(len(s.host)) / PageSize
		ds := &dirtySlot{pages: pages, bitmap: make([]uint64, (pages+63)/64)}
		d.slots[slot] = ds
		if manual && initSet {
			// INITIALLY_SET reports every page dirty and leaves them
			// writable; clear them all so tracking starts clean.
			for i := range ds.bitmap {
				ds.bitmap[i] = ^uint64(0)
			}
			if err := d.clear(slot, ds); err != nil {
				d.Stop()
				return nil, err
			}
		}
	}
	return d, nil
}

// Manual reports whether the tracker uses KVM_CLEAR_DIRTY_LOG.
func (d *DirtyLog) Manual() bool { return d.manual }

// Harvest fetches the dirty bitmap of slot (bit i = page i of the slot) and
// re-arms tracking for those pages. The returned slice is reused by the
// next Harvest of the same slot.
func (d *DirtyLog) Harvest(slot uint32) ([]uint64, error) {
	s, ok := d.slots[slot]
	if !ok {
		return nil, fmt.Errorf("dirty log: slot %d not tracked", slot)
	}
	dl := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&s.bitmap[0])))}
	if _, err := ioctlRetry(d.vm.fd, kvmGetDirtyLog, unsafe.Pointer(&dl), "KVM_GET_DIRTY_LOG"); err != nil {
		return nil, err
	}
	if d.manual {
		if err := d.clear(slot, s); err != nil {
			return nil, err
		}
	}
	return s.bitmap, nil
}

// clear re-protects the harvested pages (manual mode), in 64-page aligned
// chunks as KVM_CLEAR_DIRTY_LOG requires.
func (d *DirtyLog) clear(slot uint32, s *dirtySlot) error {
	if s.pages == 0 {
		return nil
	}
	c := clearDirtyLog{
		Slot:      slot,
		FirstPage: 0,
		NumPages:  uint32(s.pages),
		Bitmap:    uint64(uintptr(unsafe.Pointer(&s.bitmap[0]))),
	}
	if _, err := ioctlRetry(d.vm.fd, kvmClearDirtyLog, unsafe.Pointer(&c), "KVM_CLEAR_DIRTY_LOG"); err != nil {
		return fmt.Errorf("clear dirty log of slot %d: %w", slot, err)
	}
	return nil
}

// Stop turns dirty logging off for every tracked slot.
func (d *DirtyLog) Stop() error {
	var first error
	for slot := range d.slots {
		d.vm.mu.Lock()
		s, ok := d.vm.slots[slot]
		d.vm.mu.Unlock()
		if !ok {
			continue
		}
		if err := d.vm.SetSlotFlags(slot, s.flags&^MemLogDirtyPages); err != nil && first == nil {
			first = err
		}
	}
	d.slots = map[uint32]*dirtySlot{}
	return first
}

// CountDirty returns the number of set bits in a bitmap.
func CountDirty(bitmap []uint64) int {
	n := 0
	for _, w := range bitmap {
		n += bits.OnesCount64(w)
	}
	return n
}
