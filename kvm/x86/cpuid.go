package x86

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/bits"
	"sort"

	"github.com/kvmkit/kvmkit/kvm"
)

// CPUID leaves handled by FilterCPUID.
const (
	leafVendor        = 0x0
	leafFeatures      = 0x1
	leafCacheParams   = 0x4
	leafExtTopology   = 0xB
	leafExtTopologyV2 = 0x1F
	leafKVMSignature  = 0x40000000
	leafKVMFeatures   = 0x40000001
	leafExtFeatures   = 0x80000001
	leafAddrSizes     = 0x80000008
	leafAMDCache      = 0x8000001D
	leafAMDTopology   = 0x8000001E
)

// CPUIDOptions configure FilterCPUID for one vCPU.
type CPUIDOptions struct {
	// VCPU is the vCPU index; it becomes the (x2)APIC ID.
	VCPU int
	// VCPUs is the number of vCPUs in the VM (values below 1 mean 1). They
	// are presented as cores of one socket, one thread per core.
	VCPUs int
	// Mask lists features to hide from the guest.
	Mask []Feature
}

// entryKey identifies a CPUID entry.
type entryKey struct{ fn, idx uint32 }

func key(e *kvm.CPUIDEntry) entryKey { return entryKey{e.Function, e.Index} }

// reg returns a pointer to register r of e.
func reg(e *kvm.CPUIDEntry, r Register) *uint32 {
	switch r {
	case EAX:
		return &e.EAX
	case EBX:
		return &e.EBX
	case ECX:
		return &e.ECX
	default:
		return &e.EDX
	}
}

// isAMD reports whether the vendor string in leaf 0 is AMD's or Hygon's.
func isAMD(entries []kvm.CPUIDEntry) bool {
	for i := range entries {
		e := &entries[i]
		if e.Function == leafVendor && e.Index == 0 {
			var v [12]byte
			binary.LittleEndian.PutUint32(v[0:], e.EBX)
			binary.LittleEndian.PutUint32(v[4:], e.EDX)
			binary.LittleEndian.PutUint32(v[8:], e.ECX)
			s := string(v[:])
			return s == "AuthenticAMD" || s == "HygonGenuine"
		}
	}
	return false
}

// idBits is the number of APIC-ID bits needed to number n items.
func idBits(n int) uint32 {
	if n <= 1 {
		return 0
	}
	return uint32(bits.Len(uint(n - 1)))
}

// FilterCPUID derives the CPUID table of vCPU opts.VCPU from the host's
// KVM_GET_SUPPORTED_CPUID list. It sets the topology for VCPUs cores in one
// socket with one thread each (leaf 1 APIC ID, logical count and HTT; cache
// sharing in leaf 4 and AMD leaf 0x8000001D; x2APIC topology in leaves 0xB
// and 0x1F when the host lists them; AMD core counts in 0x80000008 and
// 0x8000001E), sets the hypervisor bit, installs the KVM leaves 0x40000000
// ("KVMKVMKVM") and 0x40000001 (paravirt features from the supported list),
// drops other hypervisor leaves, clears the masked features, and returns the
// entries sorted by (function, index). The input is not modified; the
// output depends only on the inputs.
func FilterCPUID(supported []kvm.CPUIDEntry, opts CPUIDOptions) []kvm.CPUIDEntry {
	n := max(opts.VCPUs, 1)
	id := uint32(opts.VCPU)
	amd := isAMD(supported)
	seen := make(map[entryKey]bool, len(supported))
	var out []kvm.CPUIDEntry
	var kvmFeatures *kvm.CPUIDEntry
	hasTopo := map[uint32]bool{}
	for _, e := range supported {
		if seen[key(&e)] {
			continue
		}
		seen[key(&e)] = true
		switch {
		case e.Function == leafExtTopology || e.Function == leafExtTopologyV2:
			hasTopo[e.Function] = true
			continue // regenerated below
		case e.Function == leafKVMSignature:
			continue // regenerated below
		case e.Function == leafKVMFeatures:
			c := e
			kvmFeatures = &c
			continue
		case e.Function > leafKVMFeatures && e.Function < 0x80000000 && e.Function >= 0x40000000:
			continue // other hypervisor interfaces are not offered
		}
		switch e.Function {
		case leafFeatures:
			e.EBX = e.EBX&0x0000FFFF | min(uint32(n), 0xFF)<<16 | id<<24
			if n > 1 {
				e.EDX |= 1 << 28 // HTT: more than one logical processor
			} else {
				e.EDX &^= 1 << 28
			}
			e.ECX |= 1 << 31 // running under a hypervisor
		case leafCacheParams:
			if !amd && e.EAX&0x1F != 0 {
				sharing := uint32(0)
				if (e.EAX>>5)&7 == 3 { // the L3 is shared by the socket
					sharing = min(uint32(n-1), 0xFFF)
				}
				e.EAX = e.EAX&0x3FFF | sharing<<14 | min(uint32(n-1), 0x3F)<<26
			}
		case leafExtFeatures:
			if amd && n > 1 {
				e.ECX |= 1 << 1 // CmpLegacy: HTT counts cores
			}
		case leafAddrSizes:
			if amd {
				e.ECX = e.ECX&^0xF0FF | idBits(n)<<12 | min(uint32(n-1), 0xFF)
			}
		case leafAMDCache:
			if amd && e.EAX&0x1F != 0 {
				sharing := uint32(0)
				if (e.EAX>>5)&7 == 3 {
					sharing = min(uint32(n-1), 0xFFF)
				}
				e.EAX = e.EAX&^(0xFFF<<14) | sharing<<14
			}
		case leafAMDTopology:
			if amd {
				e.EAX = id                      // extended APIC ID
				e.EBX = e.EBX&^0xFFFF | id&0xFF // core ID; one thread per core
				e.ECX &^= 0x7FF                 // node 0, one node per processor
			}
		}
		out = append(out, e)
	}
	for _, leaf := range []uint32{leafExtTopology, leafExtTopologyV2} {
		if hasTopo[leaf] {
			out = append(out, topologyLeaf(leaf, n, id)...)
		}
	}
	sig := kvm.CPUIDEntry{Function: leafKVMSignature, EAX: leafKVMFeatures}
	sig.EBX = binary.LittleEndian.Uint32([]byte("KVMK"))
	sig.ECX = binary.LittleEndian.Uint32([]byte("VMKV"))
	sig.EDX = binary.LittleEndian.Uint32([]byte("M\x00\x00\x00"))
	feat := kvm.CPUIDEntry{Function: leafKVMFeatures}
	if kvmFeatures != nil {
		feat = *kvmFeatures
	}
	out = append(out, sig, feat)
	for _, f := range opts.Mask {
		for i := range out {
			if out[i].Function == f.Leaf() && out[i].Index == f.Subleaf() {
				*reg(&out[i], f.Reg()) &^= 1 << f.Bit()
			}
		}
	}
	sortEntries(out)
	return out
}

// topologyLeaf builds leaf 0xB or 0x1F: an SMT level with one thread, a core
// level with n cores, and the terminating invalid level.
func topologyLeaf(leaf uint32, n int, id uint32) []kvm.CPUIDEntry {
	const levelSMT, levelCore = 1, 2
	flags := uint32(kvm.CPUIDFlagSignificantIndex)
	return []kvm.CPUIDEntry{
		{Function: leaf, Index: 0, Flags: flags, EAX: 0, EBX: 1, ECX: levelSMT << 8, EDX: id},
		{Function: leaf, Index: 1, Flags: flags, EAX: idBits(n), EBX: uint32(n), ECX: levelCore<<8 | 1, EDX: id},
		{Function: leaf, Index: 2, Flags: flags, ECX: 2, EDX: id},
	}
}

func sortEntries(e []kvm.CPUIDEntry) {
	sort.SliceStable(e, func(i, j int) bool {
		if e[i].Function != e[j].Function {
			return e[i].Function < e[j].Function
		}
		return e[i].Index < e[j].Index
	})
}

// normalize returns a sorted copy with the per-vCPU fields (APIC IDs) and
// dynamic bits (OSXSAVE, OSPKE) cleared, so that every vCPU of a VM has the
// same fingerprint.
func normalize(entries []kvm.CPUIDEntry) []kvm.CPUIDEntry {
	out := append([]kvm.CPUIDEntry(nil), entries...)
	for i := range out {
		e := &out[i]
		switch e.Function {
		case leafFeatures:
			e.EBX &= 0x00FFFFFF
			e.ECX &^= 1 << FeatureOSXSAVE.Bit()
		case 7:
			if e.Index == 0 {
				e.ECX &^= 1 << FeatureOSPKE.Bit()
			}
		case leafExtTopology, leafExtTopologyV2:
			e.EDX = 0
		case leafAMDTopology:
			e.EAX = 0
			e.EBX &^= 0xFF
		}
	}
	sortEntries(out)
	return out
}

// Fingerprint returns a SHA-256 digest of a CPUID table, independent of
// entry order, of the vCPU the table was made for (APIC IDs are ignored),
// and of guest-controlled bits (OSXSAVE, OSPKE). Equal fingerprints mean the
// guest sees the same CPU.
func Fingerprint(entries []kvm.CPUIDEntry) [32]byte {
	h := sha256.New()
	var buf [28]byte
	for _, e := range normalize(entries) {
		le := binary.LittleEndian
		le.PutUint32(buf[0:], e.Function)
		le.PutUint32(buf[4:], e.Index)
		le.PutUint32(buf[8:], e.Flags)
		le.PutUint32(buf[12:], e.EAX)
		le.PutUint32(buf[16:], e.EBX)
		le.PutUint32(buf[20:], e.ECX)
		le.PutUint32(buf[24:], e.EDX)
		h.Write(buf[:])
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// IncompatibleError reports a CPUID feature that the source offers to its
// guest but the destination lacks.
type IncompatibleError struct {
	Feature Feature
	// Vendor is set instead when the CPU vendors differ.
	SrcVendor, DstVendor string
}

func (e *IncompatibleError) Error() string {
	if e.SrcVendor != e.DstVendor {
		return fmt.Sprintf("CPU vendor differs: source %q, destination %q", e.SrcVendor, e.DstVendor)
	}
	return fmt.Sprintf("destination CPU lacks %s (%s)", e.Feature, e.Feature.Location())
}

func vendor(entries []kvm.CPUIDEntry) string {
	for i := range entries {
		e := &entries[i]
		if e.Function == leafVendor && e.Index == 0 {
			var v [12]byte
			binary.LittleEndian.PutUint32(v[0:], e.EBX)
			binary.LittleEndian.PutUint32(v[4:], e.EDX)
			binary.LittleEndian.PutUint32(v[8:], e.ECX)
			return string(v[:])
		}
	}
	return ""
}

func lookup(entries []kvm.CPUIDEntry, fn, idx uint32) (kvm.CPUIDEntry, bool) {
	for _, e := range entries {
		if e.Function == fn && e.Index == idx {
			return e, true
		}
	}
	return kvm.CPUIDEntry{}, false
}

// Compatible checks that a guest running with CPUID table src can move to a
// host offering dst (the destination's supported or filtered table): same
// vendor, and every feature bit set in src is set in dst. It returns an
// *IncompatibleError naming the first missing feature, in leaf order.
func Compatible(src, dst []kvm.CPUIDEntry) error {
	if sv, dv := vendor(src), vendor(dst); sv != dv {
		return &IncompatibleError{SrcVendor: sv, DstVendor: dv}
	}
	for _, fr := range featureRegs() {
		s, ok := lookup(src, fr.leaf, fr.subleaf)
		if !ok {
			continue
		}
		d, _ := lookup(dst, fr.leaf, fr.subleaf)
		missing := *reg(&s, fr.reg) &^ *reg(&d, fr.reg)
		for missing != 0 {
			bit := uint(bits.TrailingZeros32(missing))
			missing &^= 1 << bit
			f := NewFeature(fr.leaf, fr.subleaf, fr.reg, bit)
			if isDynamic(f) || isTopology(f) {
				continue
			}
			return &IncompatibleError{Feature: f}
		}
	}
	return nil
}

// isTopology reports bits FilterCPUID derives from the vCPU count or sets
// itself; they say nothing about the destination host.
func isTopology(f Feature) bool {
	return f == FeatureHypervisor || f == FeatureHTT || f == FeatureCmpLegacy
}
