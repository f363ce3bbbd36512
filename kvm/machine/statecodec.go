package machine

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strconv"
	"unsafe"

	"github.com/kvmkit/kvmkit/kvm"
)

// Limits on counts read from an encoded state: what KVM itself allows,
// with room to spare; a larger count is a corrupt or hostile stream.
const (
	maxStateVCPUs     = 1024
	maxStateCPUID     = 1024
	maxStateMSRs      = 4096
	maxStateXSaveXtra = 1 << 20
	maxStateDevices   = 1024
	maxStateNameLen   = 255
)

// abiStruct lists the fixed-size KVM ABI structures the state holds.
// Their Go layout is the kernel's (package kvm passes them to ioctls as
// they are, with every padding field explicit), so their encoding is
// their memory: little-endian x86-64, the bytes KVM itself reads and
// writes. TestStateStructsHaveNoHiddenPadding checks that the layout has
// no compiler padding, so the bytes are exactly the listed fields.
type abiStruct interface {
	kvm.CPUIDEntry | kvm.Regs | kvm.Sregs | [1024]uint32 | kvm.XCRs | kvm.DebugRegs |
		kvm.LAPICState | kvm.MSREntry | kvm.VCPUEvents | kvm.IRQChipState | kvm.PITState2 | kvm.ClockData
}

// abiBytes views v as its bytes.
func abiBytes[T abiStruct](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}

// appendBinary encodes s as version 2: the KVM ABI structures as their
// bytes (see abiStruct), slices and maps as a uint32 count followed by
// their elements, devices sorted by name so equal states encode to equal
// bytes.
//
//	u32 nVCPUs, then per vCPU:
//	  u32 ID, u32 nCPUID, CPUIDEntry..., u32 MPState, Regs, Sregs,
//	  XSave.Region, u32 len, XSave.Extra, XCRs, DebugRegs, LAPICState,
//	  u32 nMSRs, MSREntry..., VCPUEvents, u32 TSCKHz
//	VMState: u8 HasIRQChip, PICMaster, PICSlave, IOAPIC, u8 HasPIT,
//	  PITState2, ClockData
//	u32 nDevices, then per device (by name): u8 len, name, u32 len, data
func (s *State) appendBinary(b []byte) ([]byte, error) {
	u32 := func(v uint32) { b = binary.LittleEndian.AppendUint32(b, v) }
	u8 := func(v bool) {
		if v {
			b = append(b, 1)
		} else {
			b = append(b, 0)
		}
	}
	if len(s.VCPUs) > maxStateVCPUs {
		return nil, fmt.Errorf("encode machine state: %d vCPUs, at most %d", len(s.VCPUs), maxStateVCPUs)
	}
	for i := range s.VCPUs {
		c := &s.VCPUs[i]
		for _, n := range []struct {
			what     string
			got, max int
		}{{"CPUID entries", len(c.CPUID), maxStateCPUID}, {"MSRs", len(c.MSRs), maxStateMSRs}, {"XSAVE extra bytes", len(c.XSave.Extra), maxStateXSaveXtra}} {
			if n.got > n.max {
				return nil, fmt.Errorf("encode machine state: vCPU %d has %d %s, at most %d", i, n.got, n.what, n.max)
			}
		}
	}
	if len(s.Devices) > maxStateDevices {
		return nil, fmt.Errorf("encode machine state: %d devices, at most %d", len(s.Devices), maxStateDevices)
	}
	u32(uint32(len(s.VCPUs)))
	for i := range s.VCPUs {
		c := &s.VCPUs[i]
		u32(uint32(c.ID))
		u32(uint32(len(c.CPUID)))
		for j := range c.CPUID {
			b = append(b, abiBytes(&c.CPUID[j])...)
		}
		u32(c.MPState)
		b = append(b, abiBytes(&c.Regs)...)
		b = append(b, abiBytes(&c.Sregs)...)
		b = append(b, abiBytes(&c.XSave.Region)...)
		u32(uint32(len(c.XSave.Extra)))
		b = append(b, c.XSave.Extra...)
		b = append(b, abiBytes(&c.XCRs)...)
		b = append(b, abiBytes(&c.DebugRegs)...)
		b = append(b, abiBytes(&c.LAPIC)...)
		u32(uint32(len(c.MSRs)))
		for j := range c.MSRs {
			b = append(b, abiBytes(&c.MSRs[j])...)
		}
		b = append(b, abiBytes(&c.Events)...)
		u32(c.TSCKHz)
	}
	v := &s.VM
	u8(v.HasIRQChip)
	b = append(b, abiBytes(&v.PICMaster)...)
	b = append(b, abiBytes(&v.PICSlave)...)
	b = append(b, abiBytes(&v.IOAPIC)...)
	u8(v.HasPIT)
	b = append(b, abiBytes(&v.PIT)...)
	b = append(b, abiBytes(&v.Clock)...)
	names := make([]string, 0, len(s.Devices))
	for n := range s.Devices {
		if len(n) > maxStateNameLen {
			return nil, fmt.Errorf("encode machine state: device name %q longer than %d bytes", n, maxStateNameLen)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	u32(uint32(len(names)))
	for _, n := range names {
		b = append(b, byte(len(n)))
		b = append(b, n...)
		u32(uint32(len(s.Devices[n])))
		b = append(b, s.Devices[n]...)
	}
	return b, nil
}

// stateReader decodes version 2, remembering the first error.
type stateReader struct {
	b      []byte
	off    int
	err    error
	prefix string // names the part being read ("vCPU 1 "), for errors
}

func (r *stateReader) fail(what string, format string, args ...any) {
	if r.err == nil {
		r.err = &StateError{Reason: fmt.Sprintf("%s%s at offset %d: %s", r.prefix, what, r.off, fmt.Sprintf(format, args...))}
	}
}

// get fills v from the next bytes.
func get[T abiStruct](r *stateReader, what string, v *T) {
	dst := abiBytes(v)
	if src := r.bytes(what, len(dst)); src != nil {
		copy(dst, src)
	}
}

func (r *stateReader) bytes(what string, n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.b)-r.off {
		r.fail(what, "%d bytes, only %d left", n, len(r.b)-r.off)
		return nil
	}
	out := r.b[r.off : r.off+n : r.off+n]
	r.off += n
	return out
}

func (r *stateReader) u32(what string) uint32 {
	p := r.bytes(what, 4)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(p)
}

func (r *stateReader) count(what string, max int) int {
	n := r.u32(what)
	if r.err == nil && n > uint32(max) {
		r.fail(what, "count %d above the limit of %d", n, max)
		return 0
	}
	return int(n)
}

func (r *stateReader) flag(what string) bool {
	p := r.bytes(what, 1)
	if p == nil {
		return false
	}
	if p[0] > 1 {
		r.fail(what, "boolean byte %d", p[0])
	}
	return p[0] == 1
}

// decodeBinary reads a version-2 payload written by appendBinary.
func decodeBinary(payload []byte) (*State, error) {
	r := &stateReader{b: payload}
	s := &State{Devices: map[string][]byte{}}
	n := r.count("vCPU count", maxStateVCPUs)
	for i := 0; i < n && r.err == nil; i++ {
		var c kvm.VCPUState
		r.prefix = "vCPU " + strconv.Itoa(i) + " "
		c.ID = int(r.u32("id"))
		if k := r.count("CPUID count", maxStateCPUID); k > 0 {
			c.CPUID = make([]kvm.CPUIDEntry, k)
			for j := range c.CPUID {
				get(r, "CPUID entry", &c.CPUID[j])
			}
		}
		c.MPState = r.u32("MP state")
		get(r, "registers", &c.Regs)
		get(r, "segment registers", &c.Sregs)
		get(r, "XSAVE area", &c.XSave.Region)
		if k := r.count("XSAVE extra length", maxStateXSaveXtra); k > 0 {
			c.XSave.Extra = append([]byte(nil), r.bytes("XSAVE extra", k)...)
		}
		get(r, "XCRs", &c.XCRs)
		get(r, "debug registers", &c.DebugRegs)
		get(r, "LAPIC", &c.LAPIC)
		if k := r.count("MSR count", maxStateMSRs); k > 0 {
			c.MSRs = make([]kvm.MSREntry, k)
			for j := range c.MSRs {
				get(r, "MSR entry", &c.MSRs[j])
			}
		}
		get(r, "events", &c.Events)
		c.TSCKHz = r.u32("TSC kHz")
		s.VCPUs = append(s.VCPUs, c)
	}
	r.prefix = ""
	v := &s.VM
	v.HasIRQChip = r.flag("VM irqchip flag")
	get(r, "PIC master", &v.PICMaster)
	get(r, "PIC slave", &v.PICSlave)
	get(r, "IOAPIC", &v.IOAPIC)
	v.HasPIT = r.flag("VM PIT flag")
	get(r, "PIT", &v.PIT)
	get(r, "kvmclock", &v.Clock)
	nd := r.count("device count", maxStateDevices)
	for i := 0; i < nd && r.err == nil; i++ {
		ln := r.bytes("device name length", 1)
		if ln == nil {
			break
		}
		name := string(r.bytes("device name", int(ln[0])))
		r.prefix = "device " + name + " "
		size := r.count("state length", maxStateSize)
		data := r.bytes("state", size)
		if r.err != nil {
			break
		}
		if _, dup := s.Devices[name]; dup {
			r.fail("name", "named twice")
			break
		}
		s.Devices[name] = append([]byte{}, data...)
	}
	r.prefix = ""
	if r.err == nil && r.off != len(payload) {
		r.fail("end", "%d bytes left over", len(payload)-r.off)
	}
	if r.err != nil {
		return nil, r.err
	}
	return s, nil
}
