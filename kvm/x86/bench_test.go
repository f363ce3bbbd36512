package x86

import "testing"

func BenchmarkFilterCPUID(b *testing.B) {
	in := intelSupported()
	for b.Loop() {
		FilterCPUID(in, CPUIDOptions{VCPU: 3, VCPUs: 8, Mask: []Feature{FeatureAVX512F}})
	}
}

func BenchmarkCompatible(b *testing.B) {
	src := FilterCPUID(intelSupported(), CPUIDOptions{VCPUs: 8})
	dst := intelSupported()
	for b.Loop() {
		if err := Compatible(src, dst); err != nil {
			b.Fatal(err)
		}
	}
}
