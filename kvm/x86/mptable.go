package x86

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// MP table placement and platform addresses.
const (
	// MPTableAddr is where kvmkit puts the MP floating pointer: the last KiB
	// of base memory, which Linux scans and the boot loaders' e820 map marks
	// reserved. The configuration table follows it.
	MPTableAddr = 0x9FC00
	// MaxMPCPUs is the most processors an MP table describes: APIC IDs are
	// 8 bits, 0xFF is the broadcast ID, and the IOAPIC takes ID ncpus.
	MaxMPCPUs = 254
	// IOAPICAddr and LAPICAddr are the standard MMIO bases.
	IOAPICAddr = 0xFEC00000
	LAPICAddr  = 0xFEE00000
)

// MP table structure sizes and codes (MultiProcessor Specification 1.4).
const (
	mpfSize        = 16
	mpcHeaderSize  = 44
	mpProcSize     = 20
	mpEntrySize    = 8 // bus, IOAPIC, I/O and local interrupt entries
	mpSpecRev      = 4
	mpEntryProc    = 0
	mpEntryBus     = 1
	mpEntryIOAPIC  = 2
	mpEntryIOInt   = 3
	mpEntryLocInt  = 4
	mpIntINT       = 0
	mpIntNMI       = 1
	mpIntExtINT    = 3
	mpCPUEnabled   = 1 << 0
	mpCPUBoot      = 1 << 1
	mpLAPICVersion = 0x14
	mpIOAPICVer    = 0x11
	mpCPUSignature = 0x600 // family 6
	mpCPUFeatures  = 0x201 // FPU, APIC
	isaIRQs        = 16
)

// ErrTooManyCPUs is wrapped when a CPU count exceeds MaxMPCPUs.
var ErrTooManyCPUs = errors.New("too many CPUs for an MP table")

// MPOptions configure WriteMPTable.
type MPOptions struct {
	// IdentityIRQ0 routes ISA IRQ0 to IOAPIC pin 0 (KVM's default GSI
	// routing) instead of pin 2. The default, pin 2, matches what Linux and
	// PC firmware expect (the timer override) and needs GSI 0 routed to
	// IOAPIC pin 2 with KVM_SET_GSI_ROUTING, as QEMU does.
	IdentityIRQ0 bool
}

// MPTableSize returns the bytes WriteMPTable writes for ncpus processors.
func MPTableSize(ncpus int, opts MPOptions) uint64 {
	return uint64(mpfSize + mpcHeaderSize + ncpus*mpProcSize + mpEntrySize*(2+ioIntCount(opts)+2))
}

func ioIntCount(opts MPOptions) int {
	if opts.IdentityIRQ0 {
		return isaIRQs
	}
	return isaIRQs - 1 // IRQ2 (the cascade) has no pin: IRQ0 uses pin 2
}

func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}

// WriteMPTable writes an Intel MP table at addr: the floating pointer
// ("_MP_") followed by the configuration table ("PCMP") with one enabled
// processor per vCPU (APIC IDs 0..ncpus-1, CPU 0 the bootstrap processor),
// an ISA bus, the IOAPIC (ID ncpus, version 0x11, at 0xFEC00000), I/O
// interrupt entries for ISA IRQs 0-15 (IRQ0 on pin 2 unless
// opts.IdentityIRQ0, the others on their own pin) and local interrupt
// entries (ExtINT on LINT0, NMI on LINT1). It returns the bytes written
// (MPTableSize). For the floating pointer to be found, addr must be in the
// first KiB of the EBDA, the last KiB of base memory (MPTableAddr) or
// 0xF0000-0xFFFFF, 16-byte aligned; the whole table must be reserved in the
// guest's memory map.
func WriteMPTable(mem kvm.GuestMemory, addr uint64, ncpus int, opts MPOptions) (uint64, error) {
	if ncpus < 1 || ncpus > MaxMPCPUs {
		return 0, fmt.Errorf("MP table for %d CPUs (limit 1..%d): %w", ncpus, MaxMPCPUs, ErrTooManyCPUs)
	}
	if addr%16 != 0 || addr+MPTableSize(ncpus, opts) > 1<<32 {
		return 0, fmt.Errorf("MP table address %#x: must be 16-byte aligned and below 4 GiB", addr)
	}
	le := binary.LittleEndian
	cfg := addr + mpfSize
	var t []byte // configuration table
	t = append(t, "PCMP"...)
	t = le.AppendUint16(t, 0) // base table length, patched below
	t = append(t, mpSpecRev, 0)
	t = append(t, "KVMKIT  "...)     // OEM ID, 8 bytes
	t = append(t, "KVMKIT MP   "...) // product ID, 12 bytes
	t = le.AppendUint32(t, 0)        // OEM table pointer
	t = le.AppendUint16(t, 0)        // OEM table size
	t = le.AppendUint16(t, 0)        // entry count, patched below
	t = le.AppendUint32(t, LAPICAddr)
	t = le.AppendUint16(t, 0) // extended table length
	t = append(t, 0, 0)       // extended checksum, reserved
	entries := 0
	for i := range ncpus {
		flags := byte(mpCPUEnabled)
		if i == 0 {
			flags |= mpCPUBoot
		}
		t = append(t, mpEntryProc, byte(i), mpLAPICVersion, flags)
		t = le.AppendUint32(t, mpCPUSignature)
		t = le.AppendUint32(t, mpCPUFeatures)
		t = append(t, make([]byte, 8)...)
		entries++
	}
	t = append(t, mpEntryBus, 0)
	t = append(t, "ISA   "...)
	ioapicID := byte(ncpus)
	t = append(t, mpEntryIOAPIC, ioapicID, mpIOAPICVer, 1)
	t = le.AppendUint32(t, IOAPICAddr)
	entries += 2
	for irq := range byte(isaIRQs) {
		pin := irq
		if !opts.IdentityIRQ0 {
			if irq == 2 {
				continue
			}
			if irq == 0 {
				pin = 2
			}
		}
		// Flags 0: polarity and trigger conform to the ISA bus (edge, high).
		t = append(t, mpEntryIOInt, mpIntINT, 0, 0, 0, irq, ioapicID, pin)
		entries++
	}
	t = append(t, mpEntryLocInt, mpIntExtINT, 0, 0, 0, 0, 0xFF, 0)
	t = append(t, mpEntryLocInt, mpIntNMI, 0, 0, 0, 0, 0xFF, 1)
	entries += 2
	le.PutUint16(t[4:], uint16(len(t)))
	le.PutUint16(t[34:], uint16(entries))
	t[7] = checksum(t)

	f := make([]byte, 0, mpfSize)
	f = append(f, "_MP_"...)
	f = le.AppendUint32(f, uint32(cfg))
	f = append(f, 1, mpSpecRev, 0) // length in 16-byte units, revision, checksum
	f = append(f, 0, 0, 0, 0, 0)   // feature bytes: config table present, virtual wire
	f[10] = checksum(f)

	if _, err := mem.WriteAt(f, int64(addr)); err != nil {
		return 0, fmt.Errorf("writing MP floating pointer at %#x: %w", addr, err)
	}
	if _, err := mem.WriteAt(t, int64(cfg)); err != nil {
		return 0, fmt.Errorf("writing MP configuration table at %#x: %w", cfg, err)
	}
	return uint64(len(f) + len(t)), nil
}
