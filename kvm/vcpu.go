package kvm

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VCPU is a virtual CPU: its fd and its mmap'd kvm_run page.
type VCPU struct {
	fd  int
	id  int
	vm  *VM
	run []byte

	// tid is the OS thread running KVM_RUN, or 0; used by Kick.
	tid atomic.Int32
}

// ID returns the vCPU id given to CreateVCPU (its APIC id).
func (c *VCPU) ID() int { return c.id }

// FD returns the vCPU file descriptor.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps kvm_run and closes the vCPU.
func (c *VCPU) Close() error {
	if c.run != nil {
		unix.Munmap(c.run)
		c.run = nil
	}
	return closeFD(&c.fd)
}

// RunData returns the kvm_run page. It aliases kernel-shared memory.
func (c *VCPU) RunData() []byte { return c.run }

// ExitReason returns kvm_run.exit_reason of the last KVM_RUN.
func (c *VCPU) ExitReason() ExitReason {
	return ExitReason(binary.LittleEndian.Uint32(c.run[runExitReason:]))
}

// SetImmediateExit sets kvm_run.immediate_exit: KVM_RUN returns EINTR
// at once instead of entering the guest while it is set.
func (c *VCPU) SetImmediateExit(on bool) {
	var v uint8
	if on {
		v = 1
	}
	// The kernel reads immediate_exit on entry to KVM_RUN; the store is
	// ordered before the signal that follows it by the tgkill syscall.
	c.run[runImmediateExit] = v
}

// Run issues KVM_RUN once. It returns nil on a normal exit (inspect
// ExitReason); an interruption by a signal or immediate_exit returns an
// IoctlError wrapping unix.EINTR, which callers must treat as an answer
// (a kick), not retry blindly.
func (c *VCPU) Run() error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), kvmRun, 0)
	if errno != 0 {
		return &IoctlError{Op: "KVM_RUN", Err: errno}
	}
	return nil
}

// Regs issues KVM_GET_REGS.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	_, err := ioctlRetry(c.fd, kvmGetRegs, unsafe.Pointer(&r), "KVM_GET_REGS")
	return r, err
}

// SetRegs issues KVM_SET_REGS.
func (c *VCPU) SetRegs(r Regs) error {
	_, err := ioctlRetry(c.fd, kvmSetRegs, unsafe.Pointer(&r), "KVM_SET_REGS")
	return err
}

// Sregs issues KVM_GET_SREGS.
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	_, err := ioctlRetry(c.fd, kvmGetSregs, unsafe.Pointer(&s), "KVM_GET_SREGS")
	return s, err
}

// SetSregs issues KVM_SET_SREGS.
func (c *VCPU) SetSregs(s Sregs) error {
	_, err := ioctlRetry(c.fd, kvmSetSregs, unsafe.Pointer(&s), "KVM_SET_SREGS")
	return err
}

// FPU issues KVM_GET_FPU.
func (c *VCPU) FPU() (FPU, error) {
	var f FPU
	_, err := ioctlRetry(c.fd, kvmGetFPU, unsafe.Pointer(&f), "KVM_GET_FPU")
	return f, err
}

// SetFPU issues KVM_SET_FPU.
func (c *VCPU) SetFPU(f FPU) error {
	_, err := ioctlRetry(c.fd, kvmSetFPU, unsafe.Pointer(&f), "KVM_SET_FPU")
	return err
}

// XSave issues KVM_GET_XSAVE, or KVM_GET_XSAVE2 when the host's XSAVE
// area is larger than 4 KiB.
func (c *VCPU) XSave() (XSave, error) {
	var x XSave
	size, _ := c.vm.CheckExtension(CapXSave2)
	if size <= 4096 {
		_, err := ioctlRetry(c.fd, kvmGetXSave, unsafe.Pointer(&x.Region), "KVM_GET_XSAVE")
		return x, err
	}
	buf := make([]byte, size)
	req := ioc(2, 0xcf, 4096)
	if _, err := ioctlRetry(c.fd, req, unsafe.Pointer(&buf[0]), "KVM_GET_XSAVE2"); err != nil {
		return x, err
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&x.Region[0])), 4096), buf[:4096])
	x.Extra = buf[4096:]
	return x, nil
}

// SetXSave issues KVM_SET_XSAVE (with the extra area when present).
func (c *VCPU) SetXSave(x XSave) error {
	if len(x.Extra) == 0 {
		_, err := ioctlRetry(c.fd, kvmSetXSave, unsafe.Pointer(&x.Region), "KVM_SET_XSAVE")
		return err
	}
	buf := make([]byte, 4096+len(x.Extra))
	copy(buf, unsafe.Slice((*byte)(unsafe.Pointer(&x.Region[0])), 4096))
	copy(buf[4096:], x.Extra)
	_, err := ioctlRetry(c.fd, kvmSetXSave, unsafe.Pointer(&buf[0]), "KVM_SET_XSAVE")
	return err
}

// XCRs issues KVM_GET_XCRS.
func (c *VCPU) XCRs() (XCRs, error) {
	var x XCRs
	_, err := ioctlRetry(c.fd, kvmGetXCRs, unsafe.Pointer(&x), "KVM_GET_XCRS")
	return x, err
}

// SetXCRs issues KVM_SET_XCRS.
func (c *VCPU) SetXCRs(x XCRs) error {
	_, err := ioctlRetry(c.fd, kvmSetXCRs, unsafe.Pointer(&x), "KVM_SET_XCRS")
	return err
}

// maxMSRs bounds one GetMSRs/SetMSRs call.
const maxMSRs = 1024

type msrsBuf struct {
	N       uint32
	_       uint32
	Entries [maxMSRs]MSREntry
}

// GetMSRs issues KVM_GET_MSRS for the given indices. It returns the entries
// KVM could read, in order; KVM stops at the first MSR it cannot read.
func (c *VCPU) GetMSRs(indices []uint32) ([]MSREntry, error) {
	if len(indices) > maxMSRs {
		return nil, fmt.Errorf("KVM_GET_MSRS: %d MSRs, at most %d", len(indices), maxMSRs)
	}
	b := new(msrsBuf)
	b.N = uint32(len(indices))
	for i, idx := range indices {
		b.Entries[i].Index = idx
	}
	r, err := ioctlRetry(c.fd, kvmGetMSRs, unsafe.Pointer(b), "KVM_GET_MSRS")
	if err != nil {
		return nil, err
	}
	n := min(int(r), len(indices))
	out := make([]MSREntry, n)
	copy(out, b.Entries[:n])
	return out, nil
}

// SetMSRs issues KVM_SET_MSRS. It fails, naming the MSR, unless every
// entry was written.
func (c *VCPU) SetMSRs(entries []MSREntry) error {
	if len(entries) > maxMSRs {
		return fmt.Errorf("KVM_SET_MSRS: %d MSRs, at most %d", len(entries), maxMSRs)
	}
	b := new(msrsBuf)
	b.N = uint32(len(entries))
	copy(b.Entries[:], entries)
	r, err := ioctlRetry(c.fd, kvmSetMSRs, unsafe.Pointer(b), "KVM_SET_MSRS")
	if err != nil {
		return err
	}
	if int(r) != len(entries) {
		return fmt.Errorf("KVM_SET_MSRS: set %d of %d, MSR %#x refused", r, len(entries), entries[r].Index)
	}
	return nil
}

// SetMSRsBestEffort writes entries with KVM_SET_MSRS, skipping any MSR
// KVM refuses (some paravirtual MSRs read back values KVM will not take
// from user space in every state) and returning the skipped indices. An
// ioctl failure is still an error.
func (c *VCPU) SetMSRsBestEffort(entries []MSREntry) (skipped []uint32, err error) {
	for len(entries) > 0 {
		if len(entries) > maxMSRs {
			return skipped, fmt.Errorf("KVM_SET_MSRS: %d MSRs, at most %d", len(entries), maxMSRs)
		}
		b := new(msrsBuf)
		b.N = uint32(len(entries))
		copy(b.Entries[:], entries)
		r, err := ioctlRetry(c.fd, kvmSetMSRs, unsafe.Pointer(b), "KVM_SET_MSRS")
		if err != nil {
			return skipped, err
		}
		if int(r) >= len(entries) {
			return skipped, nil
		}
		skipped = append(skipped, entries[r].Index)
		entries = entries[r+1:]
	}
	return skipped, nil
}

// LAPIC issues KVM_GET_LAPIC.
func (c *VCPU) LAPIC() (LAPICState, error) {
	var l LAPICState
	_, err := ioctlRetry(c.fd, kvmGetLAPIC, unsafe.Pointer(&l), "KVM_GET_LAPIC")
	return l, err
}

// SetLAPIC issues KVM_SET_LAPIC.
func (c *VCPU) SetLAPIC(l LAPICState) error {
	_, err := ioctlRetry(c.fd, kvmSetLAPIC, unsafe.Pointer(&l), "KVM_SET_LAPIC")
	return err
}

// VCPUEvents issues KVM_GET_VCPU_EVENTS.
func (c *VCPU) VCPUEvents() (VCPUEvents, error) {
	var e VCPUEvents
	_, err := ioctlRetry(c.fd, kvmGetVCPUEvents, unsafe.Pointer(&e), "KVM_GET_VCPU_EVENTS")
	return e, err
}

// SetVCPUEvents issues KVM_SET_VCPU_EVENTS.
func (c *VCPU) SetVCPUEvents(e VCPUEvents) error {
	_, err := ioctlRetry(c.fd, kvmSetVCPUEvents, unsafe.Pointer(&e), "KVM_SET_VCPU_EVENTS")
	return err
}

// MPState issues KVM_GET_MP_STATE.
func (c *VCPU) MPState() (uint32, error) {
	var s uint32
	_, err := ioctlRetry(c.fd, kvmGetMPState, unsafe.Pointer(&s), "KVM_GET_MP_STATE")
	return s, err
}

// SetMPState issues KVM_SET_MP_STATE.
func (c *VCPU) SetMPState(s uint32) error {
	_, err := ioctlRetry(c.fd, kvmSetMPState, unsafe.Pointer(&s), "KVM_SET_MP_STATE")
	return err
}

// DebugRegs issues KVM_GET_DEBUGREGS.
func (c *VCPU) DebugRegs() (DebugRegs, error) {
	var d DebugRegs
	_, err := ioctlRetry(c.fd, kvmGetDebugRegs, unsafe.Pointer(&d), "KVM_GET_DEBUGREGS")
	return d, err
}

// SetDebugRegs issues KVM_SET_DEBUGREGS.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	_, err := ioctlRetry(c.fd, kvmSetDebugRegs, unsafe.Pointer(&d), "KVM_SET_DEBUGREGS")
	return err
}

// SetCPUID issues KVM_SET_CPUID2.
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	if len(entries) > maxCPUIDEntries {
		return fmt.Errorf("KVM_SET_CPUID2: %d entries, at most %d", len(entries), maxCPUIDEntries)
	}
	type cpuid2 struct {
		Nent    uint32
		_       uint32
		Entries [maxCPUIDEntries]CPUIDEntry
	}
	b := new(cpuid2)
	b.Nent = uint32(len(entries))
	copy(b.Entries[:], entries)
	_, err := ioctlRetry(c.fd, kvmSetCPUID2, unsafe.Pointer(b), "KVM_SET_CPUID2")
	return err
}

// CPUID issues KVM_GET_CPUID2: the CPUID the vCPU was given.
func (c *VCPU) CPUID() ([]CPUIDEntry, error) {
	return getCPUID(c.fd, kvmGetCPUID2, "KVM_GET_CPUID2")
}

// TSCKHz issues KVM_GET_TSC_KHZ.
func (c *VCPU) TSCKHz() (uint32, error) {
	r, err := ioctlValRetry(c.fd, kvmGetTSCKHz, 0, "KVM_GET_TSC_KHZ")
	return uint32(r), err
}

// SetTSCKHz issues KVM_SET_TSC_KHZ.
func (c *VCPU) SetTSCKHz(khz uint32) error {
	_, err := ioctlValRetry(c.fd, kvmSetTSCKHz, uintptr(khz), "KVM_SET_TSC_KHZ")
	return err
}

// KVMClockCtrl issues KVM_KVMCLOCK_CTRL: tells the guest it was paused, so
// its soft-lockup watchdog does not fire after a long pause.
func (c *VCPU) KVMClockCtrl() error {
	_, err := ioctlValRetry(c.fd, kvmKVMClockCtrl, 0, "KVM_KVMCLOCK_CTRL")
	return err
}

// NMI issues KVM_NMI.
func (c *VCPU) NMI() error {
	_, err := ioctlValRetry(c.fd, kvmNMI, 0, "KVM_NMI")
	return err
}

// Kick makes a running or about-to-run KVM_RUN of this vCPU return EINTR:
// it sets immediate_exit and signals the vCPU's thread. The run loop must
// clear immediate_exit after it has handled the kick.
func (c *VCPU) Kick() {
	c.SetImmediateExit(true)
	if tid := c.tid.Load(); tid != 0 {
		// SIGURG: the Go runtime already handles it (preemption) and
		// ignores spurious ones; it interrupts KVM_RUN with EINTR.
		_ = unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
	}
}

// BindThread records the calling OS thread as the one running this vCPU,
// for Kick. Call it after runtime.LockOSThread; UnbindThread on the way out.
func (c *VCPU) BindThread() { c.tid.Store(int32(unix.Gettid())) }

// UnbindThread forgets the vCPU's thread.
func (c *VCPU) UnbindThread() { c.tid.Store(0) }
