package kvm

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
)

// TestABISizes checks every mirrored struct against the kernel's size.
func TestABISizes(t *testing.T) {
	cases := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_lapic_state", unsafe.Sizeof(LAPICState{}), 1024},
		{"kvm_msr_entry", unsafe.Sizeof(MSREntry{}), 16},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_irqchip", unsafe.Sizeof(IRQChipState{}), 520},
		{"kvm_pit_channel_state", unsafe.Sizeof(PITChannel{}), 24},
		{"kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_irq_level", unsafe.Sizeof(irqLevel{}), 8},
		{"kvm_irqfd", unsafe.Sizeof(irqfd{}), 32},
		{"kvm_msi", unsafe.Sizeof(kvmMSI{}), 32},
		{"kvm_ioeventfd", unsafe.Sizeof(ioeventfd{}), 64},
		{"kvm_pit_config", unsafe.Sizeof(pitConfig{}), 64},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, c.got, c.name)
	}
	assert.Equal(t, uintptr(28), unsafe.Offsetof(VCPUEvents{}.TripleFaultPending))
	assert.Equal(t, uintptr(56), unsafe.Offsetof(VCPUEvents{}.ExceptionPayload))
	assert.Equal(t, uintptr(280), unsafe.Offsetof(Sregs{}.InterruptBitmap))
}

// TestIoctlNumbers checks a few request numbers against <linux/kvm.h>.
func TestIoctlNumbers(t *testing.T) {
	cases := []struct {
		name      string
		got, want uintptr
	}{
		{"KVM_GET_API_VERSION", kvmGetAPIVersion, 0xAE00},
		{"KVM_CREATE_VM", kvmCreateVM, 0xAE01},
		{"KVM_RUN", kvmRun, 0xAE80},
		{"KVM_GET_REGS", kvmGetRegs, 0x8090AE81},
		{"KVM_SET_REGS", kvmSetRegs, 0x4090AE82},
		{"KVM_GET_SREGS", kvmGetSregs, 0x8138AE83},
		{"KVM_SET_USER_MEMORY_REGION", kvmSetUserMemoryRegion, 0x4020AE46},
		{"KVM_GET_SUPPORTED_CPUID", kvmGetSupportedCPUID, 0xC008AE05},
		{"KVM_SET_CPUID2", kvmSetCPUID2, 0x4008AE90},
		{"KVM_GET_MSRS", kvmGetMSRs, 0xC008AE88},
		{"KVM_IRQFD", kvmIRQFD, 0x4020AE76},
		{"KVM_SIGNAL_MSI", kvmSignalMSI, 0x4020AEA5},
		{"KVM_IOEVENTFD", kvmIOEventFD, 0x4040AE79},
		{"KVM_GET_VCPU_EVENTS", kvmGetVCPUEvents, 0x8040AE9F},
		{"KVM_GET_PIT2", kvmGetPIT2, 0x8070AE9F},
		{"KVM_CLEAR_DIRTY_LOG", kvmClearDirtyLog, 0xC018AEC0},
		{"KVM_GET_XSAVE", kvmGetXSave, 0x9000AEA4},
		{"KVM_ENABLE_CAP", kvmEnableCap, 0x4068AEA3},
	}
	for _, c := range cases {
		assert.Equalf(t, c.want, c.got, "%s = %#x", c.name, c.got)
	}
}

func TestExitReasonString(t *testing.T) {
	assert.Equal(t, "IO", ExitIO.String())
	assert.Equal(t, "SHUTDOWN", ExitShutdown.String())
	assert.Equal(t, "EXIT_99", ExitReason(99).String())
}
