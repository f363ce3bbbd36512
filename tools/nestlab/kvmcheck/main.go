// Command kvmcheck is the nested lab's self-test: it proves /dev/kvm works by
// running a tiny real-mode guest (mov al,42; out 0xf4,al; hlt) and checking
// that KVM reports a port-I/O exit on port 0xf4 with value 42, then a HLT
// exit. With -exits N it also times N round trips of a guest `out`
// instruction through user space (one KVM_RUN per exit).
//
// It is deliberately self-contained (raw ioctls via golang.org/x/sys/unix)
// so it checks the lab independently of the kvmkit library.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers from <linux/kvm.h> (x86-64).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmGetRegs             = 0x8090AE81
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84

	kvmExitIO  = 2
	kvmExitHLT = 5

	kvmAPIVersion = 12
)

type userspaceMemoryRegion struct {
	Slot, Flags            uint32
	GuestPhysAddr, MemSize uint64
	UserspaceAddr          uint64
}

type regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

type segment struct {
	Base                                       uint64
	Limit                                      uint32
	Selector                                   uint16
	Type, Present, DPL, DB, S, L, G, AVL, Unus uint8
	_                                          uint8
}

type dtable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

type sregs struct {
	CS, DS, ES, FS, GS, SS, TR, LDT         segment
	GDT, IDT                                dtable
	CR0, CR2, CR3, CR4, CR8, EFER, APICBase uint64
	InterruptBitmap                         [4]uint64
}

// Guest code, loaded at guest physical 0 and run in real mode.
var code = []byte{
	0xb0, 0x2a, // 0x00: mov al, 42
	0xe6, 0xf4, // 0x02: out 0xf4, al
	0xf4,                                                             // 0x04: hlt
	0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, // pad to 0x10
	0xe6, 0xf5, // 0x10: out 0xf5, al
	0xeb, 0xfc, // 0x12: jmp 0x10
}

const exitLoopRIP = 0x10

func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return 0, e
	}
	return r, nil
}

type vcpu struct {
	fd  int
	run []byte
}

func (v *vcpu) exitReason() uint32 { return *(*uint32)(unsafe.Pointer(&v.run[8])) }

// io returns the port-I/O exit details: direction, size, port, count, and
// the first data byte.
func (v *vcpu) io() (dir uint8, size uint8, port uint16, count uint32, data byte) {
	dir, size = v.run[32], v.run[33]
	port = *(*uint16)(unsafe.Pointer(&v.run[34]))
	count = *(*uint32)(unsafe.Pointer(&v.run[36]))
	off := *(*uint64)(unsafe.Pointer(&v.run[40]))
	if off < uint64(len(v.run)) {
		data = v.run[off]
	}
	return
}

func setup() (*vcpu, error) {
	kvm, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/kvm: %w", err)
	}
	ver, err := ioctl(kvm, kvmGetAPIVersion, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_API_VERSION: %w", err)
	}
	if ver != kvmAPIVersion {
		return nil, fmt.Errorf("KVM_GET_API_VERSION = %d, want %d", ver, kvmAPIVersion)
	}
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	vm := int(vmfd)
	mem, err := unix.Mmap(-1, 0, 0x1000, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("mmap guest memory: %w", err)
	}
	copy(mem, code)
	region := userspaceMemoryRegion{Slot: 0, GuestPhysAddr: 0, MemSize: 0x1000, UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vm, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return nil, fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	cpufd, err := ioctl(vm, kvmCreateVCPU, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	size, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(int(cpufd), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap kvm_run: %w", err)
	}
	v := &vcpu{fd: int(cpufd), run: run}
	var s sregs
	if _, err := ioctl(v.fd, kvmGetSregs, uintptr(unsafe.Pointer(&s))); err != nil {
		return nil, fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	s.CS.Base, s.CS.Selector = 0, 0
	if _, err := ioctl(v.fd, kvmSetSregs, uintptr(unsafe.Pointer(&s))); err != nil {
		return nil, fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	if err := v.setRIP(0); err != nil {
		return nil, err
	}
	return v, nil
}

func (v *vcpu) setRIP(rip uint64) error {
	r := regs{RIP: rip, RFLAGS: 2}
	if _, err := ioctl(v.fd, kvmSetRegs, uintptr(unsafe.Pointer(&r))); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	return nil
}

func (v *vcpu) runOnce() error {
	for {
		_, err := ioctl(v.fd, kvmRun, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("KVM_RUN: %w", err)
		}
		return nil
	}
}

func check(exits int) error {
	v, err := setup()
	if err != nil {
		return err
	}
	if err := v.runOnce(); err != nil {
		return err
	}
	if r := v.exitReason(); r != kvmExitIO {
		return fmt.Errorf("first exit reason = %d, want KVM_EXIT_IO (%d)", r, kvmExitIO)
	}
	dir, size, port, count, data := v.io()
	if dir != 1 || size != 1 || port != 0xf4 || count != 1 || data != 42 {
		return fmt.Errorf("io exit dir=%d size=%d port=%#x count=%d data=%d, want out 1 byte 42 to 0xf4", dir, size, port, count, data)
	}
	if err := v.runOnce(); err != nil {
		return err
	}
	if r := v.exitReason(); r != kvmExitHLT {
		return fmt.Errorf("second exit reason = %d, want KVM_EXIT_HLT (%d)", r, kvmExitHLT)
	}
	fmt.Println("kvmcheck: PASS api=12 exit=io port=0xf4 value=42 then hlt")
	if exits <= 0 {
		return nil
	}
	if err := v.setRIP(exitLoopRIP); err != nil {
		return err
	}
	start := time.Now()
	for i := 0; i < exits; i++ {
		if err := v.runOnce(); err != nil {
			return err
		}
		if r := v.exitReason(); r != kvmExitIO {
			return fmt.Errorf("exit loop: reason = %d at iteration %d", r, i)
		}
		if _, _, port, _, _ := v.io(); port != 0xf5 {
			return fmt.Errorf("exit loop: port = %#x at iteration %d", port, i)
		}
	}
	d := time.Since(start)
	fmt.Printf("kvmcheck: %d port-I/O exits in %v: %.1f us/exit (round trip to user space)\n", exits, d.Round(time.Millisecond), float64(d.Microseconds())/float64(exits))
	return nil
}

func main() {
	exits := flag.Int("exits", 0, "also time this many guest port writes, each a full exit to user space")
	flag.Parse()
	if err := check(*exits); err != nil {
		fmt.Fprintln(os.Stderr, "kvmcheck: FAIL:", err)
		os.Exit(1)
	}
}
