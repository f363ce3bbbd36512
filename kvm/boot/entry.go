package boot

import "github.com/kvmkit/kvmkit/kvm"

// CPUMode is the processor mode in which a vCPU starts.
type CPUMode int

// CPU modes.
const (
	RealMode      CPUMode = iota + 1 // 16-bit real mode
	ProtectedMode                    // 32-bit protected mode, paging off
	LongMode                         // 64-bit mode, identity-mapped 4 GiB
)

func (m CPUMode) String() string {
	switch m {
	case RealMode:
		return "real"
	case ProtectedMode:
		return "protected"
	case LongMode:
		return "long"
	}
	return "invalid"
}

// Protocol names the boot protocol an Entry was produced by.
type Protocol string

// Boot protocols.
const (
	ProtoFlatLong Protocol = "flat-long" // flat image, 64-bit entry
	ProtoFlatReal Protocol = "flat-real" // flat image at 0x7C00, real mode
	ProtoBzImage  Protocol = "bzimage"   // Linux bzImage, 64-bit boot protocol
	ProtoELF      Protocol = "elf64"     // Linux vmlinux ELF, 64-bit boot protocol
	ProtoPVH      Protocol = "pvh"       // ELF with a PVH note, 32-bit entry
)

// Placement records one object a loader wrote to guest memory.
type Placement struct {
	Name string // "kernel", "initrd", "cmdline", "boot_params", ...
	GPA  uint64
	Size uint64
}

// Entry is where and how vCPUs start. It is produced by a loader and applied
// to each vCPU by the VM builder.
type Entry struct {
	Protocol Protocol
	Mode     CPUMode
	// IP is the first instruction: a linear address in protected and long
	// mode, an offset from the CS base (CS = 0) in real mode.
	IP uint64
	// StackTop and StackStride give RSP = StackTop - vcpu*StackStride;
	// StackTop 0 leaves RSP at 0.
	StackTop, StackStride uint64
	// GDT is the guest-physical address and limit of the GDT the loader
	// wrote (protected and long mode).
	GDTBase  uint64
	GDTLimit uint16
	// CodeSel, DataSel and TSSSel are the selectors loaded into CS, the data
	// segments and TR.
	CodeSel, DataSel, TSSSel uint16
	// CR3 is the page-table root (long mode).
	CR3 uint64
	// RSI and RBX are loaded as-is on vCPU 0 (boot_params pointer for Linux,
	// hvm_start_info pointer for PVH).
	RSI, RBX uint64
	// FlatABI loads RDI = vCPU index, RSI = vCPU count, RDX = RAMSize.
	FlatABI bool
	RAMSize uint64
	// AllVCPUs is true when every vCPU starts at the entry (the flat long
	// mode ABI). Otherwise only vCPU 0 does; the others are application
	// processors started by the guest with INIT/SIPI (KVM keeps them
	// uninitialized when the in-kernel irqchip is used), and Apply leaves
	// their registers alone.
	AllVCPUs bool
	// Placements lists what the loader wrote, for logging.
	Placements []Placement
}

// Starts reports whether vCPU vcpu begins execution at the entry.
func (e *Entry) Starts(vcpu int) bool { return e.AllVCPUs || vcpu == 0 }

// Control-register and EFER bits.
const (
	cr0PE = 1 << 0
	cr0MP = 1 << 1
	cr0ET = 1 << 4
	cr0NE = 1 << 5
	cr0PG = 1 << 31

	cr4PAE        = 1 << 5
	cr4OSFXSR     = 1 << 9
	cr4OSXMMEXCPT = 1 << 10

	eferLME = 1 << 8
	eferLMA = 1 << 10

	rflagsReserved = 0x2
)

// Apply writes the entry's registers into regs and sregs for vCPU vcpu of
// nvcpus. sregs must come from KVM_GET_SREGS of a fresh vCPU, so that fields
// the entry does not set (APIC base, interrupt bitmap) keep their values.
// It does nothing for a vCPU that does not start at the entry (see Starts).
func (e *Entry) Apply(vcpu, nvcpus int, regs *kvm.Regs, sregs *kvm.Sregs) {
	if !e.Starts(vcpu) {
		return
	}
	*regs = kvm.Regs{RIP: e.IP, RFLAGS: rflagsReserved, RSI: e.RSI, RBX: e.RBX}
	if e.StackTop != 0 {
		regs.RSP = e.StackTop - uint64(vcpu)*e.StackStride
	}
	if e.FlatABI {
		regs.RDI = uint64(vcpu)
		regs.RSI = uint64(nvcpus)
		regs.RDX = e.RAMSize
	}
	switch e.Mode {
	case RealMode:
		applyReal(sregs)
	case ProtectedMode:
		e.applyProtected(sregs)
	case LongMode:
		e.applyLong(sregs)
	}
}

func realSeg(typ uint8) kvm.Segment {
	return kvm.Segment{Limit: 0xFFFF, Type: typ, Present: 1, S: 1}
}

func applyReal(s *kvm.Sregs) {
	s.CS = realSeg(0xB)
	s.DS, s.ES, s.FS, s.GS, s.SS = realSeg(3), realSeg(3), realSeg(3), realSeg(3), realSeg(3)
	s.CR0 &^= cr0PE | cr0PG
	s.CR4, s.EFER, s.CR3 = 0, 0, 0
}

// flatSeg returns a flat 4 GiB segment descriptor cache.
func flatSeg(sel uint16, typ, db, l uint8) kvm.Segment {
	return kvm.Segment{Base: 0, Limit: 0xFFFFFFFF, Selector: sel, Type: typ, Present: 1, DB: db, S: 1, L: l, G: 1}
}

func (e *Entry) applySystem(s *kvm.Sregs) {
	s.TR = kvm.Segment{Base: 0, Limit: 0x67, Selector: e.TSSSel, Type: 0xB, Present: 1}
	s.LDT = kvm.Segment{Type: 0x2, Unusable: 1}
	s.GDT = kvm.DTable{Base: e.GDTBase, Limit: e.GDTLimit}
	// An empty IDT: any exception before the guest loads its own becomes a
	// triple fault (a clean shutdown exit) instead of running garbage.
	s.IDT = kvm.DTable{}
}

func (e *Entry) applyProtected(s *kvm.Sregs) {
	s.CS = flatSeg(e.CodeSel, 0xB, 1, 0)
	d := flatSeg(e.DataSel, 0x3, 1, 0)
	s.DS, s.ES, s.FS, s.GS, s.SS = d, d, d, d, d
	e.applySystem(s)
	s.CR0 = cr0PE | cr0ET
	s.CR3, s.CR4, s.EFER = 0, 0, 0
}

func (e *Entry) applyLong(s *kvm.Sregs) {
	s.CS = flatSeg(e.CodeSel, 0xB, 0, 1)
	d := flatSeg(e.DataSel, 0x3, 1, 0)
	s.DS, s.ES, s.FS, s.GS, s.SS = d, d, d, d, d
	e.applySystem(s)
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0PG
	s.CR3 = e.CR3
	s.CR4 = cr4PAE | cr4OSFXSR | cr4OSXMMEXCPT
	s.EFER = eferLME | eferLMA
}
