package boot

import (
	"encoding/binary"

	"github.com/kvmkit/kvmkit/kvm"
)

// Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h) and
// in the setup header it embeds at 0x1F1 (Documentation/arch/x86/boot.rst).
const (
	zpSize          = 4096
	zpACPIRSDPAddr  = 0x070
	zpE820Entries   = 0x1E8
	zpHdr           = 0x1F1
	zpHdrLimit      = 0x290 // edd_mbr_sig_buffer follows the header space
	zpE820Table     = 0x2D0
	hdrSetupSects   = 0x1F1
	hdrVidMode      = 0x1FA
	hdrBootFlag     = 0x1FE
	hdrJump         = 0x200
	hdrMagic        = 0x202
	hdrVersion      = 0x206
	hdrTypeOfLoader = 0x210
	hdrLoadflags    = 0x211
	hdrCode32Start  = 0x214
	hdrRamdiskImage = 0x218
	hdrRamdiskSize  = 0x21C
	hdrHeapEndPtr   = 0x224
	hdrCmdLinePtr   = 0x228
	hdrInitrdMax    = 0x22C
	hdrKernelAlign  = 0x230
	hdrRelocatable  = 0x234
	hdrXloadflags   = 0x236
	hdrCmdlineSize  = 0x238
	hdrPrefAddress  = 0x258
	hdrInitSize     = 0x260
	hdrMinEnd       = 0x264 // end of init_size: the last field kvmkit reads

	bootFlagMagic  = 0xAA55
	hdrSMagic      = 0x53726448 // "HdrS"
	loadedHigh     = 1 << 0
	keepSegments   = 1 << 6
	canUseHeap     = 1 << 7
	xlfKernel64    = 1 << 0
	loaderUnknown  = 0xFF
	heapEnd        = 0xFE00
	linuxCmdlineSz = 2047 // x86 COMMAND_LINE_SIZE (2048) minus the NUL
)

// zeroPage is a boot_params under construction.
type zeroPage [zpSize]byte

func (z *zeroPage) put8(off int, v uint8)   { z[off] = v }
func (z *zeroPage) put16(off int, v uint16) { binary.LittleEndian.PutUint16(z[off:], v) }
func (z *zeroPage) put32(off int, v uint32) { binary.LittleEndian.PutUint32(z[off:], v) }
func (z *zeroPage) put64(off int, v uint64) { binary.LittleEndian.PutUint64(z[off:], v) }

// setE820 fills e820_entries and e820_table; BuildE820 caps the count.
func (z *zeroPage) setE820(m []E820Entry) {
	z.put8(zpE820Entries, uint8(len(m)))
	for i, e := range m {
		off := zpE820Table + i*20
		z.put64(off, e.Addr)
		z.put64(off+8, e.Size)
		z.put32(off+16, e.Type)
	}
}

// linuxLoad is the part of a Linux 64-bit boot shared by bzImage and ELF.
type linuxLoad struct {
	proto       Protocol
	zp          *zeroPage
	entry       uint64
	kernelEnd   uint64 // lowest address the initrd may use
	initrdLimit uint64 // first address the initrd may not reach
	cmdlineMax  uint64
	placements  []Placement
}

// finishLinux writes the command line, initrd, e820 map, zero page, GDT and
// page tables for a 64-bit Linux boot protocol entry.
func finishLinux(mem kvm.GuestMemory, ram []kvm.RegionSpec, l *linuxLoad, initrd []byte, cmdline string, opts LinuxOptions) (*Entry, error) {
	e820, err := BuildE820(ram, opts.Reserved)
	if err != nil {
		return nil, err
	}
	if err := writeCmdline(mem, cmdline, l.cmdlineMax, string(l.proto)); err != nil {
		return nil, err
	}
	initrdAddr, err := loadInitrd(mem, ram, initrd, l.kernelEnd, min(l.initrdLimit, fourGiB))
	if err != nil {
		return nil, err
	}
	zp := l.zp
	zp.put8(hdrTypeOfLoader, loaderUnknown)
	zp.put8(hdrLoadflags, (zp[hdrLoadflags]|canUseHeap|loadedHigh)&^keepSegments)
	zp.put16(hdrHeapEndPtr, heapEnd)
	zp.put32(hdrCmdLinePtr, CmdlineAddr)
	zp.put32(hdrRamdiskImage, uint32(initrdAddr))
	zp.put32(hdrRamdiskSize, uint32(len(initrd)))
	zp.put64(zpACPIRSDPAddr, opts.RSDP)
	zp.setE820(e820)
	if err := write(mem, ZeroPageAddr, zp[:], "boot_params"); err != nil {
		return nil, err
	}
	gdtLimit, err := writeGDT(mem, gdtNull, gdtNull, gdtCode64, gdtData, gdtTSS)
	if err != nil {
		return nil, err
	}
	if err := writePageTables(mem); err != nil {
		return nil, err
	}
	pl := append(l.placements,
		Placement{Name: "gdt", GPA: GDTAddr, Size: uint64(gdtLimit) + 1},
		Placement{Name: "boot_params", GPA: ZeroPageAddr, Size: zpSize},
		Placement{Name: "page tables", GPA: PML4Addr, Size: pageTablesEnd - PML4Addr},
		Placement{Name: "cmdline", GPA: CmdlineAddr, Size: uint64(len(cmdline)) + 1})
	if len(initrd) > 0 {
		pl = append(pl, Placement{Name: "initrd", GPA: initrdAddr, Size: uint64(len(initrd))})
	}
	return &Entry{
		Protocol: l.proto, Mode: LongMode, IP: l.entry,
		GDTBase: GDTAddr, GDTLimit: gdtLimit, CodeSel: 0x10, DataSel: 0x18, TSSSel: 0x20,
		CR3: PML4Addr, RSI: ZeroPageAddr, RAMSize: ramSize(ram), Placements: pl,
	}, nil
}

// loadInitrd places the initrd as high as possible in [low, limit) and
// copies it there. It returns 0 when there is no initrd.
func loadInitrd(mem kvm.GuestMemory, ram []kvm.RegionSpec, initrd []byte, low, limit uint64) (uint64, error) {
	if len(initrd) == 0 {
		return 0, nil
	}
	low = (low + kvm.PageSize - 1) &^ (kvm.PageSize - 1)
	addr, err := placeInitrd(ram, uint64(len(initrd)), low, limit)
	if err != nil {
		return 0, err
	}
	return addr, write(mem, addr, initrd, "initrd")
}
