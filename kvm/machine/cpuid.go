package machine

import (
	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/x86"
)

// cpuidFor derives vCPU index's CPUID from the host's supported list:
// topology for n vCPUs, APIC IDs, the hypervisor bit and KVM's leaves.
func cpuidFor(supported []kvm.CPUIDEntry, index, n int) []kvm.CPUIDEntry {
	return x86.FilterCPUID(supported, x86.CPUIDOptions{VCPU: index, VCPUs: n})
}
