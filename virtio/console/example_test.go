package console_test

import (
	"fmt"
	"os"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/console"
	"github.com/kvmkit/kvmkit/virtio/mmio"
)

// Example wires the guest's hvc0 to the VMM's standard input and output
// (boot the guest with console=hvc0).
func Example() {
	mem, _ := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	defer mem.Close()
	con := console.New(console.Options{Input: os.Stdin, Output: os.Stdout})
	dev := mmio.New(con, mem, kvm.NoIRQ{}, mmio.Options{})
	_ = dev // register it on the MMIO bus
	fmt.Println(con.Type() == virtio.DeviceConsole)
	// Output: true
}
