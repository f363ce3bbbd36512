package x86

import "github.com/kvmkit/kvmkit/kvm"

// MSR indices used for guest set-up.
const (
	MSRIA32TSC          = 0x10
	MSRIA32SysenterCS   = 0x174
	MSRIA32SysenterESP  = 0x175
	MSRIA32SysenterEIP  = 0x176
	MSRIA32MiscEnable   = 0x1A0
	MSRMTRRDefType      = 0x2FF
	MSRSTAR             = 0xC0000081
	MSRLSTAR            = 0xC0000082
	MSRCSTAR            = 0xC0000083
	MSRSyscallMask      = 0xC0000084
	MSRKernelGSBase     = 0xC0000102
	miscEnableFastStr   = 1 << 0
	mtrrDefTypeEnable   = 1 << 11
	mtrrTypeWriteBack   = 6
	mtrrDefTypeWBEnable = mtrrDefTypeEnable | mtrrTypeWriteBack
)

// BootMSRs returns the MSR values every vCPU should get before a Linux boot
// (KVM_SET_MSRS): the SYSENTER and SYSCALL MSRs and KERNEL_GS_BASE cleared,
// the TSC at 0, fast strings enabled in IA32_MISC_ENABLE, and MTRRs enabled
// with write-back as the default memory type (so that RAM is cacheable
// without the guest programming variable MTRRs).
func BootMSRs() []kvm.MSREntry {
	return []kvm.MSREntry{
		{Index: MSRIA32SysenterCS},
		{Index: MSRIA32SysenterESP},
		{Index: MSRIA32SysenterEIP},
		{Index: MSRSTAR},
		{Index: MSRLSTAR},
		{Index: MSRCSTAR},
		{Index: MSRKernelGSBase},
		{Index: MSRSyscallMask},
		{Index: MSRIA32TSC},
		{Index: MSRIA32MiscEnable, Data: miscEnableFastStr},
		{Index: MSRMTRRDefType, Data: mtrrDefTypeWBEnable},
	}
}

// Reset values of the x87 control word and the SSE control/status register.
const (
	fpuControlWord = 0x37F
	mxcsrDefault   = 0x1F80
)

// BootFPU returns the x87/SSE state for KVM_SET_FPU before a boot: the
// power-on x87 control word (0x37F, all exceptions masked) and MXCSR
// (0x1F80), so that code using SSE before initializing it behaves as on
// hardware.
func BootFPU() kvm.FPU {
	return kvm.FPU{FCW: fpuControlWord, MXCSR: mxcsrDefault}
}
