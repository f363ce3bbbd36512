package x86

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func sum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

// mpParsed is what the test's independent MP table reader finds.
type mpParsed struct {
	cpus       []struct{ id, flags byte }
	buses      []string
	ioapicID   byte
	ioapicAddr uint32
	ioInts     map[byte]byte // ISA IRQ -> IOAPIC pin
	localInts  [][2]byte     // (type, LINTIN)
}

func parseMP(t *testing.T, mem kvm.GuestMemory, addr uint64) mpParsed {
	t.Helper()
	f := make([]byte, 16)
	_, err := mem.ReadAt(f, int64(addr))
	require.NoError(t, err)
	require.Equal(t, "_MP_", string(f[:4]))
	require.Equal(t, byte(0), sum(f), "floating pointer checksum")
	require.Equal(t, byte(1), f[8], "length in paragraphs")
	require.Equal(t, byte(4), f[9], "spec revision 1.4")
	require.Equal(t, byte(0), f[11], "configuration table present (no default config)")
	cfg := uint64(binary.LittleEndian.Uint32(f[4:]))

	hdr := make([]byte, 44)
	_, err = mem.ReadAt(hdr, int64(cfg))
	require.NoError(t, err)
	require.Equal(t, "PCMP", string(hdr[:4]))
	length := binary.LittleEndian.Uint16(hdr[4:])
	tbl := make([]byte, length)
	_, err = mem.ReadAt(tbl, int64(cfg))
	require.NoError(t, err)
	require.Equal(t, byte(0), sum(tbl), "configuration table checksum")
	assert.Equal(t, uint32(0xFEE00000), binary.LittleEndian.Uint32(tbl[36:]))
	n := int(binary.LittleEndian.Uint16(tbl[34:]))

	p := mpParsed{ioInts: map[byte]byte{}}
	off := 44
	for range n {
		require.Less(t, off, len(tbl))
		switch tbl[off] {
		case 0:
			p.cpus = append(p.cpus, struct{ id, flags byte }{tbl[off+1], tbl[off+3]})
			off += 20
		case 1:
			p.buses = append(p.buses, string(tbl[off+2:off+8]))
			off += 8
		case 2:
			p.ioapicID = tbl[off+1]
			assert.Equal(t, byte(0x11), tbl[off+2])
			assert.Equal(t, byte(1), tbl[off+3]&1, "IOAPIC enabled")
			p.ioapicAddr = binary.LittleEndian.Uint32(tbl[off+4:])
			off += 8
		case 3:
			assert.Equal(t, byte(0), tbl[off+1], "INT type")
			assert.Equal(t, p.ioapicID, tbl[off+6], "destination IOAPIC")
			_, dup := p.ioInts[tbl[off+5]]
			assert.False(t, dup)
			p.ioInts[tbl[off+5]] = tbl[off+7]
			off += 8
		case 4:
			assert.Equal(t, byte(0xFF), tbl[off+6], "all local APICs")
			p.localInts = append(p.localInts, [2]byte{tbl[off+1], tbl[off+7]})
			off += 8
		default:
			t.Fatalf("unknown entry type %d at %d", tbl[off], off)
		}
	}
	require.Equal(t, len(tbl), off, "entries fill the base table")
	return p
}

func TestWriteMPTable(t *testing.T) {
	for _, tc := range []struct {
		ncpus    int
		identity bool
	}{{1, false}, {4, false}, {4, true}, {MaxMPCPUs, false}} {
		mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
		require.NoError(t, err)
		defer mem.Close()
		n, err := WriteMPTable(mem, MPTableAddr, tc.ncpus, MPOptions{IdentityIRQ0: tc.identity})
		require.NoError(t, err)
		assert.Equal(t, MPTableSize(tc.ncpus, MPOptions{IdentityIRQ0: tc.identity}), n)

		p := parseMP(t, mem, MPTableAddr)
		require.Len(t, p.cpus, tc.ncpus)
		for i, c := range p.cpus {
			assert.Equal(t, byte(i), c.id)
			want := byte(1)
			if i == 0 {
				want = 3
			}
			assert.Equal(t, want, c.flags, "cpu %d flags", i)
		}
		assert.Equal(t, []string{"ISA   "}, p.buses)
		assert.Equal(t, byte(tc.ncpus), p.ioapicID)
		assert.Equal(t, uint32(0xFEC00000), p.ioapicAddr)
		want := map[byte]byte{}
		for irq := range byte(16) {
			want[irq] = irq
		}
		if !tc.identity {
			want[0] = 2
			delete(want, 2)
		}
		assert.Equal(t, want, p.ioInts)
		assert.Equal(t, [][2]byte{{3, 0}, {1, 1}}, p.localInts, "ExtINT on LINT0, NMI on LINT1")
	}
}

func TestWriteMPTableErrors(t *testing.T) {
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
	require.NoError(t, err)
	defer mem.Close()
	for _, n := range []int{0, -1, MaxMPCPUs + 1} {
		_, err := WriteMPTable(mem, MPTableAddr, n, MPOptions{})
		assert.True(t, errors.Is(err, ErrTooManyCPUs), "ncpus %d: %v", n, err)
	}
	_, err = WriteMPTable(mem, MPTableAddr+4, 2, MPOptions{})
	assert.ErrorContains(t, err, "aligned")
	_, err = WriteMPTable(mem, 0xFFFF0, 2, MPOptions{})
	assert.ErrorIs(t, err, kvm.ErrOutOfBounds)
}
