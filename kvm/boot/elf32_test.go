package boot

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// makeELF32 builds an i386 ELF with one PT_LOAD at paddr and a PT_NOTE
// holding a 4-byte Xen PHYS32_ENTRY note.
func makeELF32(paddr uint32, code []byte, pvh uint32) []byte {
	le := binary.LittleEndian
	note := xenNote(uint64(pvh), 4)
	dataOff := uint32(52 + 2*32)
	h := make([]byte, 52)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = elfClass32, elfDataLSB, 1
	le.PutUint16(h[16:], etExec)
	le.PutUint16(h[18:], em386)
	le.PutUint32(h[20:], 1)
	le.PutUint32(h[24:], paddr)
	le.PutUint32(h[28:], 52)
	le.PutUint16(h[40:], 52)
	le.PutUint16(h[42:], 32)
	le.PutUint16(h[44:], 2)
	le.PutUint16(h[46:], 40)
	ph := func(typ, off, paddr, size uint32) {
		for _, v := range []uint32{typ, off, paddr, paddr, size, size, 5, 4} {
			h = le.AppendUint32(h, v)
		}
	}
	ph(ptLoad, dataOff, paddr, uint32(len(code)))
	ph(ptNote, dataOff+uint32(len(code)), 0, uint32(len(note)))
	h = append(h, code...)
	return append(h, note...)
}

func TestELF32PVH(t *testing.T) {
	code := []byte{0xFA, 0xF4, 0xEB, 0xFD}
	image := makeELF32(0x200000, code, 0x200001)
	img, err := ParseELF(image)
	require.NoError(t, err)
	assert.Equal(t, 32, img.Class)
	assert.True(t, img.HasPVH)
	assert.Equal(t, uint64(0x200001), img.PVHEntry)

	mem := newMem(t, 8*testMiB)
	e, err := LoadLinux(mem, image, nil, "", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, ProtoPVH, e.Protocol)
	assert.Equal(t, uint64(0x200001), e.IP)
	assert.Equal(t, code, readBytes(t, mem, 0x200000, len(code)))
	assert.Equal(t, uint32(0), rd32(t, mem, StartInfoAddr+12), "no modules without an initrd")

	_, err = LoadLinux(mem, image, nil, "", LinuxOptions{NoPVH: true})
	var fe *FormatError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "EI_CLASS", fe.Field)
}
