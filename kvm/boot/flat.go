package boot

import "github.com/kvmkit/kvmkit/kvm"

// FlatMode selects the flat ABI's CPU mode.
type FlatMode int

// Flat ABI modes. The zero value is long mode.
const (
	FlatLong FlatMode = iota // 64-bit, image at 0x100000
	FlatReal                 // 16-bit real mode, image at 0x7C00
)

// Flat long-mode stack layout: RSP = FlatStackTop - index*FlatStackStride.
const (
	FlatStackTop    = 0x80000
	FlatStackStride = 0x4000
	// MaxFlatVCPUs is the most vCPUs the flat long-mode ABI supports: the
	// lowest stack must stay above the page tables (which end at 0xF000).
	MaxFlatVCPUs = (FlatStackTop - pageTablesEnd) / FlatStackStride
)

// FlatOptions configure LoadFlat.
type FlatOptions struct {
	Mode FlatMode
	// VCPUs is the number of vCPUs (0 means 1); checked against
	// MaxFlatVCPUs in long mode.
	VCPUs int
	// RAM lists the guest RAM regions. If empty they are taken from mem when
	// it is a *kvm.Memory (anything with Regions()).
	RAM []kvm.RegionSpec
}

// LoadFlat loads a flat bare-metal image per kvmkit's guest ABI.
//
// Long mode: the image is loaded at 0x100000 and entered at its first byte in
// 64-bit mode with the first 4 GiB identity-mapped by 2 MiB pages (PML4
// 0x9000, PDPT 0xA000, PDs 0xB000-0xEFFF) and a GDT at 0x500 (code selector
// 0x8, data 0x10, TSS 0x18). Every vCPU starts at the entry with RFLAGS=0x2,
// RSP = 0x80000 - index*0x4000, RDI = index, RSI = vCPU count, RDX = RAM size.
//
// Real mode: the image is loaded at 0x7C00 and vCPU 0 starts at 0000:7C00
// with SP = 0x7C00 and all data segments 0.
func LoadFlat(mem kvm.GuestMemory, image []byte, opts FlatOptions) (*Entry, error) {
	ram, err := ramOf(mem, opts.RAM)
	if err != nil {
		return nil, err
	}
	if len(image) == 0 {
		return nil, layoutErr("image", "empty")
	}
	size := uint64(len(image))
	if opts.Mode == FlatReal {
		if size > realModeLimit-RealModeLoad {
			return nil, layoutErr("image", "%d bytes at %#x do not end below %#x (real-mode load window is %d bytes)",
				size, RealModeLoad, realModeLimit, realModeLimit-RealModeLoad)
		}
		if !ramContains(ram, RealModeLoad, size) {
			return nil, layoutErr("image", "%d bytes at %#x are not inside guest RAM", size, RealModeLoad)
		}
		if err := write(mem, RealModeLoad, image, "image"); err != nil {
			return nil, err
		}
		return &Entry{
			Protocol: ProtoFlatReal, Mode: RealMode, IP: RealModeLoad, StackTop: RealModeLoad,
			RAMSize:    ramSize(ram),
			Placements: []Placement{{Name: "image", GPA: RealModeLoad, Size: size}},
		}, nil
	}
	if opts.Mode != FlatLong {
		return nil, layoutErr("mode", "unknown flat mode %d", opts.Mode)
	}
	n := max(opts.VCPUs, 1)
	if n > MaxFlatVCPUs {
		return nil, layoutErr("vcpus", "%d exceed the flat ABI's %d (stacks below 0x80000 in 16 KiB steps)", n, MaxFlatVCPUs)
	}
	if err := checkLowRAM(ram, "GDT, page tables and stacks", FlatStackTop); err != nil {
		return nil, err
	}
	end := regionEnd(ram, KernelLoadAddr)
	if end == 0 || size > end-KernelLoadAddr {
		avail := uint64(0)
		if end != 0 {
			avail = end - KernelLoadAddr
		}
		return nil, layoutErr("image", "%d bytes do not fit in RAM above %#x (%d bytes available)", size, KernelLoadAddr, avail)
	}
	gdtLimit, err := writeGDT(mem, gdtNull, gdtCode64, gdtData, gdtTSS)
	if err != nil {
		return nil, err
	}
	if err := writePageTables(mem); err != nil {
		return nil, err
	}
	if err := write(mem, KernelLoadAddr, image, "image"); err != nil {
		return nil, err
	}
	return &Entry{
		Protocol: ProtoFlatLong, Mode: LongMode, IP: KernelLoadAddr,
		StackTop: FlatStackTop, StackStride: FlatStackStride,
		GDTBase: GDTAddr, GDTLimit: gdtLimit, CodeSel: 0x8, DataSel: 0x10, TSSSel: 0x18,
		CR3: PML4Addr, FlatABI: true, RAMSize: ramSize(ram), AllVCPUs: true,
		Placements: []Placement{
			{Name: "gdt", GPA: GDTAddr, Size: uint64(gdtLimit) + 1},
			{Name: "page tables", GPA: PML4Addr, Size: pageTablesEnd - PML4Addr},
			{Name: "image", GPA: KernelLoadAddr, Size: size},
		},
	}, nil
}
