package boot_test

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/boot"
)

func ExampleLoadFlat() {
	mem, err := kvm.SingleRegion(4<<20, kvm.MemoryOptions{})
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	hlt := []byte{0xF4}
	entry, err := boot.LoadFlat(mem, hlt, boot.FlatOptions{VCPUs: 2})
	if err != nil {
		panic(err)
	}
	// The VM builder applies the entry to each vCPU's fresh registers.
	for cpu := range 2 {
		var regs kvm.Regs
		var sregs kvm.Sregs // from KVM_GET_SREGS in a real VM
		entry.Apply(cpu, 2, &regs, &sregs)
		fmt.Printf("vCPU %d: %s mode RIP=%#x RSP=%#x RDI=%d RSI=%d\n", cpu, entry.Mode, regs.RIP, regs.RSP, regs.RDI, regs.RSI)
	}
	// Output:
	// vCPU 0: long mode RIP=0x100000 RSP=0x80000 RDI=0 RSI=2
	// vCPU 1: long mode RIP=0x100000 RSP=0x7c000 RDI=1 RSI=2
}

func ExampleLoadLinux() {
	mem, err := kvm.SingleRegion(64<<20, kvm.MemoryOptions{})
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	_, err = boot.LoadLinux(mem, []byte("not a kernel"), nil, "console=ttyS0", boot.LinuxOptions{})
	fmt.Println(err)
	// Output:
	// kernel: magic: neither a bzImage ("HdrS" at 0x202) nor an ELF file
}
