package boot

import (
	"os"
	"path/filepath"
	"testing"
)

func BenchmarkLoadFlat(b *testing.B) {
	mem := newMem(b, 8*testMiB)
	image := make([]byte, 64<<10)
	b.SetBytes(int64(len(image)))
	for b.Loop() {
		if _, err := LoadFlat(mem, image, FlatOptions{VCPUs: 4}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoadRealBzImage measures loading the host's distribution kernel
// with a 16 MiB initrd.
func BenchmarkLoadRealBzImage(b *testing.B) {
	paths, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(paths) == 0 {
		b.Skip("no /boot/vmlinuz-* on this machine")
	}
	image, err := os.ReadFile(paths[0])
	if err != nil {
		b.Skip(err)
	}
	mem := newMem(b, 512*testMiB)
	initrd := make([]byte, 16*testMiB)
	b.SetBytes(int64(len(image) + len(initrd)))
	for b.Loop() {
		if _, err := LoadLinux(mem, image, initrd, "console=ttyS0", LinuxOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
