package boot

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/kvmkit/kvmkit/kvm"
)

// Fixed guest-physical addresses used by the loaders (see the package doc).
const (
	GDTAddr         = 0x500
	StartInfoAddr   = 0x6000 // PVH hvm_start_info
	ModlistAddr     = 0x6040 // PVH hvm_modlist_entry array
	MemmapAddr      = 0x6080 // PVH hvm_memmap_table_entry array
	ZeroPageAddr    = 0x7000 // Linux boot_params
	RealModeLoad    = 0x7C00 // flat real-mode image
	PML4Addr        = 0x9000
	PDPTAddr        = 0xA000
	PDAddr          = 0xB000 // four page directories, 0xB000-0xEFFF
	CmdlineAddr     = 0x20000
	EBDAStart       = 0x9FC00 // start of the reserved low area (MP table lives here)
	HighMemStart    = 0x100000
	KernelLoadAddr  = 0x100000 // flat long-mode image and bzImage kernel
	realModeLimit   = 0xA0000  // real-mode image must end below this
	pageTablesEnd   = 0xF000
	cmdlineLimit    = EBDAStart // the command line must end below this
	maxE820Entries  = 128       // E820_MAX_ENTRIES_ZEROPAGE
	fourGiB         = 1 << 32
	identityMapSize = fourGiB
)

// E820 memory types.
const (
	E820RAM      = 1
	E820Reserved = 2
	E820ACPI     = 3
	E820NVS      = 4
)

// E820Entry is one entry of the BIOS e820 memory map (also the PVH memory
// map). Size is in bytes.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// End returns the first address past the entry.
func (e E820Entry) End() uint64 { return e.Addr + e.Size }

// regionLister is implemented by *kvm.Memory.
type regionLister interface{ Regions() []kvm.Region }

// ramOf returns the RAM regions to use: ram if given, else those of mem if
// it can list them.
func ramOf(mem kvm.GuestMemory, ram []kvm.RegionSpec) ([]kvm.RegionSpec, error) {
	if len(ram) == 0 {
		rl, ok := mem.(regionLister)
		if !ok {
			return nil, layoutErr("RAM", "no RAM regions given and the guest memory cannot list its regions")
		}
		for _, r := range rl.Regions() {
			ram = append(ram, kvm.RegionSpec{GPA: r.GPA, Size: uint64(len(r.Host))})
		}
		if len(ram) == 0 {
			return nil, layoutErr("RAM", "guest memory has no regions")
		}
	}
	out := append([]kvm.RegionSpec(nil), ram...)
	sort.Slice(out, func(i, j int) bool { return out[i].GPA < out[j].GPA })
	for i, r := range out {
		if r.Size == 0 || r.GPA+r.Size < r.GPA {
			return nil, layoutErr("RAM", "region %d at %#x has invalid size %#x", i, r.GPA, r.Size)
		}
		if i > 0 && r.GPA < out[i-1].GPA+out[i-1].Size {
			return nil, layoutErr("RAM", "region at %#x overlaps the previous one", r.GPA)
		}
	}
	return out, nil
}

// ramSize is the total RAM in bytes.
func ramSize(ram []kvm.RegionSpec) uint64 {
	var n uint64
	for _, r := range ram {
		n += r.Size
	}
	return n
}

// ramContains reports whether [gpa, gpa+n) lies inside one RAM region.
func ramContains(ram []kvm.RegionSpec, gpa, n uint64) bool {
	if gpa+n < gpa {
		return false
	}
	for _, r := range ram {
		if gpa >= r.GPA && gpa+n <= r.GPA+r.Size {
			return true
		}
	}
	return false
}

// regionEnd returns the end of the RAM region containing gpa, or 0.
func regionEnd(ram []kvm.RegionSpec, gpa uint64) uint64 {
	for _, r := range ram {
		if gpa >= r.GPA && gpa < r.GPA+r.Size {
			return r.GPA + r.Size
		}
	}
	return 0
}

// BuildE820 derives the e820 map from the RAM regions: RAM below EBDAStart,
// the reserved EBDA/BIOS area EBDAStart-0x100000 (where the MP table lives),
// RAM from 1 MiB up, plus the extra reserved ranges (for example MMIO
// windows) given by the caller. Entries are sorted by address; gaps between
// RAM regions (such as a 32-bit MMIO hole) are simply absent. It fails if
// the map would exceed the 128 entries the zero page can hold.
func BuildE820(ram []kvm.RegionSpec, reserved []E820Entry) ([]E820Entry, error) {
	var out []E820Entry
	for _, r := range ram {
		start, end := r.GPA, r.GPA+r.Size
		if start < EBDAStart {
			out = append(out, E820Entry{Addr: start, Size: min(end, EBDAStart) - start, Type: E820RAM})
		}
		if end > HighMemStart {
			s := max(start, HighMemStart)
			out = append(out, E820Entry{Addr: s, Size: end - s, Type: E820RAM})
		}
	}
	out = append(out, E820Entry{Addr: EBDAStart, Size: HighMemStart - EBDAStart, Type: E820Reserved})
	for _, e := range reserved {
		if e.Size == 0 || e.Addr+e.Size < e.Addr {
			return nil, layoutErr("e820", "reserved range at %#x has invalid size %#x", e.Addr, e.Size)
		}
		t := e.Type
		if t == 0 {
			t = E820Reserved
		}
		out = append(out, E820Entry{Addr: e.Addr, Size: e.Size, Type: t})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	if len(out) > maxE820Entries {
		return nil, layoutErr("e820", "%d entries exceed the zero page's %d", len(out), maxE820Entries)
	}
	return out, nil
}

// checkLowRAM verifies that the fixed low-memory boot structures are RAM.
func checkLowRAM(ram []kvm.RegionSpec, what string, end uint64) error {
	if !ramContains(ram, 0, end) {
		return layoutErr("RAM", "%s need RAM at [0, %#x)", what, end)
	}
	return nil
}

// write copies b to guest memory at gpa, naming what in the error.
func write(mem kvm.GuestMemory, gpa uint64, b []byte, what string) error {
	if _, err := mem.WriteAt(b, int64(gpa)); err != nil {
		return fmt.Errorf("writing %s at %#x: %w", what, gpa, err)
	}
	return nil
}

// zero clears [gpa, gpa+n) without allocating n bytes.
func zero(mem kvm.GuestMemory, gpa, n uint64, what string) error {
	if s, err := mem.Slice(gpa, n); err == nil {
		clear(s)
		return nil
	}
	var buf [64 << 10]byte
	for n > 0 {
		c := min(n, uint64(len(buf)))
		if err := write(mem, gpa, buf[:c], what); err != nil {
			return err
		}
		gpa += c
		n -= c
	}
	return nil
}

// Page-table entry bits.
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	ptePS       = 1 << 7 // 2 MiB page in a page directory entry
)

// writePageTables writes the identity map of the first 4 GiB with 2 MiB
// pages: PML4 at PML4Addr, PDPT at PDPTAddr, page directories at PDAddr.
func writePageTables(mem kvm.GuestMemory) error {
	var buf [pageTablesEnd - PML4Addr]byte // PML4, PDPT, 4 PDs
	binary.LittleEndian.PutUint64(buf[0:], PDPTAddr|ptePresent|pteWritable)
	pdpt := buf[PDPTAddr-PML4Addr:]
	for i := range uint64(4) {
		binary.LittleEndian.PutUint64(pdpt[i*8:], (PDAddr+i*0x1000)|ptePresent|pteWritable)
	}
	pd := buf[PDAddr-PML4Addr:]
	for i := range uint64(identityMapSize >> 21) {
		binary.LittleEndian.PutUint64(pd[i*8:], i<<21|ptePresent|pteWritable|ptePS)
	}
	return write(mem, PML4Addr, buf[:], "page tables")
}

// Segment descriptor kinds for the GDT.
type gdtKind int

const (
	gdtNull gdtKind = iota
	gdtCode64
	gdtCode32
	gdtData
	gdtTSS // 16-byte system descriptor, base 0, limit 0x67, busy TSS
)

// descriptor encodes a flat segment descriptor.
func descriptor(k gdtKind) uint64 {
	// flags nibble: G (bit 3), D/B (bit 2), L (bit 1); access byte.
	var access, flags, limit uint64
	switch k {
	case gdtNull:
		return 0
	case gdtCode64:
		access, flags, limit = 0x9B, 0xA, 0xFFFFF // P, S, code exec/read accessed; G, L
	case gdtCode32:
		access, flags, limit = 0x9B, 0xC, 0xFFFFF // G, D
	case gdtData:
		access, flags, limit = 0x93, 0xC, 0xFFFFF // P, S, data r/w accessed; G, B
	case gdtTSS:
		access, flags, limit = 0x8B, 0x0, 0x67 // P, busy TSS
	}
	return limit&0xFFFF | (limit>>16&0xF)<<48 | access<<40 | flags<<52
}

// writeGDT writes the descriptors at GDTAddr and returns the GDT limit.
func writeGDT(mem kvm.GuestMemory, kinds ...gdtKind) (uint16, error) {
	var buf []byte
	for _, k := range kinds {
		buf = binary.LittleEndian.AppendUint64(buf, descriptor(k))
		if k == gdtTSS {
			buf = binary.LittleEndian.AppendUint64(buf, 0) // upper half of the 16-byte descriptor
		}
	}
	if err := write(mem, GDTAddr, buf, "GDT"); err != nil {
		return 0, err
	}
	return uint16(len(buf) - 1), nil
}

// writeCmdline writes the NUL-terminated command line at CmdlineAddr.
// maxLen is the longest length the kernel accepts (excluding the NUL).
func writeCmdline(mem kvm.GuestMemory, cmdline string, maxLen uint64, format string) error {
	for i := 0; i < len(cmdline); i++ {
		if cmdline[i] == 0 {
			return layoutErr("cmdline", "contains a NUL byte at offset %d", i)
		}
	}
	if uint64(len(cmdline)) > maxLen {
		return layoutErr("cmdline", "%d bytes exceed the %s limit of %d (cmdline_size)", len(cmdline), format, maxLen)
	}
	if CmdlineAddr+uint64(len(cmdline))+1 > cmdlineLimit {
		return layoutErr("cmdline", "%d bytes do not fit below %#x", len(cmdline), cmdlineLimit)
	}
	b := make([]byte, len(cmdline)+1)
	copy(b, cmdline)
	return write(mem, CmdlineAddr, b, "command line")
}

// placeInitrd chooses the highest page-aligned address for size bytes of
// initrd inside a RAM region, at or above low and ending at or below limit.
func placeInitrd(ram []kvm.RegionSpec, size, low, limit uint64) (uint64, error) {
	if size == 0 {
		return 0, nil
	}
	best, found := uint64(0), false
	for _, r := range ram {
		end := min(r.GPA+r.Size, limit)
		start := max(r.GPA, low)
		if end < size || end-size < start {
			continue
		}
		a := (end - size) &^ (kvm.PageSize - 1)
		if a < start {
			continue
		}
		if !found || a > best {
			best, found = a, true
		}
	}
	if !found {
		return 0, layoutErr("initrd", "%d bytes do not fit in RAM between %#x and %#x", size, low, limit)
	}
	return best, nil
}
