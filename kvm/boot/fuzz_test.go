package boot

import (
	"testing"

	"github.com/kvmkit/kvmkit/kvm"
)

// fuzzRAM is the guest memory size used by the fuzz targets.
const fuzzRAM = 24 * testMiB

func fuzzMem(f *testing.F) *kvm.Memory {
	m, err := kvm.SingleRegion(fuzzRAM, kvm.MemoryOptions{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })
	return m
}

func FuzzBzImage(f *testing.F) {
	o := defaultBz()
	o.initSize = 0x100000
	f.Add(makeBzImage(o), []byte("initrd"), "console=ttyS0")
	o.setupSects = 0
	f.Add(makeBzImage(o), []byte(nil), "")
	f.Add([]byte("HdrS"), []byte(nil), "")
	mem := fuzzMem(f)
	f.Fuzz(func(t *testing.T, image, initrd []byte, cmdline string) {
		e, err := LoadBzImage(mem, image, initrd, cmdline, LinuxOptions{})
		if err == nil && (e.IP != KernelLoadAddr+0x200 || e.RSI != ZeroPageAddr) {
			t.Fatalf("bad entry %+v", e)
		}
	})
}

func FuzzELF(f *testing.F) {
	f.Add(makeELF(defaultELF()), []byte("initrd"))
	o := defaultELF()
	o.pvhEntry, o.noteInShdr = 0x1000040, true
	f.Add(makeELF(o), []byte(nil))
	f.Add([]byte("\x7fELF\x02\x01\x01"), []byte(nil))
	mem := fuzzMem(f)
	f.Fuzz(func(t *testing.T, image, initrd []byte) {
		img, err := ParseELF(image)
		if err != nil {
			return
		}
		if len(img.Segments) == 0 || len(img.Segments) > maxLoads {
			t.Fatalf("%d segments accepted", len(img.Segments))
		}
		for _, s := range img.Segments {
			if s.Offset+s.Filesz > uint64(len(image)) || s.Filesz > s.Memsz {
				t.Fatalf("segment %+v escapes the %d-byte file", s, len(image))
			}
		}
		_, _ = LoadLinux(mem, image, initrd, "console=ttyS0", LinuxOptions{NoPVH: true})
	})
}

func FuzzPVH(f *testing.F) {
	o := defaultELF()
	o.pvhEntry = 0x1000040
	f.Add(makeELF(o), []byte("initrd"))
	o.pvhDescSize = 4
	f.Add(makeELF(o), []byte(nil))
	o.noteInShdr = true
	f.Add(makeELF(o), []byte(nil))
	f.Add(makeELF32(0x200000, []byte{0xF4}, 0x200000), []byte("initrd"))
	mem := fuzzMem(f)
	f.Fuzz(func(t *testing.T, image, initrd []byte) {
		e, err := LoadPVH(mem, image, initrd, "console=hvc0", LinuxOptions{})
		if err == nil && (e.Mode != ProtectedMode || e.RBX != StartInfoAddr || e.IP >= fourGiB) {
			t.Fatalf("bad entry %+v", e)
		}
	})
}

func FuzzFlat(f *testing.F) {
	f.Add([]byte{0xF4}, uint8(0), uint8(1))
	f.Add([]byte{0xF4}, uint8(1), uint8(1))
	mem := fuzzMem(f)
	f.Fuzz(func(t *testing.T, image []byte, mode, vcpus uint8) {
		_, _ = LoadFlat(mem, image, FlatOptions{Mode: FlatMode(mode % 3), VCPUs: int(vcpus)})
	})
}
