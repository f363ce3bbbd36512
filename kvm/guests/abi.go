package guests

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Addresses and ports of the bare-metal guest ABI.
const (
	// LongLoadAddr is where long-mode images are loaded and entered.
	LongLoadAddr = 0x100000
	// RealLoadAddr is where real-mode images are loaded and entered
	// (CS:IP = 0000:7C00).
	RealLoadAddr = 0x7C00
	// LongStackTop is RSP of vCPU 0 in long mode; see StackTop.
	LongStackTop = 0x80000
	// StackStride is the stack space each further vCPU gets below vCPU 0's.
	StackStride = 0x4000
	// RealStackTop is SP at a real-mode guest's entry.
	RealStackTop = 0x7C00

	// COM1Port is the base port of the 16550 UART the guests print on.
	COM1Port = 0x3F8
	// ExitPort stops the VM: the byte written (outb) is the exit code.
	ExitPort = 0xF4
	// PIOPort receives pioloop's byte writes.
	PIOPort = 0xE0
	// ProgressPort receives 32-bit progress values (dirty: pass number,
	// smp: vCPU index).
	ProgressPort = 0xE1
	// DataPort receives compute's 32-bit values.
	DataPort = 0xE2
	// MMIOAddr receives mmioloop's 4-byte writes; it must have no memory
	// slot, so each write is an MMIO exit.
	MMIOAddr = 0xD0000000

	// ParamBlockAddr is the guest-physical address of the parameter
	// block (see Params); all zero by default.
	ParamBlockAddr = 0x6000
	// ParamBlockSize is the size of the parameter block in bytes.
	ParamBlockSize = 24
	// CounterAddr holds the dword the smp and dirty guests increment with
	// a locked add; it must be zero at start.
	CounterAddr = 0x7000

	// DirtyBase is the first byte of the dirty guest's range.
	DirtyBase = 0x1000000
	// DirtyDefaultSize is the dirty range size used when Params.DirtySize
	// is zero.
	DirtyDefaultSize = 64 << 20
	// PageSize is the granule the dirty guest checks and writes.
	PageSize = 4096
)

// StackTop returns the initial RSP of vCPU index in long mode:
// LongStackTop - index*StackStride.
func StackTop(index int) uint64 {
	return LongStackTop - uint64(index)*StackStride
}

// Params is the parameter block the VMM (or a test) writes at
// ParamBlockAddr before starting a guest. Zero fields keep the guests'
// defaults.
type Params struct {
	// Iterations is N for pioloop, pioloop16, mmioloop and compute;
	// 0 means forever.
	Iterations uint64
	// DirtySize is the size in bytes of the dirty guest's range from
	// DirtyBase; 0 means DirtyDefaultSize. It is clipped to the RAM size.
	DirtySize uint64
	// DirtyPasses is the number of passes of the dirty guest; 0 means
	// forever.
	DirtyPasses uint64
}

// Bytes returns the block's ParamBlockSize-byte little-endian encoding.
func (p Params) Bytes() []byte {
	b := make([]byte, ParamBlockSize)
	binary.LittleEndian.PutUint64(b[0:], p.Iterations)
	binary.LittleEndian.PutUint64(b[8:], p.DirtySize)
	binary.LittleEndian.PutUint64(b[16:], p.DirtyPasses)
	return b
}

// WriteTo stores the block at ParamBlockAddr of guest memory; a
// kvm.GuestMemory satisfies io.WriterAt.
func (p Params) WriteTo(mem io.WriterAt) error {
	if _, err := mem.WriteAt(p.Bytes(), ParamBlockAddr); err != nil {
		return fmt.Errorf("guests: write parameter block at %#x: %w", ParamBlockAddr, err)
	}
	return nil
}
