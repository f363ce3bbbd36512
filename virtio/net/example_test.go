package net_test

import (
	"context"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	vnet "github.com/kvmkit/kvmkit/virtio/net"
)

// loopback returns every frame the guest sends back to it.
type loopback struct{ c chan []byte }

func (l loopback) WriteFrame(f []byte) error {
	l.c <- append([]byte(nil), f...)
	return nil
}

func (l loopback) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	select {
	case f := <-l.c:
		return copy(buf, f), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

func (l loopback) Close() error { return nil }

// Example builds a virtio-net device on any Backend (for example one from
// virtio/netback) and, after a migration, asks the guest to announce itself.
func Example() {
	mem, _ := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	defer mem.Close()
	nic, err := vnet.New(loopback{make(chan []byte, 16)}, vnet.Options{
		MAC:                []byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56},
		MergeableRxBuffers: true,
	})
	if err != nil {
		panic(err)
	}
	defer nic.Close()
	dev := mmio.New(nic, mem, kvm.NoIRQ{}, mmio.Options{})
	_ = dev // register it on the MMIO bus
	mac := nic.MAC()
	fmt.Printf("%x\n", mac[:])
	// Before the guest driver runs there is nobody to announce to.
	fmt.Println(nic.Announce())
	// Output:
	// 525400123456
	// false
}
