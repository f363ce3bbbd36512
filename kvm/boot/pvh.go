package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1.
const (
	startInfoMagic   = 0x336ec578
	startInfoVersion = 1
	startInfoSize    = 56
	modlistEntrySize = 32
	memmapEntrySize  = 24
	maxMemmapEntries = (ZeroPageAddr - MemmapAddr) / memmapEntrySize
)

// LoadPVH loads an ELF kernel that has a XEN_ELFNOTE_PHYS32_ENTRY note and
// returns a PVH entry: 32-bit protected mode, paging off, CS = 0x8 and data
// segments 0x10 flat, EBX = hvm_start_info (0x6000). The initrd becomes the
// single module; the memory map is the e820 map of the RAM layout. An image
// without the note yields an error wrapping ErrNoPVHNote.
func LoadPVH(mem kvm.GuestMemory, image, initrd []byte, cmdline string, opts LinuxOptions) (*Entry, error) {
	img, err := ParseELF(image)
	if err != nil {
		return nil, err
	}
	if !img.HasPVH {
		return nil, fmt.Errorf("PVH: %w", ErrNoPVHNote)
	}
	ram, err := ramOf(mem, opts.RAM)
	if err != nil {
		return nil, err
	}
	if err := checkLowRAM(ram, "hvm_start_info, GDT and command line", EBDAStart); err != nil {
		return nil, err
	}
	if !ramContains(ram, img.PVHEntry, 1) {
		return nil, formatErr("PVH", "XEN_ELFNOTE_PHYS32_ENTRY", "entry %#x is not in guest RAM", img.PVHEntry)
	}
	memmap, err := BuildE820(ram, opts.Reserved)
	if err != nil {
		return nil, err
	}
	if len(memmap) > maxMemmapEntries {
		return nil, layoutErr("memmap", "%d entries exceed the %d that fit at %#x", len(memmap), maxMemmapEntries, MemmapAddr)
	}
	end, pl, err := loadSegments(mem, ram, image, img, "PVH")
	if err != nil {
		return nil, err
	}
	if err := writeCmdline(mem, cmdline, linuxCmdlineSz, "PVH"); err != nil {
		return nil, err
	}
	initrdAddr, err := loadInitrd(mem, ram, initrd, end, fourGiB)
	if err != nil {
		return nil, err
	}
	var si [startInfoSize]byte
	le := binary.LittleEndian
	le.PutUint32(si[0:], startInfoMagic)
	le.PutUint32(si[4:], startInfoVersion)
	le.PutUint64(si[24:], CmdlineAddr)
	le.PutUint64(si[32:], opts.RSDP)
	le.PutUint64(si[40:], MemmapAddr)
	le.PutUint32(si[48:], uint32(len(memmap)))
	if len(initrd) > 0 {
		le.PutUint32(si[12:], 1)
		le.PutUint64(si[16:], ModlistAddr)
		var mod [modlistEntrySize]byte
		le.PutUint64(mod[0:], initrdAddr)
		le.PutUint64(mod[8:], uint64(len(initrd)))
		if err := write(mem, ModlistAddr, mod[:], "PVH module list"); err != nil {
			return nil, err
		}
		pl = append(pl, Placement{Name: "initrd", GPA: initrdAddr, Size: uint64(len(initrd))})
	}
	mm := make([]byte, len(memmap)*memmapEntrySize)
	for i, e := range memmap {
		le.PutUint64(mm[i*memmapEntrySize:], e.Addr)
		le.PutUint64(mm[i*memmapEntrySize+8:], e.Size)
		le.PutUint32(mm[i*memmapEntrySize+16:], e.Type)
	}
	if err := write(mem, MemmapAddr, mm, "PVH memory map"); err != nil {
		return nil, err
	}
	if err := write(mem, StartInfoAddr, si[:], "hvm_start_info"); err != nil {
		return nil, err
	}
	gdtLimit, err := writeGDT(mem, gdtNull, gdtCode32, gdtData, gdtTSS)
	if err != nil {
		return nil, err
	}
	pl = append(pl,
		Placement{Name: "gdt", GPA: GDTAddr, Size: uint64(gdtLimit) + 1},
		Placement{Name: "hvm_start_info", GPA: StartInfoAddr, Size: startInfoSize},
		Placement{Name: "memmap", GPA: MemmapAddr, Size: uint64(len(mm))},
		Placement{Name: "cmdline", GPA: CmdlineAddr, Size: uint64(len(cmdline)) + 1})
	return &Entry{
		Protocol: ProtoPVH, Mode: ProtectedMode, IP: img.PVHEntry,
		GDTBase: GDTAddr, GDTLimit: gdtLimit, CodeSel: 0x8, DataSel: 0x10, TSSSel: 0x18,
		RBX: StartInfoAddr, RAMSize: ramSize(ram), Placements: pl,
	}, nil
}
