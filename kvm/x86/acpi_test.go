package x86

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

// readSDT reads and validates an ACPI table header and checksum.
func readSDT(t *testing.T, mem kvm.GuestMemory, gpa uint64, sig string) []byte {
	t.Helper()
	h := make([]byte, 36)
	_, err := mem.ReadAt(h, int64(gpa))
	require.NoError(t, err)
	require.Equal(t, sig, string(h[:4]))
	n := binary.LittleEndian.Uint32(h[4:])
	require.GreaterOrEqual(t, n, uint32(36))
	require.Less(t, n, uint32(1<<16))
	b := make([]byte, n)
	_, err = mem.ReadAt(b, int64(gpa))
	require.NoError(t, err)
	require.Equal(t, byte(0), sum(b), "%s checksum", sig)
	assert.Equal(t, "KVMKIT", string(b[10:16]))
	return b
}

func TestWriteACPI(t *testing.T) {
	for _, tc := range []struct {
		ncpus    int
		identity bool
		i8042    bool
		pmPort   uint16
	}{{1, false, false, 0}, {4, false, true, 0}, {MaxMPCPUs, true, false, 0}, {2, true, true, 0x600}, {MaxMPCPUs, true, false, 0xB000}} {
		mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
		require.NoError(t, err)
		defer mem.Close()
		at, err := WriteACPI(mem, ACPIAddr, tc.ncpus, ACPIOptions{IdentityIRQ0: tc.identity, I8042: tc.i8042, PMPort: tc.pmPort, SCI: 13})
		require.NoError(t, err)
		assert.Equal(t, uint64(ACPIAddr), at.RSDP)
		assert.Less(t, at.RSDP+at.Size, uint64(0x100000), "inside the BIOS area")

		r := make([]byte, 36)
		_, err = mem.ReadAt(r, ACPIAddr)
		require.NoError(t, err)
		require.Equal(t, "RSD PTR ", string(r[:8]))
		assert.Equal(t, byte(0), sum(r[:20]), "RSDP checksum")
		assert.Equal(t, byte(0), sum(r), "RSDP extended checksum")
		assert.Equal(t, byte(2), r[15], "revision")
		assert.Equal(t, uint32(36), binary.LittleEndian.Uint32(r[20:]))
		xsdtAddr := binary.LittleEndian.Uint64(r[24:])
		assert.Equal(t, at.XSDT, xsdtAddr)

		x := readSDT(t, mem, xsdtAddr, "XSDT")
		require.Len(t, x, 36+16)
		fadtAddr, madtAddr := binary.LittleEndian.Uint64(x[36:]), binary.LittleEndian.Uint64(x[44:])

		f := readSDT(t, mem, fadtAddr, "FACP")
		require.Len(t, f, 276)
		assert.Equal(t, byte(6), f[8], "FADT revision")
		flags := binary.LittleEndian.Uint32(f[112:])
		pc := tc.pmPort != 0
		assert.Equal(t, !pc, flags&(1<<20) != 0, "HW_REDUCED_ACPI")
		arch := binary.LittleEndian.Uint16(f[109:])
		assert.Equal(t, tc.i8042, arch&2 != 0, "8042 flag")
		dsdt := binary.LittleEndian.Uint64(f[140:])
		assert.Equal(t, uint64(binary.LittleEndian.Uint32(f[40:])), dsdt)
		d := readSDT(t, mem, dsdt, "DSDT")
		le := binary.LittleEndian
		if pc {
			assert.Equal(t, []byte{0x08, '_', 'S', '5', '_', 0x12, 0x05, 0x02, 0x0A, SleepTypeS5, 0x00}, d[36:], "Name(_S5, Package(){5, 0})")
			assert.Equal(t, uint16(13), le.Uint16(f[46:]), "SCI_INT")
			assert.Zero(t, le.Uint32(f[48:]), "no SMI_CMD: always in ACPI mode")
			assert.Equal(t, uint32(tc.pmPort), le.Uint32(f[56:]), "PM1a_EVT_BLK")
			assert.Equal(t, uint32(tc.pmPort)+4, le.Uint32(f[64:]), "PM1a_CNT_BLK")
			assert.Equal(t, []byte{4, 2}, f[88:90], "PM1_EVT_LEN, PM1_CNT_LEN")
			assert.Zero(t, le.Uint32(f[76:]), "no PM timer")
			assert.Equal(t, []byte{1, 32, 0, 1}, f[148:152], "X_PM1a_EVT_BLK GAS")
			assert.Equal(t, uint64(tc.pmPort), le.Uint64(f[152:]))
			assert.Equal(t, []byte{1, 16, 0, 1}, f[172:176], "X_PM1a_CNT_BLK GAS")
			assert.Equal(t, uint64(tc.pmPort)+4, le.Uint64(f[176:]))
			facs := uint64(le.Uint32(f[36:]))
			assert.Equal(t, at.FACS, facs)
			assert.Zero(t, le.Uint64(f[132:]), "X_FIRMWARE_CTRL is 0 when FIRMWARE_CTRL is set")
			assert.Zero(t, facs%64, "FACS alignment")
			h := make([]byte, 64)
			_, err = mem.ReadAt(h, int64(facs))
			require.NoError(t, err)
			assert.Equal(t, "FACS", string(h[:4]))
			assert.Equal(t, uint32(64), le.Uint32(h[4:]))
			assert.LessOrEqual(t, facs+64, dsdt, "FACS before the DSDT")
		} else {
			assert.Len(t, d, 36, "empty DSDT")
			assert.Zero(t, at.FACS)
			assert.Zero(t, le.Uint32(f[36:]), "no FACS")
			assert.Zero(t, le.Uint32(f[56:]), "no PM1a_EVT_BLK")
		}

		m := readSDT(t, mem, madtAddr, "APIC")
		assert.Equal(t, uint32(0xFEE00000), binary.LittleEndian.Uint32(m[36:]))
		var lapics []byte
		var ioapicID byte = 0xFE
		overrides, nmis := 0, 0
		for off := 44; off < len(m); {
			typ, l := m[off], int(m[off+1])
			require.Greater(t, l, 1)
			require.LessOrEqual(t, off+l, len(m))
			switch typ {
			case 0:
				require.Equal(t, 8, l)
				assert.Equal(t, uint32(1), binary.LittleEndian.Uint32(m[off+4:]), "enabled")
				lapics = append(lapics, m[off+3])
			case 1:
				require.Equal(t, 12, l)
				ioapicID = m[off+2]
				assert.Equal(t, uint32(0xFEC00000), binary.LittleEndian.Uint32(m[off+4:]))
				assert.Equal(t, uint32(0), binary.LittleEndian.Uint32(m[off+8:]))
			case 2:
				require.Equal(t, 10, l)
				assert.Equal(t, byte(0), m[off+3], "source IRQ0")
				assert.Equal(t, uint32(2), binary.LittleEndian.Uint32(m[off+4:]), "GSI 2")
				overrides++
			case 4:
				require.Equal(t, 6, l)
				assert.Equal(t, byte(1), m[off+5], "LINT1")
				nmis++
			default:
				t.Fatalf("unexpected MADT entry type %d", typ)
			}
			off += l
		}
		require.Len(t, lapics, tc.ncpus)
		for i, id := range lapics {
			assert.Equal(t, byte(i), id)
		}
		assert.Equal(t, byte(tc.ncpus), ioapicID)
		assert.Equal(t, map[bool]int{true: 0, false: 1}[tc.identity], overrides)
		assert.Equal(t, 1, nmis)
	}
}

func TestWriteACPIErrors(t *testing.T) {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	defer mem.Close()
	_, err = WriteACPI(mem, ACPIAddr, 0, ACPIOptions{})
	assert.ErrorIs(t, err, ErrTooManyCPUs)
	_, err = WriteACPI(mem, ACPIAddr, MaxMPCPUs+1, ACPIOptions{})
	assert.ErrorIs(t, err, ErrTooManyCPUs)
	_, err = WriteACPI(mem, ACPIAddr+8, 1, ACPIOptions{})
	assert.ErrorContains(t, err, "aligned")
	_, err = WriteACPI(mem, 0xFFF00, 4, ACPIOptions{})
	assert.ErrorIs(t, err, kvm.ErrOutOfBounds)
}
