package mmio_test

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	"github.com/kvmkit/kvmkit/virtio/rng"
)

// Example puts a virtio-rng device on an MMIO bus and prints the kernel
// command-line option that makes Linux find it.
func Example() {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	if err != nil {
		panic(err)
	}
	defer mem.Close()

	const base, irqLine = 0xd0000000, 5
	bus := kvm.NewBus()
	dev := mmio.New(rng.New(rng.Options{}), mem, kvm.NoIRQ{}, mmio.Options{})
	if err := bus.Register(base, mmio.Size, dev); err != nil {
		panic(err)
	}
	fmt.Println(mmio.CmdlineArg(base, mmio.Size, irqLine))

	var b [4]byte
	bus.Read(base+mmio.RegMagicValue, b[:])
	fmt.Printf("magic %#x\n", binary.LittleEndian.Uint32(b[:]))
	bus.Read(base+mmio.RegDeviceID, b[:])
	fmt.Println("device id", binary.LittleEndian.Uint32(b[:]))
	// Output:
	// virtio_mmio.device=512@0xd0000000:5
	// magic 0x74726976
	// device id 4
}
