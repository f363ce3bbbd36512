package kvm

// This file mirrors the x86-64 KVM ABI from <linux/kvm.h> and
// <asm/kvm.h>. Struct layouts are checked against the kernel's sizes in
// abi_test.go.

const kvmio = 0xAE

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | kvmio<<8 | nr }
func io(nr uintptr) uintptr             { return ioc(0, nr, 0) }
func iow(nr, size uintptr) uintptr      { return ioc(1, nr, size) }
func ior(nr, size uintptr) uintptr      { return ioc(2, nr, size) }
func iowr(nr, size uintptr) uintptr     { return ioc(3, nr, size) }

// ioctl request numbers.
var (
	kvmGetAPIVersion       = io(0x00)
	kvmCreateVM            = io(0x01)
	kvmGetMSRIndexList     = iowr(0x02, 4)
	kvmCheckExtension      = io(0x03)
	kvmGetVCPUMmapSize     = io(0x04)
	kvmGetSupportedCPUID   = iowr(0x05, 8)
	kvmGetMSRFeatureList   = iowr(0x0a, 4)
	kvmCreateVCPU          = io(0x41)
	kvmGetDirtyLog         = iow(0x42, 16)
	kvmSetUserMemoryRegion = iow(0x46, 32)
	kvmSetTSSAddr          = io(0x47)
	kvmSetIdentityMapAddr  = iow(0x48, 8)
	kvmCreateIRQChip       = io(0x60)
	kvmIRQLine             = iow(0x61, 8)
	kvmGetIRQChip          = iowr(0x62, 520)
	kvmSetIRQChip          = ior(0x63, 520)
	kvmIRQFD               = iow(0x76, 32)
	kvmCreatePIT2          = iow(0x77, 64)
	kvmIOEventFD           = iow(0x79, 64)
	kvmSetClock            = iow(0x7b, 48)
	kvmGetClock            = ior(0x7c, 48)
	kvmGetPIT2             = ior(0x9f, 112)
	kvmSetPIT2             = iow(0xa0, 112)
	kvmEnableCap           = iow(0xa3, 104)
	kvmSignalMSI           = iow(0xa5, 32)
	kvmClearDirtyLog       = iowr(0xc0, 24)

	kvmRun            = io(0x80)
	kvmGetRegs        = ior(0x81, 144)
	kvmSetRegs        = iow(0x82, 144)
	kvmGetSregs       = ior(0x83, 312)
	kvmSetSregs       = iow(0x84, 312)
	kvmGetMSRs        = iowr(0x88, 8)
	kvmSetMSRs        = iow(0x89, 8)
	kvmGetFPU         = ior(0x8c, 416)
	kvmSetFPU         = iow(0x8d, 416)
	kvmGetLAPIC       = ior(0x8e, 1024)
	kvmSetLAPIC       = iow(0x8f, 1024)
	kvmSetCPUID2      = iow(0x90, 8)
	kvmGetCPUID2      = iowr(0x91, 8)
	kvmGetMPState     = ior(0x98, 4)
	kvmSetMPState     = iow(0x99, 4)
	kvmGetVCPUEvents  = ior(0x9f, 64)
	kvmSetVCPUEvents  = iow(0xa0, 64)
	kvmGetDebugRegs   = ior(0xa1, 128)
	kvmSetDebugRegs   = iow(0xa2, 128)
	kvmSetTSCKHz      = io(0xa2)
	kvmGetTSCKHz      = io(0xa3)
	kvmGetXSave       = ior(0xa4, 4096)
	kvmSetXSave       = iow(0xa5, 4096)
	kvmGetXCRs        = ior(0xa6, 392)
	kvmSetXCRs        = iow(0xa7, 392)
	kvmKVMClockCtrl   = io(0xad)
	kvmGetXSave2      = ior(0xcf, 4096)
	kvmVCPUEnableCap  = iow(0xa3, 104)
	kvmSetGuestDebug  = iow(0x9b, 72)
	kvmTranslate      = iowr(0x85, 24)
	kvmSetSignalMask  = iow(0x8b, 4)
	kvmInterrupt      = iow(0x86, 4)
	kvmNMI            = io(0x9a)
	kvmGetSupportedHV = iowr(0xc1, 8)
)

// Cap is a KVM capability number for CheckExtension and EnableCap.
type Cap uint32

// Capabilities used by kvmkit.
const (
	CapIRQChip                Cap = 0
	CapHLT                    Cap = 1
	CapUserMemory             Cap = 3
	CapSetTSSAddr             Cap = 4
	CapExtCPUID               Cap = 7
	CapNrVCPUs                Cap = 9
	CapNrMemslots             Cap = 10
	CapMPState                Cap = 14
	CapIRQFD                  Cap = 32
	CapPIT2                   Cap = 33
	CapIOEventFD              Cap = 36
	CapSetIdentityMapAddr     Cap = 37
	CapAdjustClock            Cap = 39
	CapVCPUEvents             Cap = 41
	CapDebugRegs              Cap = 50
	CapXSave                  Cap = 55
	CapXCRs                   Cap = 56
	CapTSCControl             Cap = 60
	CapGetTSCKHz              Cap = 61
	CapMaxVCPUs               Cap = 66
	CapKVMClockCtrl           Cap = 76
	CapReadonlyMem            Cap = 81
	CapImmediateExit          Cap = 136
	CapManualDirtyLogProtect2 Cap = 168
	CapXSave2                 Cap = 208
)

// Memory slot flags.
const (
	MemLogDirtyPages uint32 = 1 << 0
	MemReadonly      uint32 = 1 << 1
)

// Flags for CapManualDirtyLogProtect2.
const (
	dirtyLogManualProtectEnable = 1 << 0
	dirtyLogInitiallySet        = 1 << 1
)

// ExitReason is kvm_run.exit_reason.
type ExitReason uint32

// Exit reasons.
const (
	ExitUnknown       ExitReason = 0
	ExitException     ExitReason = 1
	ExitIO            ExitReason = 2
	ExitHypercall     ExitReason = 3
	ExitDebug         ExitReason = 4
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitIRQWindowOpen ExitReason = 7
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitSetTPR        ExitReason = 11
	ExitTPRAccess     ExitReason = 12
	ExitNMI           ExitReason = 16
	ExitInternalError ExitReason = 17
	ExitSystemEvent   ExitReason = 24
	ExitIOAPICEOI     ExitReason = 26
	ExitHyperV        ExitReason = 27
	ExitX86RDMSR      ExitReason = 29
	ExitX86WRMSR      ExitReason = 30
	ExitDirtyRingFull ExitReason = 31
	ExitAPResetHold   ExitReason = 32
	ExitX86BusLock    ExitReason = 33
	ExitNotify        ExitReason = 37
	ExitMemoryFault   ExitReason = 39
)

var exitNames = map[ExitReason]string{
	ExitUnknown: "UNKNOWN", ExitException: "EXCEPTION", ExitIO: "IO", ExitHypercall: "HYPERCALL",
	ExitDebug: "DEBUG", ExitHLT: "HLT", ExitMMIO: "MMIO", ExitIRQWindowOpen: "IRQ_WINDOW_OPEN",
	ExitShutdown: "SHUTDOWN", ExitFailEntry: "FAIL_ENTRY", ExitIntr: "INTR", ExitSetTPR: "SET_TPR",
	ExitTPRAccess: "TPR_ACCESS", ExitNMI: "NMI", ExitInternalError: "INTERNAL_ERROR",
	ExitSystemEvent: "SYSTEM_EVENT", ExitIOAPICEOI: "IOAPIC_EOI", ExitHyperV: "HYPERV",
	ExitX86RDMSR: "X86_RDMSR", ExitX86WRMSR: "X86_WRMSR", ExitDirtyRingFull: "DIRTY_RING_FULL",
	ExitAPResetHold: "AP_RESET_HOLD", ExitX86BusLock: "X86_BUS_LOCK", ExitNotify: "NOTIFY",
	ExitMemoryFault: "MEMORY_FAULT",
}

// String returns the KVM name of the exit reason.
func (r ExitReason) String() string {
	if s, ok := exitNames[r]; ok {
		return s
	}
	return "EXIT_" + itoa(uint64(r))
}

// System event types (kvm_run.system_event.type).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
	SystemEventWakeup   = 4
	SystemEventSuspend  = 5
	SystemEventSEVTerm  = 6
)

// MP states (KVM_GET/SET_MP_STATE).
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// Regs is struct kvm_regs: the general-purpose registers.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable (GDTR/IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs: segment and control registers.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	InterruptBitmap        [4]uint64
}

// FPU is struct kvm_fpu: legacy x87 and SSE state.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// LAPICState is struct kvm_lapic_state: the local APIC register page.
type LAPICState struct {
	Regs [1024]byte
}

// MSREntry is struct kvm_msr_entry.
type MSREntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// CPUID entry flags.
const (
	CPUIDFlagSignificantIndex = 1 << 0
)

// VCPUEvents is struct kvm_vcpu_events: pending exceptions, interrupts,
// NMIs and SMM state.
type VCPUEvents struct {
	Exception struct {
		Injected     uint8
		Nr           uint8
		HasErrorCode uint8
		Pending      uint8
		ErrorCode    uint32
	}
	Interrupt struct {
		Injected uint8
		Nr       uint8
		Soft     uint8
		Shadow   uint8
	}
	NMI struct {
		Injected uint8
		Pending  uint8
		Masked   uint8
		_        uint8
	}
	SIPIVector uint32
	Flags      uint32
	SMI        struct {
		SMM          uint8
		Pending      uint8
		SMMInsideNMI uint8
		LatchedInit  uint8
	}
	TripleFaultPending  uint8
	_                   [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// DebugRegs is struct kvm_debugregs.
type DebugRegs struct {
	DB    [4]uint64
	DR6   uint64
	DR7   uint64
	Flags uint64
	_     [9]uint64
}

// XSave is struct kvm_xsave. Region holds the XSAVE area; Extra holds the
// part beyond 4 KiB on hosts whose XSAVE area is larger (KVM_CAP_XSAVE2).
type XSave struct {
	Region [1024]uint32
	Extra  []byte
}

// XCR is one extended control register.
type XCR struct {
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs.
type XCRs struct {
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// IRQChip identifiers for GetIRQChip/SetIRQChip.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// IRQChipState is struct kvm_irqchip: one PIC or the IOAPIC, as raw bytes.
type IRQChipState struct {
	ChipID uint32
	_      uint32
	Chip   [512]byte
}

// PITChannel is struct kvm_pit_channel_state.
type PITChannel struct {
	Count         uint32
	LatchedCount  uint16
	CountLatched  uint8
	StatusLatched uint8
	Status        uint8
	ReadState     uint8
	WriteState    uint8
	WriteLatch    uint8
	RWMode        uint8
	Mode          uint8
	BCD           uint8
	Gate          uint8
	CountLoadTime int64
}

// PITState2 is struct kvm_pit_state2.
type PITState2 struct {
	Channels [3]PITChannel
	Flags    uint32
	_        [9]uint32
}

// ClockData is struct kvm_clock_data (kvmclock).
type ClockData struct {
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64
}

type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64
}

type irqLevel struct {
	IRQ   uint32
	Level uint32
}

// kvmMSI is struct kvm_msi.
type kvmMSI struct {
	AddressLo uint32
	AddressHi uint32
	Data      uint32
	Flags     uint32
	DevID     uint32
	_         [12]uint8
}

type irqfd struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

type ioeventfd struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

type pitConfig struct {
	Flags uint32
	_     [15]uint32
}

type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

// kvm_run layout (offsets into the mmap'd page).
const (
	runImmediateExit = 1
	runExitReason    = 8
	runReadyForIRQ   = 12
	runIFFlag        = 13
	runCR8           = 16
	runAPICBase      = 24
	runExitUnion     = 32
)

// ioevent/irqfd flags.
const (
	irqfdDeassign      = 1 << 0
	ioeventfdDatamatch = 1 << 0
	ioeventfdPIO       = 1 << 1
	ioeventfdDeassign  = 1 << 2
)

// Clock flags in ClockData.Flags.
const (
	ClockTSCStable = 1 << 1
	ClockRealtime  = 1 << 2
	ClockHostTSC   = 1 << 3
)

// VCPU event flags in VCPUEvents.Flags.
const (
	VCPUEventValidNMIPending  = 1 << 0
	VCPUEventValidSIPIVector  = 1 << 1
	VCPUEventValidShadow      = 1 << 2
	VCPUEventValidSMM         = 1 << 3
	VCPUEventValidPayload     = 1 << 4
	VCPUEventValidTripleFault = 1 << 5
)

func itoa(v uint64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			break
		}
	}
	return string(b[i:])
}
