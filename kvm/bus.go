package kvm

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
)

// Device is a region of port-I/O or MMIO space. Offsets are relative to the
// base address the device was registered at. Read fills data (1, 2, 4 or 8
// bytes, little endian); Write consumes it. Both are called on vCPU threads,
// possibly concurrently from several vCPUs: a device guards its own state.
type Device interface {
	Read(off uint64, data []byte)
	Write(off uint64, data []byte)
}

// DeviceFunc adapts two functions to a Device. Either may be nil.
type DeviceFunc struct {
	ReadFunc  func(off uint64, data []byte)
	WriteFunc func(off uint64, data []byte)
}

// Read implements Device; without ReadFunc it returns all ones.
func (d DeviceFunc) Read(off uint64, data []byte) {
	if d.ReadFunc == nil {
		fillOnes(data)
		return
	}
	d.ReadFunc(off, data)
}

// Write implements Device.
func (d DeviceFunc) Write(off uint64, data []byte) {
	if d.WriteFunc != nil {
		d.WriteFunc(off, data)
	}
}

// OverlapError is returned when a device range collides with one already on
// the bus.
type OverlapError struct {
	Base, Size         uint64
	OtherBase, OtherSz uint64
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("bus range [%#x,+%#x) overlaps [%#x,+%#x)", e.Base, e.Size, e.OtherBase, e.OtherSz)
}

type busEntry struct {
	base, size uint64
	dev        Device
}

// Bus maps address ranges to devices: one Bus serves port I/O, another MMIO.
// Lookups are a binary search over an immutable sorted slice (copy on write),
// so the exit path takes no lock and allocates nothing.
//
// Accesses that hit no device read as all ones and are counted; writes to
// nothing are dropped and counted.
type Bus struct {
	mu      sync.Mutex // serialises writers
	entries atomic.Pointer[[]busEntry]

	unhandledReads  atomic.Uint64
	unhandledWrites atomic.Uint64
}

// NewBus returns an empty bus.
func NewBus() *Bus {
	b := &Bus{}
	e := []busEntry{}
	b.entries.Store(&e)
	return b
}

// Register places dev at [base, base+size).
func (b *Bus) Register(base, size uint64, dev Device) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("bus range [%#x,+%#x): empty or wraps", base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.entries.Load()
	for _, e := range old {
		if base < e.base+e.size && e.base < base+size {
			return &OverlapError{Base: base, Size: size, OtherBase: e.base, OtherSz: e.size}
		}
	}
	next := make([]busEntry, 0, len(old)+1)
	next = append(next, old...)
	next = append(next, busEntry{base: base, size: size, dev: dev})
	sort.Slice(next, func(i, j int) bool { return next[i].base < next[j].base })
	b.entries.Store(&next)
	return nil
}

// Unregister removes the device registered at base.
func (b *Bus) Unregister(base uint64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.entries.Load()
	for i, e := range old {
		if e.base == base {
			next := make([]busEntry, 0, len(old)-1)
			next = append(next, old[:i]...)
			next = append(next, old[i+1:]...)
			b.entries.Store(&next)
			return true
		}
	}
	return false
}

// Lookup returns the device covering addr and addr's offset inside it.
func (b *Bus) Lookup(addr uint64) (Device, uint64, bool) {
	es := *b.entries.Load()
	i := sort.Search(len(es), func(i int) bool { return es[i].base+es[i].size > addr })
	if i < len(es) && addr >= es[i].base {
		return es[i].dev, addr - es[i].base, true
	}
	return nil, 0, false
}

// Read dispatches a read of len(data) bytes at addr.
func (b *Bus) Read(addr uint64, data []byte) {
	if d, off, ok := b.Lookup(addr); ok {
		d.Read(off, data)
		return
	}
	b.unhandledReads.Add(1)
	fillOnes(data)
}

// Write dispatches a write of data at addr.
func (b *Bus) Write(addr uint64, data []byte) {
	if d, off, ok := b.Lookup(addr); ok {
		d.Write(off, data)
		return
	}
	b.unhandledWrites.Add(1)
}

// Unhandled returns how many reads and writes hit no device.
func (b *Bus) Unhandled() (reads, writes uint64) {
	return b.unhandledReads.Load(), b.unhandledWrites.Load()
}

func fillOnes(data []byte) {
	for i := range data {
		data[i] = 0xff
	}
}
