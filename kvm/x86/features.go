package x86

import (
	"fmt"
	"sort"
	"strings"
)

// Register is a CPUID output register.
type Register uint8

// CPUID output registers.
const (
	EAX Register = iota
	EBX
	ECX
	EDX
)

func (r Register) String() string {
	switch r {
	case EAX:
		return "EAX"
	case EBX:
		return "EBX"
	case ECX:
		return "ECX"
	case EDX:
		return "EDX"
	}
	return "?"
}

// Feature is one CPUID feature bit: leaf, subleaf, register and bit packed
// into an integer so that features can be constants.
type Feature uint64

// NewFeature makes the Feature for CPUID.(EAX=leaf,ECX=subleaf):reg[bit].
func NewFeature(leaf, subleaf uint32, reg Register, bit uint) Feature {
	return Feature(uint64(leaf)<<32 | uint64(subleaf&0xFFFF)<<16 | uint64(reg&3)<<8 | uint64(bit&31))
}

// Leaf returns the CPUID function.
func (f Feature) Leaf() uint32 { return uint32(f >> 32) }

// Subleaf returns the CPUID index.
func (f Feature) Subleaf() uint32 { return uint32(f>>16) & 0xFFFF }

// Reg returns the output register.
func (f Feature) Reg() Register { return Register(f>>8) & 3 }

// Bit returns the bit number in the register.
func (f Feature) Bit() uint { return uint(f) & 31 }

// Location formats the feature as CPUID.(EAX=leaf,ECX=subleaf):REG[bit].
func (f Feature) Location() string {
	return fmt.Sprintf("CPUID.(EAX=%#x,ECX=%d):%s[%d]", f.Leaf(), f.Subleaf(), f.Reg(), f.Bit())
}

// String returns the Linux name of the feature (as in /proc/cpuinfo) when
// known, else its location.
func (f Feature) String() string {
	if n, ok := featureNames()[f]; ok {
		return n
	}
	return f.Location()
}

// Well-known features, for masks.
const (
	FeatureVMX          = Feature(1<<32 | uint64(ECX)<<8 | 5)
	FeatureMONITOR      = Feature(1<<32 | uint64(ECX)<<8 | 3)
	FeaturePCID         = Feature(1<<32 | uint64(ECX)<<8 | 17)
	FeatureX2APIC       = Feature(1<<32 | uint64(ECX)<<8 | 21)
	FeatureTSCDeadline  = Feature(1<<32 | uint64(ECX)<<8 | 24)
	FeatureXSAVE        = Feature(1<<32 | uint64(ECX)<<8 | 26)
	FeatureOSXSAVE      = Feature(1<<32 | uint64(ECX)<<8 | 27)
	FeatureAVX          = Feature(1<<32 | uint64(ECX)<<8 | 28)
	FeatureRDRAND       = Feature(1<<32 | uint64(ECX)<<8 | 30)
	FeatureHypervisor   = Feature(1<<32 | uint64(ECX)<<8 | 31)
	FeatureHTT          = Feature(1<<32 | uint64(EDX)<<8 | 28)
	FeatureAVX2         = Feature(7<<32 | uint64(EBX)<<8 | 5)
	FeatureAVX512F      = Feature(7<<32 | uint64(EBX)<<8 | 16)
	FeatureRTM          = Feature(7<<32 | uint64(EBX)<<8 | 11)
	FeatureHLE          = Feature(7<<32 | uint64(EBX)<<8 | 4)
	FeatureOSPKE        = Feature(7<<32 | uint64(ECX)<<8 | 4)
	FeatureLA57         = Feature(7<<32 | uint64(ECX)<<8 | 16)
	FeatureSVM          = Feature(0x80000001<<32 | uint64(ECX)<<8 | 2)
	FeatureCmpLegacy    = Feature(0x80000001<<32 | uint64(ECX)<<8 | 1)
	FeatureTopoExt      = Feature(0x80000001<<32 | uint64(ECX)<<8 | 22)
	FeatureNX           = Feature(0x80000001<<32 | uint64(EDX)<<8 | 20)
	FeaturePDPE1GB      = Feature(0x80000001<<32 | uint64(EDX)<<8 | 26)
	FeatureRDTSCP       = Feature(0x80000001<<32 | uint64(EDX)<<8 | 27)
	FeatureLM           = Feature(0x80000001<<32 | uint64(EDX)<<8 | 29)
	FeatureKVMClock     = Feature(0x40000001<<32 | uint64(EAX)<<8 | 0)
	FeatureKVMClock2    = Feature(0x40000001<<32 | uint64(EAX)<<8 | 3)
	FeatureKVMAsyncPF   = Feature(0x40000001<<32 | uint64(EAX)<<8 | 4)
	FeatureKVMStealTime = Feature(0x40000001<<32 | uint64(EAX)<<8 | 5)
	FeatureKVMPVEOI     = Feature(0x40000001<<32 | uint64(EAX)<<8 | 6)
	FeatureKVMPVUnhalt  = Feature(0x40000001<<32 | uint64(EAX)<<8 | 7)
)

// featureReg identifies one feature-flag register.
type featureReg struct {
	leaf, subleaf uint32
	reg           Register
	names         [32]string
}

// featureRegs lists the registers whose bits are features (compared by
// Compatible), with Linux's names for the bits, in comparison order.
func featureRegs() []featureReg {
	return []featureReg{
		{leaf: 1, reg: EDX, names: [32]string{0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat", 17: "pse36", 19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2", 27: "ss", 28: "ht"}},
		{leaf: 1, reg: ECX, names: [32]string{0: "pni", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds_cpl", 5: "vmx", 6: "smx", 7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16", 14: "xtpr", 15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc_deadline_timer", 25: "aes", 26: "xsave", 27: "osxsave", 28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor"}},
		{leaf: 7, reg: EBX, names: [32]string{0: "fsgsbase", 1: "tsc_adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2", 6: "fdp_excptn_only", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm", 12: "cqm", 13: "zero_fcs_fds", 14: "mpx", 15: "rdt_a", 16: "avx512f", 17: "avx512dq", 18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb", 25: "intel_pt", 26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha_ni", 30: "avx512bw", 31: "avx512vl"}},
		{leaf: 7, reg: ECX, names: [32]string{0: "prefetchwt1", 1: "avx512vbmi", 2: "umip", 3: "pku", 4: "ospke", 5: "waitpkg", 6: "avx512_vbmi2", 7: "shstk", 8: "gfni", 9: "vaes", 10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg", 13: "tme", 14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 24: "bus_lock_detect", 25: "cldemote", 27: "movdiri", 28: "movdir64b", 29: "enqcmd", 30: "sgx_lc", 31: "pks"}},
		{leaf: 7, reg: EDX, names: [32]string{2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 5: "uintr", 8: "avx512_vp2intersect", 10: "md_clear", 14: "serialize", 16: "tsxldtrk", 18: "pconfig", 19: "arch_lbr", 20: "ibt", 22: "amx_bf16", 23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl", 27: "intel_stibp", 28: "flush_l1d", 29: "arch_capabilities", 30: "core_capabilities", 31: "spec_ctrl_ssbd"}},
		{leaf: 7, subleaf: 1, reg: EAX, names: [32]string{4: "avx_vnni", 5: "avx512_bf16", 10: "fzrm", 11: "fsrs", 12: "fsrc", 22: "amx_fp16", 23: "avx_ifma", 26: "lam"}},
		{leaf: 0xD, reg: EAX, names: [32]string{0: "xcr0_x87", 1: "xcr0_sse", 2: "xcr0_avx", 3: "xcr0_bndregs", 4: "xcr0_bndcsr", 5: "xcr0_opmask", 6: "xcr0_zmm_hi256", 7: "xcr0_hi16_zmm", 9: "xcr0_pkru", 17: "xcr0_xtilecfg", 18: "xcr0_xtiledata"}},
		{leaf: 0xD, subleaf: 1, reg: EAX, names: [32]string{0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves", 4: "xfd"}},
		{leaf: 0x80000001, reg: EDX, names: [32]string{11: "syscall", 19: "mp", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb", 27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow"}},
		{leaf: 0x80000001, reg: ECX, names: [32]string{0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic", 4: "cr8_legacy", 5: "abm", 6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop", 12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr", 21: "tbm", 22: "topoext", 23: "perfctr_core", 24: "perfctr_nb", 26: "bpext", 27: "ptsc", 28: "perfctr_llc", 29: "mwaitx"}},
		{leaf: 0x80000008, reg: EBX, names: [32]string{0: "clzero", 1: "irperf", 2: "xsaveerptr", 4: "rdpru", 9: "wbnoinvd", 12: "amd_ibpb", 14: "amd_ibrs", 15: "amd_stibp", 24: "amd_ssbd", 25: "virt_ssbd", 26: "amd_ssb_no"}},
		{leaf: 0x40000001, reg: EAX, names: [32]string{0: "kvmclock", 1: "kvm_nopiodelay", 2: "kvm_mmu_op", 3: "kvmclock2", 4: "kvm_async_pf", 5: "kvm_steal_time", 6: "kvm_pv_eoi", 7: "kvm_pv_unhalt", 9: "kvm_pv_tlb_flush", 10: "kvm_async_pf_vmexit", 11: "kvm_pv_send_ipi", 12: "kvm_poll_control", 13: "kvm_pv_sched_yield", 14: "kvm_async_pf_int", 15: "kvm_msi_ext_dest_id", 16: "kvm_hc_map_gpa_range", 17: "kvm_migration_control"}},
	}
}

// featureNames maps every named feature to its name.
func featureNames() map[Feature]string {
	m := make(map[Feature]string, 320)
	for _, fr := range featureRegs() {
		for bit, n := range fr.names {
			if n != "" {
				m[NewFeature(fr.leaf, fr.subleaf, fr.reg, uint(bit))] = n
			}
		}
	}
	return m
}

// FeatureNames returns the names ParseFeature accepts, sorted.
func FeatureNames() []string {
	var out []string
	for _, n := range featureNames() {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// ParseFeature returns the feature with the given Linux name (as in
// /proc/cpuinfo, case-insensitive; "sse3" is accepted for "pni").
func ParseFeature(name string) (Feature, error) {
	n := strings.ToLower(strings.TrimSpace(name))
	if n == "sse3" {
		n = "pni"
	}
	for f, fn := range featureNames() {
		if fn == n {
			return f, nil
		}
	}
	return 0, fmt.Errorf("unknown CPU feature %q", name)
}

// dynamicFeatures are bits that reflect guest state (CR4) rather than CPU
// capability; they are ignored by Compatible and Fingerprint.
func isDynamic(f Feature) bool { return f == FeatureOSXSAVE || f == FeatureOSPKE }
