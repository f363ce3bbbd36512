// Package pci is the virtio-pci modern transport (virtio 1.2 section 4.1)
// with MSI-X, plus a minimal PCI host bridge reached through configuration
// mechanism #1 (ports 0xCF8/0xCFC), so that a distribution kernel without
// virtio-mmio command-line support finds virtio devices by PCI probing.
package pci

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// Host bridge port range: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC.
const (
	ConfigPortBase = 0xcf8
	ConfigPortSize = 8
)

// Function is one PCI function's configuration space.
type Function interface {
	// ReadConfig reads len(data) bytes of configuration space at off.
	ReadConfig(off uint64, data []byte)
	// WriteConfig writes configuration space at off.
	WriteConfig(off uint64, data []byte)
}

// HostBridge is bus 0 of a PCI hierarchy behind configuration mechanism #1.
// Register it on the port-I/O bus at ConfigPortBase with size
// ConfigPortSize. Slot 0 is the host bridge itself.
type HostBridge struct {
	mu    sync.Mutex
	addr  uint32
	slots [32]Function
}

// NewHostBridge returns a bridge whose slot 0 holds a host bridge function.
func NewHostBridge() *HostBridge {
	b := &HostBridge{}
	b.slots[0] = &hostFunction{}
	return b
}

// Add places f in the first free slot and returns the slot number.
func (b *HostBridge) Add(f Function) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		if b.slots[i] == nil {
			b.slots[i] = f
			return i, nil
		}
	}
	return 0, fmt.Errorf("pci: all 32 slots of bus 0 are in use")
}

// Read implements kvm.Device.
func (b *HostBridge) Read(off uint64, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if off < 4 {
		if off == 0 && len(data) == 4 {
			binary.LittleEndian.PutUint32(data, b.addr)
		}
		return
	}
	if f, reg := b.target(off); f != nil {
		f.ReadConfig(reg, data)
	}
}

// Write implements kvm.Device.
func (b *HostBridge) Write(off uint64, data []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if off < 4 {
		if off == 0 && len(data) == 4 {
			b.addr = binary.LittleEndian.Uint32(data) & 0x80fffffc
		}
		return
	}
	if f, reg := b.target(off); f != nil {
		f.WriteConfig(reg, data)
	}
}

// target decodes CONFIG_ADDRESS for a data port access at off (4..7).
func (b *HostBridge) target(off uint64) (Function, uint64) {
	a := b.addr
	if a&0x80000000 == 0 {
		return nil, 0
	}
	bus, dev, fn := (a>>16)&0xff, (a>>11)&0x1f, (a>>8)&7
	if bus != 0 || fn != 0 {
		return nil, 0
	}
	return b.slots[dev], uint64(a&0xfc) + off - 4
}

// hostFunction is the configuration space of the host bridge at 00:00.0.
type hostFunction struct{}

func (hostFunction) ReadConfig(off uint64, data []byte) {
	var c [64]byte
	binary.LittleEndian.PutUint16(c[0:], 0x1b36) // Red Hat, Inc.
	binary.LittleEndian.PutUint16(c[2:], 0x0008) // PCIe host bridge
	c[0x0b] = 0x06                               // class: bridge
	c[0x0a] = 0x00                               // subclass: host bridge
	clear(data)
	if off < uint64(len(c)) {
		copy(data, c[off:])
	}
}

func (hostFunction) WriteConfig(off uint64, data []byte) {}
