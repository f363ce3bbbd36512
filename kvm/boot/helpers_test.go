package boot

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

const testMiB = 1 << 20

// newMem allocates size bytes of guest RAM at guest-physical 0.
func newMem(tb testing.TB, size uint64) *kvm.Memory {
	tb.Helper()
	m, err := kvm.SingleRegion(size, kvm.MemoryOptions{})
	require.NoError(tb, err)
	tb.Cleanup(func() { m.Close() })
	return m
}

func readBytes(tb testing.TB, mem kvm.GuestMemory, gpa uint64, n int) []byte {
	tb.Helper()
	b := make([]byte, n)
	_, err := mem.ReadAt(b, int64(gpa))
	require.NoError(tb, err)
	return b
}

func rd8(tb testing.TB, mem kvm.GuestMemory, gpa uint64) uint8 { return readBytes(tb, mem, gpa, 1)[0] }
func rd16(tb testing.TB, mem kvm.GuestMemory, gpa uint64) uint16 {
	return binary.LittleEndian.Uint16(readBytes(tb, mem, gpa, 2))
}
func rd32(tb testing.TB, mem kvm.GuestMemory, gpa uint64) uint32 {
	return binary.LittleEndian.Uint32(readBytes(tb, mem, gpa, 4))
}
func rd64(tb testing.TB, mem kvm.GuestMemory, gpa uint64) uint64 {
	return binary.LittleEndian.Uint64(readBytes(tb, mem, gpa, 8))
}

// readCString reads a NUL-terminated string of at most max bytes.
func readCString(tb testing.TB, mem kvm.GuestMemory, gpa uint64, max int) string {
	b := readBytes(tb, mem, gpa, max)
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	tb.Fatalf("no NUL within %d bytes at %#x", max, gpa)
	return ""
}

// bzOpts describes a synthetic bzImage.
type bzOpts struct {
	setupSects    uint8
	version       uint16
	loadflags     uint8
	xloadflags    uint16
	cmdlineSize   uint32
	initrdAddrMax uint32
	prefAddress   uint64
	initSize      uint32
	payload       []byte
}

func defaultBz() bzOpts {
	payload := make([]byte, 3000)
	for i := range payload {
		payload[i] = byte(i*7 + 1)
	}
	return bzOpts{
		setupSects: 1, version: 0x020F, loadflags: loadedHigh, xloadflags: xlfKernel64 | 2,
		cmdlineSize: 255, initrdAddrMax: 0x7FFFFFFF, prefAddress: 0x1000000, initSize: 0x400000,
		payload: payload,
	}
}

// makeBzImage builds a minimal bzImage: boot sector with the setup header,
// setup sectors, then the "protected-mode kernel" payload.
func makeBzImage(o bzOpts) []byte {
	sects := int(o.setupSects)
	if sects == 0 {
		sects = 4
	}
	b := make([]byte, (sects+1)*512, (sects+1)*512+len(o.payload))
	le := binary.LittleEndian
	b[hdrSetupSects] = o.setupSects
	le.PutUint16(b[hdrVidMode:], 0xFFFF)
	le.PutUint16(b[hdrBootFlag:], bootFlagMagic)
	b[hdrJump], b[hdrJump+1] = 0xEB, 0x6A // header ends at 0x26C
	le.PutUint32(b[hdrMagic:], hdrSMagic)
	le.PutUint16(b[hdrVersion:], o.version)
	b[hdrLoadflags] = o.loadflags
	le.PutUint32(b[hdrCode32Start:], 0x100000)
	le.PutUint32(b[hdrInitrdMax:], o.initrdAddrMax)
	le.PutUint32(b[hdrKernelAlign:], 0x200000)
	b[hdrRelocatable] = 1
	le.PutUint16(b[hdrXloadflags:], o.xloadflags)
	le.PutUint32(b[hdrCmdlineSize:], o.cmdlineSize)
	le.PutUint64(b[hdrPrefAddress:], o.prefAddress)
	le.PutUint32(b[hdrInitSize:], o.initSize)
	return append(b, o.payload...)
}

// elfSeg is one PT_LOAD of a synthetic ELF.
type elfSeg struct {
	paddr uint64
	data  []byte
	memsz uint64
}

// elfOpts describes a synthetic ELF64 x86-64 executable.
type elfOpts struct {
	entry       uint64
	segs        []elfSeg
	pvhEntry    uint64 // 0: no PVH note
	pvhDescSize int    // 4 or 8
	noteInShdr  bool   // put the note in an SHT_NOTE section instead of PT_NOTE
}

// xenNote encodes a Xen PHYS32_ENTRY ELF note preceded by an unrelated one.
func xenNote(entry uint64, descSize int) []byte {
	le := binary.LittleEndian
	var b []byte
	// An unrelated GNU note first, to exercise the walk.
	b = le.AppendUint32(b, 4)
	b = le.AppendUint32(b, 4)
	b = le.AppendUint32(b, 3)
	b = append(b, "GNU\x00"...)
	b = le.AppendUint32(b, 0xdeadbeef)
	b = le.AppendUint32(b, 4) // "Xen\0"
	b = le.AppendUint32(b, uint32(descSize))
	b = le.AppendUint32(b, xenPhys32Note)
	b = append(b, "Xen\x00"...)
	if descSize == 8 {
		b = le.AppendUint64(b, entry)
	} else {
		b = le.AppendUint32(b, uint32(entry))
	}
	return b
}

// makeELF lays out: ELF header, program headers, segment data, note, section
// headers (when noteInShdr).
func makeELF(o elfOpts) []byte {
	le := binary.LittleEndian
	nph := len(o.segs)
	var note []byte
	if o.pvhEntry != 0 {
		ds := o.pvhDescSize
		if ds == 0 {
			ds = 8
		}
		note = xenNote(o.pvhEntry, ds)
		if !o.noteInShdr {
			nph++
		}
	}
	off := uint64(64 + 56*nph)
	var body []byte
	var phdrs []byte
	ph := func(typ uint32, offset, paddr, filesz, memsz uint64) {
		phdrs = le.AppendUint32(phdrs, typ)
		phdrs = le.AppendUint32(phdrs, 5) // flags
		phdrs = le.AppendUint64(phdrs, offset)
		phdrs = le.AppendUint64(phdrs, paddr+startKernMap) // vaddr
		phdrs = le.AppendUint64(phdrs, paddr)
		phdrs = le.AppendUint64(phdrs, filesz)
		phdrs = le.AppendUint64(phdrs, memsz)
		phdrs = le.AppendUint64(phdrs, 0x1000)
	}
	for _, s := range o.segs {
		ph(ptLoad, off+uint64(len(body)), s.paddr, uint64(len(s.data)), s.memsz)
		body = append(body, s.data...)
	}
	noteOff := off + uint64(len(body))
	body = append(body, note...)
	if note != nil && !o.noteInShdr {
		ph(ptNote, noteOff, 0, uint64(len(note)), uint64(len(note)))
	}
	var shdrs []byte
	shnum := 0
	if note != nil && o.noteInShdr {
		sh := func(typ uint32, offset, size uint64) {
			shdrs = le.AppendUint32(shdrs, 0)
			shdrs = le.AppendUint32(shdrs, typ)
			shdrs = le.AppendUint64(shdrs, 0)
			shdrs = le.AppendUint64(shdrs, 0)
			shdrs = le.AppendUint64(shdrs, offset)
			shdrs = le.AppendUint64(shdrs, size)
			shdrs = append(shdrs, make([]byte, 24)...)
		}
		sh(0, 0, 0)
		sh(shtNote, noteOff, uint64(len(note)))
		shnum = 2
	}
	shoff := uint64(0)
	if shnum > 0 {
		shoff = off + uint64(len(body))
	}
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = elfClass64, elfDataLSB, 1
	le.PutUint16(h[16:], etExec)
	le.PutUint16(h[18:], emX86_64)
	le.PutUint32(h[20:], 1)
	le.PutUint64(h[24:], o.entry)
	le.PutUint64(h[32:], 64)
	le.PutUint64(h[40:], shoff)
	le.PutUint16(h[52:], 64)
	le.PutUint16(h[54:], 56)
	le.PutUint16(h[56:], uint16(nph))
	le.PutUint16(h[58:], 64)
	le.PutUint16(h[60:], uint16(shnum))
	out := append(h, phdrs...)
	out = append(out, body...)
	return append(out, shdrs...)
}

func defaultELF() elfOpts {
	text := make([]byte, 5000)
	for i := range text {
		text[i] = byte(i*13 + 5)
	}
	data := []byte("kernel data segment")
	return elfOpts{
		entry: 0x1000000 + startKernMap,
		segs: []elfSeg{
			{paddr: 0x1000000, data: text, memsz: uint64(len(text))},
			{paddr: 0x1200000, data: data, memsz: 0x3000},
		},
	}
}
