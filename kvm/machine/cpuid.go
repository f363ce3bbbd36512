package machine

import "github.com/kvmkit/kvmkit/kvm"

// cpuidFor derives vCPU index's CPUID from the host's supported list.
func cpuidFor(supported []kvm.CPUIDEntry, index, n int) []kvm.CPUIDEntry {
	out := make([]kvm.CPUIDEntry, len(supported))
	copy(out, supported)
	for i := range out {
		e := &out[i]
		switch e.Function {
		case 1:
			e.EBX = e.EBX&0x00ffffff | uint32(index)<<24
			e.ECX |= 1 << 31 // hypervisor
		case 0xb, 0x1f:
			e.EDX = uint32(index)
		}
	}
	return out
}
