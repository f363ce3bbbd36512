package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// SetupHeader is the part of a bzImage's setup header that kvmkit uses.
type SetupHeader struct {
	SetupSects      uint8  // sectors of real-mode setup code (0 read as 4)
	Version         uint16 // boot protocol version, e.g. 0x020F
	Loadflags       uint8
	KernelAlignment uint32
	Relocatable     bool
	Xloadflags      uint16
	CmdlineSize     uint32 // longest command line, excluding the NUL
	InitrdAddrMax   uint32 // highest address the initrd may occupy
	PrefAddress     uint64
	InitSize        uint32 // memory the kernel needs from PrefAddress on
	// HeaderEnd is the offset just past the setup header (0x202 plus the
	// jump byte at 0x201), capped at the zero page's header space.
	HeaderEnd int
	// KernelOffset is where the protected-mode kernel starts in the file:
	// (setup_sects+1)*512.
	KernelOffset int
}

// ParseSetupHeader parses and validates the setup header of a bzImage for
// the 64-bit boot protocol: boot_flag, the "HdrS" magic, protocol version
// 2.06 or later (2.12 for xloadflags), LOADED_HIGH, XLF_KERNEL_64,
// setup_sects and kernel_alignment.
func ParseSetupHeader(image []byte) (*SetupHeader, error) {
	fe := func(field, reason string, args ...any) error { return formatErr("bzImage", field, reason, args...) }
	if len(image) < hdrVersion+2 {
		return nil, fe("header", "image is %d bytes, too short for a setup header", len(image))
	}
	if v := binary.LittleEndian.Uint16(image[hdrBootFlag:]); v != bootFlagMagic {
		return nil, fe("boot_flag", "is %#04x, want 0xAA55", v)
	}
	if v := binary.LittleEndian.Uint32(image[hdrMagic:]); v != hdrSMagic {
		return nil, fe("header", "magic is %#08x, want \"HdrS\" (0x53726448)", v)
	}
	h := &SetupHeader{Version: binary.LittleEndian.Uint16(image[hdrVersion:])}
	if h.Version < 0x0206 {
		return nil, fe("version", "boot protocol %d.%02d is older than the required 2.06", h.Version>>8, h.Version&0xFF)
	}
	if h.Version < 0x020C {
		return nil, fe("version", "boot protocol %d.%02d has no xloadflags; the 64-bit entry needs 2.12", h.Version>>8, h.Version&0xFF)
	}
	h.HeaderEnd = min(0x202+int(image[hdrJump+1]), zpHdrLimit)
	if h.HeaderEnd < hdrMinEnd {
		return nil, fe("jump", "setup header ends at %#x, before init_size (%#x)", h.HeaderEnd, hdrMinEnd)
	}
	if len(image) < h.HeaderEnd {
		return nil, fe("header", "image is %d bytes, setup header ends at %#x", len(image), h.HeaderEnd)
	}
	h.SetupSects = image[hdrSetupSects]
	sects := int(h.SetupSects)
	if sects == 0 {
		sects = 4
	}
	h.KernelOffset = (sects + 1) * 512
	if h.KernelOffset >= len(image) {
		return nil, fe("setup_sects", "%d setup sectors (%d bytes) leave no kernel in a %d-byte image", sects, h.KernelOffset, len(image))
	}
	h.Loadflags = image[hdrLoadflags]
	if h.Loadflags&loadedHigh == 0 {
		return nil, fe("loadflags", "LOADED_HIGH is clear: a zImage loaded at 0x10000 is not supported")
	}
	h.KernelAlignment = binary.LittleEndian.Uint32(image[hdrKernelAlign:])
	h.Relocatable = image[hdrRelocatable] != 0
	if a := h.KernelAlignment; h.Relocatable && (a == 0 || a&(a-1) != 0) {
		return nil, fe("kernel_alignment", "%#x is not a power of two", a)
	}
	h.Xloadflags = binary.LittleEndian.Uint16(image[hdrXloadflags:])
	if h.Xloadflags&xlfKernel64 == 0 {
		return nil, fe("xloadflags", "XLF_KERNEL_64 is clear: the kernel has no 64-bit entry point")
	}
	h.CmdlineSize = binary.LittleEndian.Uint32(image[hdrCmdlineSize:])
	h.InitrdAddrMax = binary.LittleEndian.Uint32(image[hdrInitrdMax:])
	h.PrefAddress = binary.LittleEndian.Uint64(image[hdrPrefAddress:])
	h.InitSize = binary.LittleEndian.Uint32(image[hdrInitSize:])
	return h, nil
}

// LinuxOptions configure the Linux loaders.
type LinuxOptions struct {
	// RAM lists the guest RAM regions. If empty they are taken from mem when
	// it is a *kvm.Memory (anything with Regions()).
	RAM []kvm.RegionSpec
	// Reserved adds ranges to the e820/PVH memory map (type 0 means
	// reserved), e.g. MMIO windows the guest must not treat as free.
	Reserved []E820Entry
	// RSDP is the guest-physical address of the ACPI RSDP, or 0 for none.
	RSDP uint64
	// NoPVH makes LoadLinux use the 64-bit ELF entry even when a PVH note
	// is present.
	NoPVH bool
}

// LoadBzImage loads a Linux bzImage per the x86 boot protocol and returns a
// 64-bit entry: the protected-mode kernel at 0x100000, entered at
// 0x100000+0x200 with RSI = boot_params (0x7000), the command line at
// 0x20000 and the initrd as high as possible below initrd_addr_max and
// 4 GiB.
func LoadBzImage(mem kvm.GuestMemory, image, initrd []byte, cmdline string, opts LinuxOptions) (*Entry, error) {
	h, err := ParseSetupHeader(image)
	if err != nil {
		return nil, err
	}
	ram, err := ramOf(mem, opts.RAM)
	if err != nil {
		return nil, err
	}
	if err := checkLowRAM(ram, "boot_params, GDT, page tables and command line", EBDAStart); err != nil {
		return nil, err
	}
	kernel := image[h.KernelOffset:]
	ksize := uint64(len(kernel))
	if !ramContains(ram, KernelLoadAddr, ksize) {
		return nil, layoutErr("kernel", "%d bytes do not fit in RAM at %#x", ksize, KernelLoadAddr)
	}
	// The decompressor runs at max(aligned load address, pref_address) and
	// needs init_size bytes there.
	need := max(h.PrefAddress, KernelLoadAddr)
	if need+uint64(h.InitSize) < need || !ramContains(ram, need, uint64(h.InitSize)) {
		return nil, layoutErr("RAM", "kernel needs init_size %#x bytes at pref_address %#x", h.InitSize, need)
	}
	if err := write(mem, KernelLoadAddr, kernel, "kernel"); err != nil {
		return nil, err
	}
	zp := new(zeroPage)
	copy(zp[zpHdr:h.HeaderEnd], image[zpHdr:h.HeaderEnd])
	zp.put32(hdrCode32Start, KernelLoadAddr)
	l := &linuxLoad{
		proto:       ProtoBzImage,
		zp:          zp,
		entry:       KernelLoadAddr + 0x200,
		kernelEnd:   max(KernelLoadAddr+ksize, need+uint64(h.InitSize)),
		initrdLimit: uint64(h.InitrdAddrMax) + 1,
		cmdlineMax:  uint64(h.CmdlineSize),
		placements:  []Placement{{Name: "kernel", GPA: KernelLoadAddr, Size: ksize}},
	}
	return finishLinux(mem, ram, l, initrd, cmdline, opts)
}

// String summarizes the header for logs.
func (h *SetupHeader) String() string {
	return fmt.Sprintf("boot protocol %d.%02d, setup %d sectors, init_size %#x, pref_address %#x",
		h.Version>>8, h.Version&0xFF, h.SetupSects, h.InitSize, h.PrefAddress)
}
