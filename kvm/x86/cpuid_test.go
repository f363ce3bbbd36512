package x86

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func vendorEntry(v string, maxLeaf uint32) kvm.CPUIDEntry {
	b := []byte(v)
	return kvm.CPUIDEntry{Function: 0, EAX: maxLeaf,
		EBX: binary.LittleEndian.Uint32(b[0:]), EDX: binary.LittleEndian.Uint32(b[4:]), ECX: binary.LittleEndian.Uint32(b[8:])}
}

// intelSupported mimics KVM_GET_SUPPORTED_CPUID on an Intel host.
func intelSupported() []kvm.CPUIDEntry {
	sig := uint32(kvm.CPUIDFlagSignificantIndex)
	return []kvm.CPUIDEntry{
		{Function: 0x80000008, EAX: 0x3027},
		vendorEntry("GenuineIntel", 0x1F),
		{Function: 1, EAX: 0x906EA, EBX: 0x00100800, ECX: 0x7FFA3203, EDX: 0x1F8BFBFF},
		{Function: 4, Index: 0, Flags: sig, EAX: 0x1C004121},
		{Function: 4, Index: 1, Flags: sig, EAX: 0x1C004122},
		{Function: 4, Index: 2, Flags: sig, EAX: 0x1C004143},
		{Function: 4, Index: 3, Flags: sig, EAX: 0x1C03C163},
		{Function: 4, Index: 4, Flags: sig},
		{Function: 7, Index: 0, Flags: sig, EBX: 0x029C67AF, ECX: 0x40000010, EDX: 0xBC000400},
		{Function: 0xB, Index: 0, Flags: sig, EAX: 1, EBX: 2, ECX: 0x100, EDX: 9},
		{Function: 0xB, Index: 1, Flags: sig, EAX: 4, EBX: 8, ECX: 0x201, EDX: 9},
		{Function: 0x1F, Index: 0, Flags: sig},
		{Function: 0x40000000, EAX: 0x40000001, EBX: 0x4B4D564B, ECX: 0x564B4D56, EDX: 0x4D},
		{Function: 0x40000001, EAX: 0x01007AFB},
		{Function: 0x40000100, EAX: 0x1234}, // some other hypervisor leaf
		{Function: 0x80000001, ECX: 0x121, EDX: 0x2C100800},
		{Function: 1, EAX: 0xDEAD}, // duplicate: ignored
	}
}

func amdSupported() []kvm.CPUIDEntry {
	return []kvm.CPUIDEntry{
		vendorEntry("AuthenticAMD", 0x10),
		{Function: 1, EAX: 0x830F10, EBX: 0x00000800, ECX: 0x7ED8320B, EDX: 0x178BFBFF},
		{Function: 0x80000001, ECX: 0x75C237FF, EDX: 0x2FD3FBFF},
		{Function: 0x80000008, EAX: 0x3030, EBX: 0x1001, ECX: 0x7007},
		{Function: 0x8000001D, Index: 0, Flags: 1, EAX: 0x00004121},
		{Function: 0x8000001D, Index: 3, Flags: 1, EAX: 0x0003C163},
		{Function: 0x8000001E, EAX: 5, EBX: 0x105, ECX: 0x301},
	}
}

func find(t *testing.T, es []kvm.CPUIDEntry, fn, idx uint32) kvm.CPUIDEntry {
	t.Helper()
	for _, e := range es {
		if e.Function == fn && e.Index == idx {
			return e
		}
	}
	t.Fatalf("no CPUID entry %#x.%d", fn, idx)
	return kvm.CPUIDEntry{}
}

func count(es []kvm.CPUIDEntry, fn uint32) int {
	n := 0
	for _, e := range es {
		if e.Function == fn {
			n++
		}
	}
	return n
}

func TestFilterCPUIDIntel(t *testing.T) {
	in := intelSupported()
	orig := append([]kvm.CPUIDEntry(nil), in...)
	out := FilterCPUID(in, CPUIDOptions{VCPU: 3, VCPUs: 6, Mask: []Feature{FeatureAVX2, FeatureKVMStealTime}})
	assert.Equal(t, orig, in, "input not modified")

	l1 := find(t, out, 1, 0)
	assert.Equal(t, uint32(0x906EA), l1.EAX, "first duplicate wins")
	assert.Equal(t, uint32(3), l1.EBX>>24, "initial APIC ID")
	assert.Equal(t, uint32(6), (l1.EBX>>16)&0xFF, "logical processor count")
	assert.Equal(t, uint32(0x0800), l1.EBX&0xFFFF, "CLFLUSH size kept")
	assert.NotZero(t, l1.EDX&(1<<28), "HTT")
	assert.NotZero(t, l1.ECX&(1<<31), "hypervisor bit")

	// Leaf 4: 6 cores per package; L1/L2 per core, L3 shared by all.
	for _, c := range []struct{ idx, orig, shared uint32 }{{0, 0x1C004121, 0}, {1, 0x1C004122, 0}, {2, 0x1C004143, 0}, {3, 0x1C03C163, 5}} {
		e := find(t, out, 4, c.idx)
		assert.Equal(t, uint32(5), e.EAX>>26, "leaf 4.%d cores-1", c.idx)
		assert.Equal(t, c.shared, (e.EAX>>14)&0xFFF, "leaf 4.%d sharing", c.idx)
		assert.Equal(t, c.orig&0x3FFF, e.EAX&0x3FFF, "leaf 4.%d cache type and level kept", c.idx)
	}
	assert.Equal(t, uint32(0), find(t, out, 4, 4).EAX, "terminator untouched")

	for _, leaf := range []uint32{0xB, 0x1F} {
		require.Equal(t, 3, count(out, leaf))
		smt, core, end := find(t, out, leaf, 0), find(t, out, leaf, 1), find(t, out, leaf, 2)
		assert.Equal(t, kvm.CPUIDEntry{Function: leaf, Index: 0, Flags: 1, EAX: 0, EBX: 1, ECX: 0x100, EDX: 3}, smt)
		assert.Equal(t, kvm.CPUIDEntry{Function: leaf, Index: 1, Flags: 1, EAX: 3, EBX: 6, ECX: 0x201, EDX: 3}, core)
		assert.Equal(t, kvm.CPUIDEntry{Function: leaf, Index: 2, Flags: 1, ECX: 2, EDX: 3}, end)
	}

	sig := find(t, out, 0x40000000, 0)
	var name [12]byte
	binary.LittleEndian.PutUint32(name[0:], sig.EBX)
	binary.LittleEndian.PutUint32(name[4:], sig.ECX)
	binary.LittleEndian.PutUint32(name[8:], sig.EDX)
	assert.Equal(t, "KVMKVMKVM\x00\x00\x00", string(name[:]))
	assert.Equal(t, uint32(0x40000001), sig.EAX)
	assert.Equal(t, uint32(0x01007AFB&^(1<<5)), find(t, out, 0x40000001, 0).EAX, "KVM features kept, steal time masked")
	assert.Zero(t, count(out, 0x40000100), "foreign hypervisor leaves dropped")

	assert.Zero(t, find(t, out, 7, 0).EBX&(1<<5), "AVX2 masked")
	assert.Equal(t, uint32(0x3027), find(t, out, 0x80000008, 0).EAX, "Intel: 0x80000008 untouched")

	for i := 1; i < len(out); i++ {
		a, b := out[i-1], out[i]
		assert.True(t, a.Function < b.Function || (a.Function == b.Function && a.Index < b.Index), "sorted and unique at %d", i)
	}
	assert.Equal(t, out, FilterCPUID(intelSupported(), CPUIDOptions{VCPU: 3, VCPUs: 6, Mask: []Feature{FeatureAVX2, FeatureKVMStealTime}}), "deterministic")
}

func TestFilterCPUIDSingleVCPU(t *testing.T) {
	out := FilterCPUID(intelSupported(), CPUIDOptions{})
	l1 := find(t, out, 1, 0)
	assert.Zero(t, l1.EDX&(1<<28), "no HTT with one vCPU")
	assert.Equal(t, uint32(1), (l1.EBX>>16)&0xFF)
	assert.Equal(t, uint32(0), l1.EBX>>24)
	assert.Equal(t, uint32(0), find(t, out, 0xB, 1).EAX)
	assert.Equal(t, uint32(1), find(t, out, 0xB, 1).EBX)
}

func TestFilterCPUIDAMD(t *testing.T) {
	out := FilterCPUID(amdSupported(), CPUIDOptions{VCPU: 2, VCPUs: 4})
	e := find(t, out, 0x80000008, 0)
	assert.Equal(t, uint32(3), e.ECX&0xFF, "NC = cores-1")
	assert.Equal(t, uint32(2), (e.ECX>>12)&0xF, "ApicIdCoreIdSize")
	assert.Equal(t, uint32(0x3030), e.EAX)
	topo := find(t, out, 0x8000001E, 0)
	assert.Equal(t, uint32(2), topo.EAX)
	assert.Equal(t, uint32(2), topo.EBX&0xFFFF)
	assert.Equal(t, uint32(0), topo.ECX&0x7FF)
	assert.NotZero(t, find(t, out, 0x80000001, 0).ECX&(1<<1), "CmpLegacy")
	assert.Zero(t, count(out, 0xB), "no 0xB without host support")
	assert.Equal(t, uint32(0x00000121), find(t, out, 0x8000001D, 0).EAX, "L1 per core")
	assert.Equal(t, uint32(0x0000C163), find(t, out, 0x8000001D, 3).EAX, "L3 shared by 4 cores")
	// KVM leaves exist even if the host list lacked them.
	assert.Equal(t, uint32(0), find(t, out, 0x40000001, 0).EAX)
}

func TestFingerprint(t *testing.T) {
	a := FilterCPUID(intelSupported(), CPUIDOptions{VCPU: 0, VCPUs: 4})
	b := FilterCPUID(intelSupported(), CPUIDOptions{VCPU: 3, VCPUs: 4})
	assert.Equal(t, Fingerprint(a), Fingerprint(b), "same VM, different vCPU")
	rev := append([]kvm.CPUIDEntry(nil), a...)
	for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
		rev[i], rev[j] = rev[j], rev[i]
	}
	assert.Equal(t, Fingerprint(a), Fingerprint(rev), "order independent")
	c := FilterCPUID(intelSupported(), CPUIDOptions{VCPUs: 4, Mask: []Feature{FeatureAVX}})
	assert.NotEqual(t, Fingerprint(a), Fingerprint(c), "masking changes it")
	d := FilterCPUID(intelSupported(), CPUIDOptions{VCPUs: 5})
	assert.NotEqual(t, Fingerprint(a), Fingerprint(d), "vCPU count changes it")
}

func TestCompatible(t *testing.T) {
	src := FilterCPUID(intelSupported(), CPUIDOptions{VCPUs: 2})
	require.NoError(t, Compatible(src, intelSupported()), "against the host's own supported list")
	require.NoError(t, Compatible(src, src))

	dst := intelSupported()
	for i := range dst {
		if dst[i].Function == 1 {
			dst[i].ECX &^= 1 << 20 // no SSE4.2
			dst[i].ECX &^= 1 << 9  // no SSSE3 (lower bit: reported first)
		}
	}
	err := Compatible(src, dst)
	var ie *IncompatibleError
	require.ErrorAs(t, err, &ie)
	assert.Equal(t, "ssse3", ie.Feature.String())
	assert.Contains(t, err.Error(), "CPUID.(EAX=0x1,ECX=0):ECX[9]")

	masked := FilterCPUID(intelSupported(), CPUIDOptions{VCPUs: 2, Mask: []Feature{NewFeature(1, 0, ECX, 9), NewFeature(1, 0, ECX, 20)}})
	require.NoError(t, Compatible(masked, dst), "masking makes it migratable")

	err = Compatible(src, amdSupported())
	require.ErrorAs(t, err, &ie)
	assert.Contains(t, err.Error(), "vendor")
}

func TestFeatureNames(t *testing.T) {
	tests := []struct {
		name string
		want Feature
	}{
		{"avx2", FeatureAVX2},
		{"AVX512F", FeatureAVX512F},
		{"sse3", NewFeature(1, 0, ECX, 0)},
		{"x2apic", FeatureX2APIC},
		{"kvmclock", FeatureKVMClock},
		{"lm", FeatureLM},
		{"xsaves", NewFeature(0xD, 1, EAX, 3)},
		{"svm", FeatureSVM},
	}
	for _, tt := range tests {
		f, err := ParseFeature(tt.name)
		require.NoError(t, err, tt.name)
		assert.Equal(t, tt.want, f, tt.name)
	}
	_, err := ParseFeature("warp_drive")
	require.Error(t, err)
	assert.Equal(t, "CPUID.(EAX=0x1,ECX=0):EDX[10]", NewFeature(1, 0, EDX, 10).String(), "unnamed bit")
	assert.Equal(t, uint32(0x80000001), FeatureNX.Leaf())
	assert.Equal(t, EDX, FeatureNX.Reg())
	assert.Equal(t, uint(20), FeatureNX.Bit())
	// Every constant has a name.
	for _, f := range []Feature{FeatureVMX, FeatureMONITOR, FeaturePCID, FeatureX2APIC, FeatureTSCDeadline, FeatureXSAVE,
		FeatureOSXSAVE, FeatureAVX, FeatureRDRAND, FeatureHypervisor, FeatureHTT, FeatureAVX2, FeatureAVX512F, FeatureRTM,
		FeatureHLE, FeatureOSPKE, FeatureLA57, FeatureSVM, FeatureCmpLegacy, FeatureTopoExt, FeatureNX, FeaturePDPE1GB,
		FeatureRDTSCP, FeatureLM, FeatureKVMClock, FeatureKVMClock2, FeatureKVMAsyncPF, FeatureKVMStealTime, FeatureKVMPVEOI,
		FeatureKVMPVUnhalt} {
		assert.NotContains(t, f.String(), "CPUID", "%s has no name", f.Location())
	}
	assert.Contains(t, FeatureNames(), "sse4_2")
}

func FuzzFilterCPUID(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, uint8(1), uint8(4))
	f.Fuzz(func(t *testing.T, raw []byte, vcpu, n uint8) {
		var in []kvm.CPUIDEntry
		for len(raw) >= 12 && len(in) < 256 {
			le := binary.LittleEndian
			in = append(in, kvm.CPUIDEntry{Function: le.Uint32(raw) | uint32(raw[0]&0x80)<<24, Index: uint32(raw[4] & 3),
				EAX: le.Uint32(raw[4:]), EBX: le.Uint32(raw[8:]), ECX: ^le.Uint32(raw[4:]), EDX: le.Uint32(raw[0:])})
			raw = raw[12:]
		}
		opts := CPUIDOptions{VCPU: int(vcpu), VCPUs: int(n)}
		out := FilterCPUID(in, opts)
		if Fingerprint(out) != Fingerprint(FilterCPUID(in, opts)) {
			t.Fatal("not deterministic")
		}
		if err := Compatible(out, out); err != nil {
			t.Fatalf("table incompatible with itself: %v", err)
		}
	})
}
