package blk_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/blk"
	"github.com/kvmkit/kvmkit/virtio/mmio"
)

// Example opens a raw image read-only and wraps it in a virtio-mmio
// transport, as a VMM does for --disk FILE,ro.
func Example() {
	dir, _ := os.MkdirTemp("", "blk-example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.img")
	os.WriteFile(path, make([]byte, 8<<20), 0o600)

	disk, err := blk.Open(path, blk.Options{ReadOnly: true, ID: "root"})
	if err != nil {
		panic(err)
	}
	defer disk.Close()
	mem, _ := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	defer mem.Close()
	dev := mmio.New(disk, mem, kvm.NoIRQ{}, mmio.Options{})
	_ = dev // register it: bus.Register(base, mmio.Size, dev)
	fmt.Println(disk.Capacity(), "sectors, read-only:", disk.Features()&blk.FeatureRO != 0)
	// Output: 16384 sectors, read-only: true
}
