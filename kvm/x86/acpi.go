package x86

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// ACPIAddr is where kvmkit puts the ACPI tables: the BIOS area Linux scans
// for the RSDP (0xE0000-0xFFFFF), reserved in the boot loaders' e820 map.
const ACPIAddr = 0xE0000

// ACPI table layout constants.
const (
	rsdpSize       = 36
	sdtHeaderSize  = 36
	fadtSize       = 276 // ACPI 6.x FADT
	fadtRevision   = 6
	fadtHWReduced  = 1 << 20
	fadtWBINVD     = 1 << 0
	facsSize       = 64
	pm1EvtLen      = 4
	pm1CntLen      = 2
	gasSystemIO    = 1
	gasAccessByte  = 1
	fadtPwrButton  = 1 << 4 // no fixed-feature power button
	fadtSlpButton  = 1 << 5 // no fixed-feature sleep button
	bootArch8042   = 1 << 1
	bootArchNoVGA  = 1 << 2
	madtPCATCompat = 1 << 0
	acpiOEMID      = "KVMKIT"
	acpiOEMTableID = "KVMKITVM"
)

// ACPIOptions configure WriteACPI.
type ACPIOptions struct {
	// IdentityIRQ0 omits the IRQ0 -> GSI 2 interrupt source override, for a
	// VMM that keeps KVM's default routing (see MPOptions).
	IdentityIRQ0 bool
	// I8042 declares an 8042 keyboard controller in the FADT boot
	// architecture flags (Linux does not probe for one otherwise).
	I8042 bool
	// PMPort, when not 0, describes a PC-compatible platform instead of a
	// hardware-reduced one: the FADT points at a PM1a event block (4
	// bytes) at PMPort and a PM1a control block (2 bytes) at PMPort+4
	// (devices.ACPIPM models both), names SCI as the SCI's GSI, and comes
	// with a FACS; the DSDT gets an \_S5 object (sleep type SleepTypeS5),
	// so that the guest can power off by writing PM1a_CNT. Linux keeps the
	// legacy PIC and the identity-mapped ISA IRQs in this mode, which
	// devices given on the kernel command line (virtio-mmio) rely on.
	PMPort uint16
	// SCI is the GSI of the ACPI system control interrupt (with PMPort).
	// The platform never raises it; choose a line no device uses.
	SCI uint16
}

// SleepTypeS5 is the SLP_TYP value of the \_S5 (soft-off) object in the
// DSDT WriteACPI writes with ACPIOptions.PMPort.
const SleepTypeS5 = 5

// ACPITables reports where WriteACPI put each table.
type ACPITables struct {
	RSDP, XSDT, FADT, DSDT, MADT uint64
	// FACS is 0 for a hardware-reduced platform (no ACPIOptions.PMPort).
	FACS uint64
	Size uint64 // bytes from the RSDP to the end of the last table
}

func align16(n uint64) uint64 { return (n + 15) &^ 15 }

// sdt builds a system description table: header plus body, with the
// checksum computed.
func sdt(sig string, rev byte, body []byte) []byte {
	le := binary.LittleEndian
	t := make([]byte, 0, sdtHeaderSize+len(body))
	t = append(t, sig...)
	t = le.AppendUint32(t, uint32(sdtHeaderSize+len(body)))
	t = append(t, rev, 0)
	t = append(t, acpiOEMID...)
	t = append(t, acpiOEMTableID...)
	t = le.AppendUint32(t, 1) // OEM revision
	t = append(t, "KVMK"...)  // creator ID
	t = le.AppendUint32(t, 1) // creator revision
	t = append(t, body...)
	t[9] = checksum(t)
	return t
}

// WriteACPI writes minimal ACPI tables at addr (16-byte aligned): RSDP
// (revision 2), XSDT, FADT (revision 6), a DSDT, and a MADT with one
// enabled local APIC per vCPU (IDs 0..ncpus-1), the IOAPIC (ID ncpus at
// 0xFEC00000, GSI base 0), the ISA IRQ0 -> GSI 2 override and a local APIC
// NMI on LINT1. Without opts.PMPort the platform is hardware-reduced
// (HW_REDUCED_ACPI, an empty DSDT); with it, it is PC-compatible with PM1a
// registers, a FACS and \_S5 (see ACPIOptions). The RSDP address
// (ACPITables.RSDP == addr) goes to boot.LinuxOptions.RSDP; Linux also
// finds it by scanning when addr is in 0xE0000-0xFFFFF.
func WriteACPI(mem kvm.GuestMemory, addr uint64, ncpus int, opts ACPIOptions) (ACPITables, error) {
	if ncpus < 1 || ncpus > MaxMPCPUs {
		return ACPITables{}, fmt.Errorf("ACPI MADT for %d CPUs (limit 1..%d): %w", ncpus, MaxMPCPUs, ErrTooManyCPUs)
	}
	if addr%16 != 0 || addr >= 1<<32 {
		return ACPITables{}, fmt.Errorf("ACPI tables address %#x: must be 16-byte aligned and below 4 GiB", addr)
	}
	le := binary.LittleEndian
	pc := opts.PMPort != 0
	var dsdtBody []byte
	if pc {
		dsdtBody = []byte(s5AML)
	}
	dsdt := sdt("DSDT", 2, dsdtBody)

	var at ACPITables
	at.RSDP = addr
	at.XSDT = align16(addr + rsdpSize)
	at.FADT = align16(at.XSDT + sdtHeaderSize + 16)
	next := at.FADT + fadtSize
	if pc {
		at.FACS = (next + 63) &^ 63 // the FACS must be 64-byte aligned
		next = at.FACS + facsSize
	}
	at.DSDT = align16(next)
	at.MADT = align16(at.DSDT + uint64(len(dsdt)))

	fadt := make([]byte, fadtSize-sdtHeaderSize)
	body := func(off int) []byte { return fadt[off-sdtHeaderSize:] }
	le.PutUint32(body(40), uint32(at.DSDT))
	arch := uint16(bootArchNoVGA)
	if opts.I8042 {
		arch |= bootArch8042
	}
	le.PutUint16(body(109), arch)
	flags := uint32(fadtPwrButton | fadtSlpButton)
	if pc {
		flags |= fadtWBINVD
		// FIRMWARE_CTRL only: the specification wants X_FIRMWARE_CTRL 0
		// when it is set (Linux would install the FACS twice).
		le.PutUint32(body(36), uint32(at.FACS))
		le.PutUint16(body(46), opts.SCI)
		le.PutUint32(body(56), uint32(opts.PMPort))   // PM1a_EVT_BLK
		le.PutUint32(body(64), uint32(opts.PMPort)+4) // PM1a_CNT_BLK
		body(88)[0] = pm1EvtLen
		body(89)[0] = pm1CntLen
		le.PutUint16(body(96), 101)  // P_LVL2_LAT > 100: no C2 state
		le.PutUint16(body(98), 1001) // P_LVL3_LAT > 1000: no C3 state
		putGAS(body(148), uint64(opts.PMPort), pm1EvtLen*8)
		putGAS(body(172), uint64(opts.PMPort)+4, pm1CntLen*8)
	} else {
		flags |= fadtHWReduced
	}
	le.PutUint32(body(112), flags)
	body(131)[0] = 0 // FADT minor version
	le.PutUint64(body(140), at.DSDT)
	copy(body(268), "KVMKIT\x00\x00") // hypervisor vendor identity
	fadtT := sdt("FACP", fadtRevision, fadt)

	var facs []byte
	if pc {
		facs = make([]byte, facsSize)
		copy(facs, "FACS")
		le.PutUint32(facs[4:], facsSize)
		facs[32] = 2 // version
	}

	var madt []byte
	madt = le.AppendUint32(madt, LAPICAddr)
	madt = le.AppendUint32(madt, madtPCATCompat)
	for i := range ncpus {
		madt = append(madt, 0, 8, byte(i), byte(i)) // processor local APIC: UID, APIC ID
		madt = le.AppendUint32(madt, 1)             // enabled
	}
	madt = append(madt, 1, 12, byte(ncpus), 0) // IOAPIC
	madt = le.AppendUint32(madt, IOAPICAddr)
	madt = le.AppendUint32(madt, 0) // GSI base
	if !opts.IdentityIRQ0 {
		madt = append(madt, 2, 10, 0, 0) // interrupt source override: ISA IRQ0
		madt = le.AppendUint32(madt, 2)  // -> GSI 2
		madt = le.AppendUint16(madt, 0)  // conforms to the bus
	}
	madt = append(madt, 4, 6, 0xFF, 0, 0, 1) // local APIC NMI: all processors, flags 0, LINT1
	madtT := sdt("APIC", 5, madt)

	var x []byte
	x = le.AppendUint64(x, at.FADT)
	x = le.AppendUint64(x, at.MADT)
	xsdt := sdt("XSDT", 1, x)

	rsdp := make([]byte, 0, rsdpSize)
	rsdp = append(rsdp, "RSD PTR "...)
	rsdp = append(rsdp, 0)
	rsdp = append(rsdp, acpiOEMID...)
	rsdp = append(rsdp, 2)          // revision: ACPI 2.0+
	rsdp = le.AppendUint32(rsdp, 0) // no RSDT
	rsdp = le.AppendUint32(rsdp, rsdpSize)
	rsdp = le.AppendUint64(rsdp, at.XSDT)
	rsdp = append(rsdp, 0, 0, 0, 0) // extended checksum, reserved
	rsdp[8] = checksum(rsdp[:20])
	rsdp[32] = checksum(rsdp)

	for _, w := range []struct {
		gpa  uint64
		b    []byte
		name string
	}{{at.RSDP, rsdp, "RSDP"}, {at.XSDT, xsdt, "XSDT"}, {at.FADT, fadtT, "FADT"}, {at.FACS, facs, "FACS"}, {at.DSDT, dsdt, "DSDT"}, {at.MADT, madtT, "MADT"}} {
		if len(w.b) == 0 {
			continue
		}
		if _, err := mem.WriteAt(w.b, int64(w.gpa)); err != nil {
			return ACPITables{}, fmt.Errorf("writing ACPI %s at %#x: %w", w.name, w.gpa, err)
		}
	}
	at.Size = at.MADT + uint64(len(madtT)) - addr
	return at, nil
}

// putGAS encodes a Generic Address Structure for a port-I/O register of
// bits bits with byte access.
func putGAS(b []byte, port uint64, bits byte) {
	b[0] = gasSystemIO
	b[1] = bits
	b[2] = 0 // bit offset
	b[3] = gasAccessByte
	binary.LittleEndian.PutUint64(b[4:], port)
}

// s5AML is the DSDT body Name (_S5, Package () { SleepTypeS5, 0 }): NameOp,
// "_S5_", PackageOp, PkgLength 5, two elements, BytePrefix SleepTypeS5,
// ZeroOp.
const s5AML = "\x08_S5_\x12\x05\x02\x0A\x05\x00"
