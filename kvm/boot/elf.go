package boot

import (
	"bytes"
	"encoding/binary"

	"github.com/kvmkit/kvmkit/kvm"
)

// ELF constants used by the parser.
const (
	elfClass32    = 1
	elfClass64    = 2
	elfDataLSB    = 1
	emX86_64      = 62
	em386         = 3
	ptLoad        = 1
	ptNote        = 4
	shtNote       = 7
	etExec        = 2
	etDyn         = 3
	maxPhnum      = 4096 // program headers examined at most
	maxShnum      = 4096 // section headers examined at most
	maxLoads      = 64   // PT_LOAD segments accepted at most
	maxNotes      = 1024 // notes examined per note area
	startKernMap  = 0xffffffff80000000
	xenPhys32Note = 18 // XEN_ELFNOTE_PHYS32_ENTRY
)

// ELFSegment is one PT_LOAD program header.
type ELFSegment struct {
	Offset uint64 // file offset
	Paddr  uint64 // physical load address (translated out of the kernel map)
	Filesz uint64
	Memsz  uint64
}

// ELFImage is the result of ParseELF.
type ELFImage struct {
	Class    int    // 32 or 64
	Entry    uint64 // e_entry, translated to physical when in the kernel map
	Segments []ELFSegment
	// PVHEntry is the XEN_ELFNOTE_PHYS32_ENTRY address when HasPVH.
	PVHEntry uint64
	HasPVH   bool
}

// kernelPhys translates an address in Linux's kernel map
// (__START_KERNEL_map) to physical.
func kernelPhys(a uint64) uint64 {
	if a >= startKernMap {
		return a - startKernMap
	}
	return a
}

type elfReader struct {
	b     []byte
	class int
}

func (r *elfReader) u16(off uint64) uint16 { return binary.LittleEndian.Uint16(r.b[off:]) }
func (r *elfReader) u32(off uint64) uint32 { return binary.LittleEndian.Uint32(r.b[off:]) }
func (r *elfReader) u64(off uint64) uint64 { return binary.LittleEndian.Uint64(r.b[off:]) }

// word reads an ELF address/offset-sized field.
func (r *elfReader) word(off uint64) uint64 {
	if r.class == elfClass64 {
		return r.u64(off)
	}
	return uint64(r.u32(off))
}

// inFile reports whether [off, off+n) lies inside the file.
func (r *elfReader) inFile(off, n uint64) bool {
	return off <= uint64(len(r.b)) && n <= uint64(len(r.b))-off
}

// ParseELF parses a little-endian x86 ELF executable (32- or 64-bit): the
// header, the PT_LOAD segments and the PVH entry note (in PT_NOTE segments,
// else in SHT_NOTE sections). Every offset and size is checked against the
// file; counts are capped. It never panics on malformed input.
func ParseELF(image []byte) (*ELFImage, error) {
	fe := func(field, reason string, args ...any) error { return formatErr("ELF", field, reason, args...) }
	if len(image) < 52 || !bytes.Equal(image[:4], []byte("\x7fELF")) {
		return nil, fe("e_ident", "no ELF magic")
	}
	r := &elfReader{b: image, class: int(image[4])}
	if r.class != elfClass32 && r.class != elfClass64 {
		return nil, fe("EI_CLASS", "unknown class %d", r.class)
	}
	if image[5] != elfDataLSB {
		return nil, fe("EI_DATA", "not little-endian (%d)", image[5])
	}
	if r.class == elfClass64 && len(image) < 64 {
		return nil, fe("e_ident", "file is %d bytes, too short for an ELF64 header", len(image))
	}
	if t := r.u16(16); t != etExec && t != etDyn {
		return nil, fe("e_type", "%d is not an executable", t)
	}
	machine := r.u16(18)
	if (r.class == elfClass64 && machine != emX86_64) || (r.class == elfClass32 && machine != em386 && machine != emX86_64) {
		return nil, fe("e_machine", "%d is not x86", machine)
	}
	img := &ELFImage{Class: 32, Entry: r.word(24)}
	// Field offsets differ by class.
	phoffOff, shoffOff, phentOff := uint64(28), uint64(32), uint64(42)
	wantPhent, wantShent := uint64(32), uint64(40)
	if r.class == elfClass64 {
		img.Class = 64
		phoffOff, shoffOff, phentOff = 32, 40, 54
		wantPhent, wantShent = 56, 64
	}
	img.Entry = kernelPhys(img.Entry)
	phoff, shoff := r.word(phoffOff), r.word(shoffOff)
	phent, phnum := uint64(r.u16(phentOff)), uint64(r.u16(phentOff+2))
	shent, shnum := uint64(r.u16(phentOff+4)), uint64(r.u16(phentOff+6))
	if phnum == 0 {
		return nil, fe("e_phnum", "no program headers")
	}
	if phnum > maxPhnum {
		return nil, fe("e_phnum", "%d program headers exceed the limit of %d", phnum, maxPhnum)
	}
	if phent != wantPhent {
		return nil, fe("e_phentsize", "%d, want %d", phent, wantPhent)
	}
	if !r.inFile(phoff, phnum*phent) {
		return nil, fe("e_phoff", "program headers [%#x, +%d*%d) lie outside the %d-byte file", phoff, phnum, phent, len(image))
	}
	for i := range phnum {
		ph := phoff + i*phent
		typ := r.u32(ph)
		var off, paddr, filesz, memsz uint64
		if r.class == elfClass64 {
			off, paddr, filesz, memsz = r.u64(ph+8), r.u64(ph+24), r.u64(ph+32), r.u64(ph+40)
		} else {
			off, paddr, filesz, memsz = uint64(r.u32(ph+4)), uint64(r.u32(ph+12)), uint64(r.u32(ph+16)), uint64(r.u32(ph+20))
		}
		switch typ {
		case ptLoad:
			if len(img.Segments) == maxLoads {
				return nil, fe("e_phnum", "more than %d PT_LOAD segments", maxLoads)
			}
			if !r.inFile(off, filesz) {
				return nil, fe("p_offset", "PT_LOAD %d: [%#x, +%#x) lies outside the %d-byte file", i, off, filesz, len(image))
			}
			if filesz > memsz {
				return nil, fe("p_filesz", "PT_LOAD %d: p_filesz %#x exceeds p_memsz %#x", i, filesz, memsz)
			}
			img.Segments = append(img.Segments, ELFSegment{Offset: off, Paddr: kernelPhys(paddr), Filesz: filesz, Memsz: memsz})
		case ptNote:
			if img.HasPVH {
				continue
			}
			if !r.inFile(off, filesz) {
				return nil, fe("p_offset", "PT_NOTE %d: [%#x, +%#x) lies outside the %d-byte file", i, off, filesz, len(image))
			}
			if err := img.scanNotes(image[off : off+filesz]); err != nil {
				return nil, err
			}
		}
	}
	if len(img.Segments) == 0 {
		return nil, fe("p_type", "no PT_LOAD segment")
	}
	if !img.HasPVH && shnum > 0 && shoff != 0 {
		if err := img.scanSections(r, shoff, shent, shnum, wantShent); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// scanSections looks for the PVH note in SHT_NOTE sections.
func (img *ELFImage) scanSections(r *elfReader, shoff, shent, shnum, wantShent uint64) error {
	fe := func(field, reason string, args ...any) error { return formatErr("ELF", field, reason, args...) }
	if shnum > maxShnum {
		return fe("e_shnum", "%d section headers exceed the limit of %d", shnum, maxShnum)
	}
	if shent != wantShent {
		return fe("e_shentsize", "%d, want %d", shent, wantShent)
	}
	if !r.inFile(shoff, shnum*shent) {
		return fe("e_shoff", "section headers [%#x, +%d*%d) lie outside the %d-byte file", shoff, shnum, shent, len(r.b))
	}
	for i := range shnum {
		sh := shoff + i*shent
		if r.u32(sh+4) != shtNote {
			continue
		}
		var off, size uint64
		if r.class == elfClass64 {
			off, size = r.u64(sh+24), r.u64(sh+32)
		} else {
			off, size = uint64(r.u32(sh+16)), uint64(r.u32(sh+20))
		}
		if !r.inFile(off, size) {
			return fe("sh_offset", "SHT_NOTE section %d: [%#x, +%#x) lies outside the %d-byte file", i, off, size, len(r.b))
		}
		if err := img.scanNotes(r.b[off : off+size]); err != nil {
			return err
		}
		if img.HasPVH {
			return nil
		}
	}
	return nil
}

// scanNotes walks one note area looking for the Xen PHYS32_ENTRY note.
func (img *ELFImage) scanNotes(b []byte) error {
	fe := func(field, reason string, args ...any) error { return formatErr("ELF", field, reason, args...) }
	align4 := func(n uint64) uint64 { return (n + 3) &^ 3 }
	off := uint64(0)
	for n := 0; n < maxNotes && uint64(len(b))-off >= 12; n++ {
		namesz := uint64(binary.LittleEndian.Uint32(b[off:]))
		descsz := uint64(binary.LittleEndian.Uint32(b[off+4:]))
		typ := binary.LittleEndian.Uint32(b[off+8:])
		off += 12
		if namesz > uint64(len(b))-off {
			return fe("n_namesz", "note %d: name of %d bytes overruns its %d-byte area", n, namesz, len(b))
		}
		name := b[off : off+namesz]
		descOff := off + align4(namesz)
		if descOff > uint64(len(b)) {
			descOff = uint64(len(b)) // unpadded final name
		}
		if descsz > uint64(len(b))-descOff {
			return fe("n_descsz", "note %d: descriptor of %d bytes overruns its %d-byte area", n, descsz, len(b))
		}
		desc := b[descOff : descOff+descsz]
		off = min(descOff+align4(descsz), uint64(len(b)))
		if typ != xenPhys32Note || !bytes.Equal(bytes.TrimRight(name, "\x00"), []byte("Xen")) {
			continue
		}
		var entry uint64
		switch len(desc) {
		case 4:
			entry = uint64(binary.LittleEndian.Uint32(desc))
		case 8:
			entry = binary.LittleEndian.Uint64(desc)
		default:
			return formatErr("PVH", "XEN_ELFNOTE_PHYS32_ENTRY", "descriptor is %d bytes, want 4 or 8", len(desc))
		}
		if entry >= fourGiB {
			return formatErr("PVH", "XEN_ELFNOTE_PHYS32_ENTRY", "entry %#x is not a 32-bit address", entry)
		}
		img.PVHEntry, img.HasPVH = entry, true
		return nil
	}
	return nil
}

// loadSegments copies the PT_LOAD segments to their physical addresses and
// zeroes the part of each beyond its file size. It returns the end of the
// highest segment.
func loadSegments(mem kvm.GuestMemory, ram []kvm.RegionSpec, image []byte, img *ELFImage, format string) (uint64, []Placement, error) {
	var end uint64
	var pl []Placement
	for i, s := range img.Segments {
		if s.Paddr < HighMemStart {
			return 0, nil, formatErr(format, "p_paddr", "PT_LOAD %d at %#x is below 1 MiB, where boot data lives", i, s.Paddr)
		}
		if !ramContains(ram, s.Paddr, s.Memsz) {
			return 0, nil, layoutErr("kernel", "PT_LOAD %d [%#x, +%#x) is not inside guest RAM", i, s.Paddr, s.Memsz)
		}
	}
	for i, s := range img.Segments {
		if err := write(mem, s.Paddr, image[s.Offset:s.Offset+s.Filesz], "kernel segment"); err != nil {
			return 0, nil, err
		}
		if err := zero(mem, s.Paddr+s.Filesz, s.Memsz-s.Filesz, "kernel bss"); err != nil {
			return 0, nil, err
		}
		end = max(end, s.Paddr+s.Memsz)
		pl = append(pl, Placement{Name: "kernel segment " + itoa(i), GPA: s.Paddr, Size: s.Memsz})
	}
	return end, pl, nil
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b [20]byte
	n := len(b)
	for ; i > 0; i /= 10 {
		n--
		b[n] = byte('0' + i%10)
	}
	return string(b[n:])
}

// LoadELF loads an uncompressed 64-bit Linux kernel (vmlinux) at its
// segments' physical addresses and returns a 64-bit boot protocol entry at
// e_entry with RSI = boot_params (0x7000). boot_params is built from scratch
// as a boot loader would for protocol 2.15.
func LoadELF(mem kvm.GuestMemory, image, initrd []byte, cmdline string, opts LinuxOptions) (*Entry, error) {
	img, err := ParseELF(image)
	if err != nil {
		return nil, err
	}
	if img.Class != 64 {
		return nil, formatErr("ELF", "EI_CLASS", "the 64-bit boot protocol needs an ELF64 kernel")
	}
	ram, err := ramOf(mem, opts.RAM)
	if err != nil {
		return nil, err
	}
	if err := checkLowRAM(ram, "boot_params, GDT, page tables and command line", EBDAStart); err != nil {
		return nil, err
	}
	if !ramContains(ram, img.Entry, 1) {
		return nil, formatErr("ELF", "e_entry", "%#x is not in guest RAM", img.Entry)
	}
	end, pl, err := loadSegments(mem, ram, image, img, "ELF")
	if err != nil {
		return nil, err
	}
	zp := new(zeroPage)
	zp.put16(hdrBootFlag, bootFlagMagic)
	zp.put32(hdrMagic, hdrSMagic)
	zp.put16(hdrVersion, 0x020F)
	zp.put16(hdrVidMode, 0xFFFF) // "normal"
	zp.put8(hdrLoadflags, loadedHigh)
	zp.put32(hdrCode32Start, uint32(lowestPaddr(img)))
	zp.put32(hdrInitrdMax, 0x7FFFFFFF)
	zp.put32(hdrKernelAlign, 0x1000000)
	zp.put16(hdrXloadflags, xlfKernel64)
	zp.put32(hdrCmdlineSize, linuxCmdlineSz)
	l := &linuxLoad{
		proto: ProtoELF, zp: zp, entry: img.Entry, kernelEnd: end,
		initrdLimit: 0x80000000, cmdlineMax: linuxCmdlineSz, placements: pl,
	}
	return finishLinux(mem, ram, l, initrd, cmdline, opts)
}

func lowestPaddr(img *ELFImage) uint64 {
	low := img.Segments[0].Paddr
	for _, s := range img.Segments {
		low = min(low, s.Paddr)
	}
	return low
}
