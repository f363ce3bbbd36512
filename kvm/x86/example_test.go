package x86_test

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/x86"
)

func ExampleFilterCPUID() {
	// In a real VMM, supported comes from KVM_GET_SUPPORTED_CPUID.
	supported := []kvm.CPUIDEntry{
		{Function: 0, EAX: 0xB, EBX: 0x756E6547, EDX: 0x49656E69, ECX: 0x6C65746E}, // "GenuineIntel"
		{Function: 1, ECX: 1 << 28}, // AVX
		{Function: 0xB, Index: 0, Flags: kvm.CPUIDFlagSignificantIndex},
	}
	mask, err := x86.ParseFeature("avx")
	if err != nil {
		panic(err)
	}
	for vcpu := range 2 {
		table := x86.FilterCPUID(supported, x86.CPUIDOptions{VCPU: vcpu, VCPUs: 2, Mask: []x86.Feature{mask}})
		for _, e := range table {
			if e.Function == 1 {
				fmt.Printf("vCPU %d: APIC ID %d, AVX %v, hypervisor %v\n", vcpu, e.EBX>>24, e.ECX&(1<<28) != 0, e.ECX&(1<<31) != 0)
			}
		}
	}
	// Output:
	// vCPU 0: APIC ID 0, AVX false, hypervisor true
	// vCPU 1: APIC ID 1, AVX false, hypervisor true
}

func ExampleCompatible() {
	src := []kvm.CPUIDEntry{{Function: 7, EBX: 1<<5 | 1<<3}} // avx2, bmi1
	dst := []kvm.CPUIDEntry{{Function: 7, EBX: 1 << 3}}      // bmi1 only
	fmt.Println(x86.Compatible(src, dst))
	// Output:
	// destination CPU lacks avx2 (CPUID.(EAX=0x7,ECX=0):EBX[5])
}

func ExampleWriteMPTable() {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	n, err := x86.WriteMPTable(mem, x86.MPTableAddr, 4, x86.MPOptions{})
	if err != nil {
		panic(err)
	}
	fmt.Printf("MP table for 4 CPUs: %d bytes at %#x\n", n, x86.MPTableAddr)
	// Output:
	// MP table for 4 CPUs: 292 bytes at 0x9fc00
}
