// Package guests embeds small assembly test guests for kvmkit's bare-metal ABI.
//
// Each guest is a flat binary assembled from asm/NAME.asm by build.sh
// (run it with `go generate ./kvm/guests`; the output is byte-identical
// to the checked-in NAME.bin files). A VMM runs a guest by loading the image
// at Mode.LoadAddr and entering it as the ABI describes:
//
// Long mode (ModeLong): the image is loaded at guest-physical 0x100000 and
// entered at its first byte in 64-bit mode; paging identity-maps the first
// 4 GiB with 2 MiB pages; CS is a flat 64-bit code segment and DS, ES, SS
// are flat data segments; interrupts are off and there is no IDT; CR0.EM is
// clear and CR4.OSFXSR set (SSE usable); RSP = StackTop(index),
// RDI = vCPU index, RSI = number of vCPUs, RDX = guest RAM size in bytes.
// Every vCPU starts at the entry.
//
// Real mode (ModeReal): the image is loaded at 0x7C00, CS:IP = 0000:7C00,
// SP = 0x7C00, DS = ES = SS = 0. Real-mode guests use port I/O only.
//
// Unless its description says otherwise (dirty, smp, idle), a guest does
// its work on vCPU 0 only and parks the other vCPUs (hlt with interrupts
// off, in a loop). All guests write COM1 (a 16550 at port 0x3F8, polling LSR bit 5 before
// each byte) and stop the VM by writing their exit code to ExitPort. Guest
// parameters come from the parameter block at ParamBlockAddr (see Params).
package guests

//go:generate sh build.sh

import (
	"embed"
	"errors"
	"fmt"
	"sort"
)

// images holds the checked-in flat binaries. An embed.FS is read-only.
//
//go:embed *.bin
var images embed.FS

// Mode is the CPU mode a guest image expects at its entry.
type Mode int

const (
	// ModeLong is 64-bit long mode; images load and start at LongLoadAddr.
	ModeLong Mode = iota
	// ModeReal is 16-bit real mode; images load and start at RealLoadAddr.
	ModeReal
)

// String returns "long" or "real".
func (m Mode) String() string {
	switch m {
	case ModeLong:
		return "long"
	case ModeReal:
		return "real"
	default:
		return fmt.Sprintf("Mode(%d)", int(m))
	}
}

// LoadAddr returns the guest-physical address where an image of this mode
// is loaded and entered (its first byte is the entry point).
func (m Mode) LoadAddr() uint64 {
	if m == ModeReal {
		return RealLoadAddr
	}
	return LongLoadAddr
}

// MaxSize returns the largest image of this mode that fits its load area:
// a real-mode image must end below LongStackTop (0x80000), a long-mode
// image must be under 1 MiB.
func (m Mode) MaxSize() int {
	if m == ModeReal {
		return int(LongStackTop - RealLoadAddr)
	}
	return 1 << 20
}

// Names of the embedded guests, for Get.
const (
	Hello64   = "hello64"
	Hello16   = "hello16"
	Exit42    = "exit42"
	Exit42x16 = "exit42_16"
	PIOLoop   = "pioloop"
	PIOLoop16 = "pioloop16"
	MMIOLoop  = "mmioloop"
	Compute   = "compute"
	Dirty     = "dirty"
	Triple    = "triple"
	Triple16  = "triple16"
	SMP       = "smp"
	Idle      = "idle"
	Echo      = "echo"
)

// Info describes one embedded guest.
type Info struct {
	// Name is the guest's name, as passed to Get (also its file name
	// without ".bin").
	Name string
	// Mode is the CPU mode the guest expects at its entry.
	Mode Mode
	// Description says in one line what the guest does.
	Description string
}

// catalog returns the guest table; a fresh slice on every call.
func catalog() []Info {
	return []Info{
		{Compute, ModeLong, "N iterations (0x6000, 0 = forever) of a GPR+CF+SSE+stack state machine, one 32-bit value per iteration to port 0xE2 (see ComputeModel), then exit 0"},
		{Dirty, ModeLong, "self-checking dirtier: each pass checks then bumps the first and last qword of every 4 KiB page from 16 MiB (size 0x6008, 0 = 64 MiB, vCPUs split it), pass number to port 0xE1, exit 0 after 0x6010 passes, exit 1 with \"dirty: LOST WRITE ...\" on COM1 on a mismatch"},
		{Echo, ModeLong, "echoes every byte read from COM1 back to COM1; exits 0 after echoing 'q'"},
		{Exit42, ModeLong, "exits with 42 without printing"},
		{Exit42x16, ModeReal, "exits with 42 without printing"},
		{Hello16, ModeReal, "prints \"Hello from a kvmkit real-mode guest!\" on COM1, exits 0"},
		{Hello64, ModeLong, "prints \"Hello from a kvmkit long-mode guest!\" on COM1, exits 0"},
		{Idle, ModeLong, "prints \"idle\" on COM1, then every vCPU halts forever"},
		{MMIOLoop, ModeLong, "N 4-byte writes to MMIO address 0xD0000000 (N at 0x6000, 0 = forever), then exit 0"},
		{PIOLoop, ModeLong, "N byte writes to port 0xE0 (N at 0x6000, 0 = forever), then exit 0"},
		{PIOLoop16, ModeReal, "N byte writes to port 0xE0 (N at 0x6000, 0 = forever), then exit 0"},
		{SMP, ModeLong, "every vCPU bumps the dword at 0x7000 and writes its index to port 0xE1; vCPU 0 waits for all, prints \"smp: N vCPUs up\", exits 0 (exit 3 if they never all arrive)"},
		{Triple, ModeLong, "loads an IDT with limit 0 and executes ud2: triple fault (shutdown exit)"},
		{Triple16, ModeReal, "loads an IDT with limit 0 and executes ud2: triple fault (shutdown exit)"},
	}
}

// All returns every embedded guest, sorted by name. The slice is the
// caller's to keep.
func All() []Info {
	list := catalog()
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	return list
}

// ErrUnknownGuest is wrapped by the error Get returns for a name that is
// not an embedded guest.
var ErrUnknownGuest = errors.New("unknown guest")

// Lookup returns the Info of the named guest.
func Lookup(name string) (Info, error) {
	for _, g := range catalog() {
		if g.Name == name {
			return g, nil
		}
	}
	return Info{}, fmt.Errorf("guests: %q: %w", name, ErrUnknownGuest)
}

// Get returns a fresh copy of the named guest's flat image and the mode it
// expects. The error wraps ErrUnknownGuest when no guest has that name.
func Get(name string) ([]byte, Mode, error) {
	info, err := Lookup(name)
	if err != nil {
		return nil, 0, err
	}
	img, err := images.ReadFile(name + ".bin")
	if err != nil {
		// Every catalog entry has a binary (TestAllImagesPresent).
		return nil, 0, fmt.Errorf("guests: %q: image missing: %w", name, err)
	}
	return img, info.Mode, nil
}
