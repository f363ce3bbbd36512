package boot

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func testInitrd(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + 3)
	}
	return b
}

// e820At reads the e820 table from the zero page at ZeroPageAddr.
func e820At(t *testing.T, mem kvm.GuestMemory) []E820Entry {
	n := int(rd8(t, mem, ZeroPageAddr+zpE820Entries))
	out := make([]E820Entry, n)
	for i := range out {
		off := uint64(ZeroPageAddr + zpE820Table + i*20)
		out[i] = E820Entry{Addr: rd64(t, mem, off), Size: rd64(t, mem, off+8), Type: rd32(t, mem, off+16)}
	}
	return out
}

func TestLoadBzImage(t *testing.T) {
	const ram = 64 * testMiB
	mem := newMem(t, ram)
	o := defaultBz()
	image := makeBzImage(o)
	initrd := testInitrd(10000)
	e, err := LoadBzImage(mem, image, initrd, "console=ttyS0 quiet", LinuxOptions{})
	require.NoError(t, err)

	assert.Equal(t, o.payload, readBytes(t, mem, 0x100000, len(o.payload)), "kernel at 1 MiB")
	assert.Equal(t, "console=ttyS0 quiet", readCString(t, mem, 0x20000, 64))

	zp := uint64(ZeroPageAddr)
	assert.Equal(t, uint8(1), rd8(t, mem, zp+hdrSetupSects), "header copied")
	assert.Equal(t, uint16(0xAA55), rd16(t, mem, zp+hdrBootFlag))
	assert.Equal(t, uint32(hdrSMagic), rd32(t, mem, zp+hdrMagic))
	assert.Equal(t, uint16(0x020F), rd16(t, mem, zp+hdrVersion))
	assert.Equal(t, uint32(0x400000), rd32(t, mem, zp+hdrInitSize))
	assert.Equal(t, uint8(0xFF), rd8(t, mem, zp+hdrTypeOfLoader))
	lf := rd8(t, mem, zp+hdrLoadflags)
	assert.Equal(t, uint8(loadedHigh|canUseHeap), lf&(loadedHigh|canUseHeap|keepSegments))
	assert.Equal(t, uint16(0xFE00), rd16(t, mem, zp+hdrHeapEndPtr))
	assert.Equal(t, uint32(0x20000), rd32(t, mem, zp+hdrCmdLinePtr))
	assert.Equal(t, uint32(0x100000), rd32(t, mem, zp+hdrCode32Start))

	// The initrd goes as high as possible, page aligned.
	addr := uint64(rd32(t, mem, zp+hdrRamdiskImage))
	assert.Equal(t, uint32(len(initrd)), rd32(t, mem, zp+hdrRamdiskSize))
	assert.Equal(t, uint64((ram-len(initrd))&^0xFFF), addr)
	assert.Equal(t, initrd, readBytes(t, mem, addr, len(initrd)))

	assert.Equal(t, []E820Entry{
		{0, 0x9FC00, E820RAM},
		{0x9FC00, 0x100000 - 0x9FC00, E820Reserved},
		{0x100000, ram - 0x100000, E820RAM},
	}, e820At(t, mem))

	// GDT per Linux: __BOOT_CS 0x10, __BOOT_DS 0x18.
	assert.Equal(t, uint64(0), rd64(t, mem, 0x508))
	assert.Equal(t, uint64(0x00AF9B000000FFFF), rd64(t, mem, 0x510))
	assert.Equal(t, uint64(0x00CF93000000FFFF), rd64(t, mem, 0x518))
	checkPageTables(t, mem)

	assert.Equal(t, ProtoBzImage, e.Protocol)
	var regs kvm.Regs
	var sregs kvm.Sregs
	e.Apply(0, 2, &regs, &sregs)
	assert.Equal(t, kvm.Regs{RIP: 0x100200, RSI: 0x7000, RFLAGS: 2}, regs)
	assert.Equal(t, uint16(0x10), sregs.CS.Selector)
	assert.Equal(t, uint8(1), sregs.CS.L)
	assert.Equal(t, uint16(0x18), sregs.DS.Selector)
	assert.Equal(t, uint64(0x9000), sregs.CR3)
	assert.False(t, e.Starts(1), "APs wait for INIT/SIPI")
}

func TestLoadBzImageInitrdAddrMax(t *testing.T) {
	mem := newMem(t, 64*testMiB)
	o := defaultBz()
	o.initrdAddrMax = 0x1FFFFFF
	initrd := testInitrd(5000)
	_, err := LoadBzImage(mem, makeBzImage(o), initrd, "", LinuxOptions{})
	require.NoError(t, err)
	addr := uint64(rd32(t, mem, ZeroPageAddr+hdrRamdiskImage))
	assert.Equal(t, uint64((0x2000000-5000)&^0xFFF), addr)
	assert.LessOrEqual(t, addr+5000-1, uint64(o.initrdAddrMax))
	assert.Equal(t, initrd, readBytes(t, mem, addr, len(initrd)))
}

func TestLoadBzImageNoInitrd(t *testing.T) {
	mem := newMem(t, 64*testMiB)
	_, err := LoadBzImage(mem, makeBzImage(defaultBz()), nil, "", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, uint32(0), rd32(t, mem, ZeroPageAddr+hdrRamdiskImage))
	assert.Equal(t, uint32(0), rd32(t, mem, ZeroPageAddr+hdrRamdiskSize))
	assert.Equal(t, "", readCString(t, mem, 0x20000, 4))
}

func TestLoadBzImageSetupSectsZeroMeansFour(t *testing.T) {
	mem := newMem(t, 64*testMiB)
	o := defaultBz()
	o.setupSects = 0
	_, err := LoadBzImage(mem, makeBzImage(o), nil, "", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, o.payload, readBytes(t, mem, 0x100000, len(o.payload)))
}

func TestLoadBzImageErrors(t *testing.T) {
	tests := []struct {
		name   string
		mod    func(o *bzOpts, b []byte) []byte
		ram    uint64
		initrd int
		cmd    string
		field  string // FormatError field
		what   string // LayoutError what
	}{
		{name: "short", mod: func(o *bzOpts, b []byte) []byte { return b[:0x100] }, field: "header"},
		{name: "boot_flag", mod: func(o *bzOpts, b []byte) []byte { b[hdrBootFlag] = 0; return b }, field: "boot_flag"},
		{name: "magic", mod: func(o *bzOpts, b []byte) []byte { b[hdrMagic] = 'X'; return b }, field: "header"},
		{name: "version 2.05", mod: func(o *bzOpts, b []byte) []byte { binary.LittleEndian.PutUint16(b[hdrVersion:], 0x0205); return b }, field: "version"},
		{name: "version 2.11", mod: func(o *bzOpts, b []byte) []byte { binary.LittleEndian.PutUint16(b[hdrVersion:], 0x020B); return b }, field: "version"},
		{name: "short header", mod: func(o *bzOpts, b []byte) []byte { b[hdrJump+1] = 0x20; return b }, field: "jump"},
		{name: "no LOADED_HIGH", mod: func(o *bzOpts, b []byte) []byte { b[hdrLoadflags] = 0; return b }, field: "loadflags"},
		{name: "no XLF_KERNEL_64", mod: func(o *bzOpts, b []byte) []byte { b[hdrXloadflags] = 2; return b }, field: "xloadflags"},
		{name: "setup_sects beyond file", mod: func(o *bzOpts, b []byte) []byte { b[hdrSetupSects] = 200; return b }, field: "setup_sects"},
		{name: "kernel_alignment", mod: func(o *bzOpts, b []byte) []byte { b[hdrKernelAlign] = 3; return b }, field: "kernel_alignment"},
		{name: "cmdline too long", cmd: string(make([]byte, 256)), what: "cmdline"},
		{name: "cmdline exact", cmd: "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},
		{name: "cmdline with NUL", cmd: "a\x00b", what: "cmdline"},
		{name: "init_size beyond RAM", ram: 18 * testMiB, what: "RAM"},
		{name: "initrd too large", initrd: 60 * testMiB, what: "initrd"},
		{name: "RAM too small for low area", ram: 0x80000, what: "RAM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ram := tt.ram
			if ram == 0 {
				ram = 64 * testMiB
			}
			mem := newMem(t, ram)
			o := defaultBz()
			b := makeBzImage(o)
			if tt.mod != nil {
				b = tt.mod(&o, b)
			}
			var initrd []byte
			if tt.initrd > 0 {
				initrd = make([]byte, tt.initrd)
			}
			_, err := LoadBzImage(mem, b, initrd, tt.cmd, LinuxOptions{})
			switch {
			case tt.field != "":
				var fe *FormatError
				require.ErrorAs(t, err, &fe)
				assert.Equal(t, "bzImage", fe.Format)
				assert.Equal(t, tt.field, fe.Field)
			case tt.what != "":
				var le *LayoutError
				require.ErrorAs(t, err, &le)
				assert.Equal(t, tt.what, le.What)
			default:
				require.NoError(t, err)
			}
		})
	}
}

func TestLoadELF(t *testing.T) {
	const ram = 64 * testMiB
	mem := newMem(t, ram)
	o := defaultELF()
	initrd := testInitrd(8192)
	// Dirty the bss first: the loader must clear it.
	_, err := mem.WriteAt([]byte{1, 2, 3}, 0x1200000+int64(len(o.segs[1].data)))
	require.NoError(t, err)
	e, err := LoadELF(mem, makeELF(o), initrd, "root=/dev/vda", LinuxOptions{RSDP: 0xE0000})
	require.NoError(t, err)

	assert.Equal(t, o.segs[0].data, readBytes(t, mem, 0x1000000, len(o.segs[0].data)))
	assert.Equal(t, o.segs[1].data, readBytes(t, mem, 0x1200000, len(o.segs[1].data)))
	assert.Equal(t, make([]byte, 0x3000-len(o.segs[1].data)), readBytes(t, mem, 0x1200000+uint64(len(o.segs[1].data)), 0x3000-len(o.segs[1].data)), "bss zeroed")

	zp := uint64(ZeroPageAddr)
	assert.Equal(t, uint16(0xAA55), rd16(t, mem, zp+hdrBootFlag))
	assert.Equal(t, uint32(hdrSMagic), rd32(t, mem, zp+hdrMagic))
	assert.Equal(t, uint16(0x020F), rd16(t, mem, zp+hdrVersion))
	assert.Equal(t, uint8(0xFF), rd8(t, mem, zp+hdrTypeOfLoader))
	assert.Equal(t, uint32(0x20000), rd32(t, mem, zp+hdrCmdLinePtr))
	assert.Equal(t, uint64(0xE0000), rd64(t, mem, zp+zpACPIRSDPAddr))
	assert.Equal(t, "root=/dev/vda", readCString(t, mem, 0x20000, 64))
	addr := uint64(rd32(t, mem, zp+hdrRamdiskImage))
	assert.Equal(t, uint64(ram-8192), addr)
	assert.Equal(t, initrd, readBytes(t, mem, addr, len(initrd)))
	assert.Len(t, e820At(t, mem), 3)

	var regs kvm.Regs
	var sregs kvm.Sregs
	e.Apply(0, 1, &regs, &sregs)
	assert.Equal(t, kvm.Regs{RIP: 0x1000000, RSI: 0x7000, RFLAGS: 2}, regs, "virtual e_entry translated")
	assert.Equal(t, ProtoELF, e.Protocol)
	assert.Equal(t, uint16(0x10), sregs.CS.Selector)
}

func TestLoadPVH(t *testing.T) {
	for _, tc := range []struct {
		name  string
		shdr  bool
		dsize int
	}{{"PT_NOTE 8-byte", false, 8}, {"PT_NOTE 4-byte", false, 4}, {"SHT_NOTE", true, 8}} {
		t.Run(tc.name, func(t *testing.T) {
			const ram = 32 * testMiB
			mem := newMem(t, ram)
			o := defaultELF()
			o.pvhEntry, o.pvhDescSize, o.noteInShdr = 0x1000040, tc.dsize, tc.shdr
			initrd := testInitrd(3000)
			e, err := LoadLinux(mem, makeELF(o), initrd, "console=hvc0", LinuxOptions{RSDP: 0xE0000})
			require.NoError(t, err)
			assert.Equal(t, ProtoPVH, e.Protocol)

			si := uint64(StartInfoAddr)
			assert.Equal(t, uint32(0x336ec578), rd32(t, mem, si))
			assert.Equal(t, uint32(1), rd32(t, mem, si+4))
			assert.Equal(t, uint32(1), rd32(t, mem, si+12), "nr_modules")
			assert.Equal(t, uint64(ModlistAddr), rd64(t, mem, si+16))
			assert.Equal(t, uint64(CmdlineAddr), rd64(t, mem, si+24))
			assert.Equal(t, uint64(0xE0000), rd64(t, mem, si+32))
			assert.Equal(t, uint64(MemmapAddr), rd64(t, mem, si+40))
			assert.Equal(t, uint32(3), rd32(t, mem, si+48))
			assert.Equal(t, "console=hvc0", readCString(t, mem, CmdlineAddr, 64))

			maddr := rd64(t, mem, ModlistAddr)
			assert.Equal(t, uint64(ram-4096), maddr)
			assert.Equal(t, uint64(3000), rd64(t, mem, ModlistAddr+8))
			assert.Equal(t, initrd, readBytes(t, mem, maddr, len(initrd)))

			wantMap := []E820Entry{{0, 0x9FC00, 1}, {0x9FC00, 0x60400, 2}, {0x100000, ram - 0x100000, 1}}
			for i, w := range wantMap {
				off := uint64(MemmapAddr + i*24)
				assert.Equal(t, w, E820Entry{rd64(t, mem, off), rd64(t, mem, off+8), rd32(t, mem, off+16)})
				assert.Equal(t, uint32(0), rd32(t, mem, off+20))
			}
			// GDT: flat 32-bit code at 0x8, data at 0x10.
			assert.Equal(t, uint64(0x00CF9B000000FFFF), rd64(t, mem, 0x508))
			assert.Equal(t, uint64(0x00CF93000000FFFF), rd64(t, mem, 0x510))

			var regs kvm.Regs
			sregs := kvm.Sregs{CR0: 0x60000010, EFER: 0x500}
			e.Apply(0, 1, &regs, &sregs)
			assert.Equal(t, kvm.Regs{RIP: 0x1000040, RBX: 0x6000, RFLAGS: 2}, regs)
			assert.Equal(t, kvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x8, Type: 0xB, Present: 1, DB: 1, S: 1, G: 1}, sregs.CS)
			assert.Equal(t, uint16(0x10), sregs.SS.Selector)
			assert.Equal(t, uint64(0x11), sregs.CR0)
			assert.Equal(t, uint64(0), sregs.CR4)
			assert.Equal(t, uint64(0), sregs.EFER)
			assert.Equal(t, uint64(0), sregs.CR3)
		})
	}
}

func TestLoadLinuxNoPVHOption(t *testing.T) {
	mem := newMem(t, 32*testMiB)
	o := defaultELF()
	o.pvhEntry = 0x1000040
	e, err := LoadLinux(mem, makeELF(o), nil, "", LinuxOptions{NoPVH: true})
	require.NoError(t, err)
	assert.Equal(t, ProtoELF, e.Protocol)
	assert.Equal(t, uint64(0x1000000), e.IP)
}

func TestLoadPVHWithoutNote(t *testing.T) {
	mem := newMem(t, 32*testMiB)
	_, err := LoadPVH(mem, makeELF(defaultELF()), nil, "", LinuxOptions{})
	require.ErrorIs(t, err, ErrNoPVHNote)
	// LoadLinux falls back to the 64-bit ELF entry.
	e, err := LoadLinux(mem, makeELF(defaultELF()), nil, "", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, ProtoELF, e.Protocol)
}

func TestLoadLinuxDetect(t *testing.T) {
	mem := newMem(t, 64*testMiB)
	e, err := LoadLinux(mem, makeBzImage(defaultBz()), nil, "", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, ProtoBzImage, e.Protocol)
	_, err = LoadLinux(mem, []byte("MZ not a kernel at all"), nil, "", LinuxOptions{})
	var fe *FormatError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "magic", fe.Field)
}

func TestELFErrors(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name  string
		mod   func(b []byte) []byte
		opts  func(o *elfOpts)
		field string
		what  string
	}{
		{name: "magic", mod: func(b []byte) []byte { b[0] = 0; return b }, field: "e_ident"},
		{name: "class", mod: func(b []byte) []byte { b[4] = 9; return b }, field: "EI_CLASS"},
		{name: "big-endian", mod: func(b []byte) []byte { b[5] = 2; return b }, field: "EI_DATA"},
		{name: "type", mod: func(b []byte) []byte { le.PutUint16(b[16:], 1); return b }, field: "e_type"},
		{name: "machine", mod: func(b []byte) []byte { le.PutUint16(b[18:], 40); return b }, field: "e_machine"},
		{name: "phentsize", mod: func(b []byte) []byte { le.PutUint16(b[54:], 50); return b }, field: "e_phentsize"},
		{name: "phnum zero", mod: func(b []byte) []byte { le.PutUint16(b[56:], 0); return b }, field: "e_phnum"},
		{name: "phoff out of file", mod: func(b []byte) []byte { le.PutUint64(b[32:], 1<<62); return b }, field: "e_phoff"},
		{name: "p_offset out of file", mod: func(b []byte) []byte { le.PutUint64(b[64+8:], ^uint64(0)-3); return b }, field: "p_offset"},
		{name: "filesz > memsz", mod: func(b []byte) []byte { le.PutUint64(b[64+40:], 1); return b }, field: "p_filesz"},
		{name: "no PT_LOAD", mod: func(b []byte) []byte { le.PutUint32(b[64:], 6); le.PutUint32(b[64+56:], 6); return b }, field: "p_type"},
		{name: "segment below 1MiB", opts: func(o *elfOpts) { o.segs[0].paddr = 0x8000 }, field: "p_paddr"},
		{name: "segment beyond RAM", opts: func(o *elfOpts) { o.segs[1].memsz = 1 << 40 }, what: "kernel"},
		{name: "entry beyond RAM", opts: func(o *elfOpts) { o.entry = 1 << 40 }, field: "e_entry"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newMem(t, 32*testMiB)
			o := defaultELF()
			if tt.opts != nil {
				tt.opts(&o)
			}
			b := makeELF(o)
			if tt.mod != nil {
				b = tt.mod(b)
			}
			_, err := LoadELF(mem, b, nil, "", LinuxOptions{})
			if tt.field != "" {
				var fe *FormatError
				require.ErrorAs(t, err, &fe)
				assert.Equal(t, tt.field, fe.Field, "%v", err)
			} else {
				var lerr *LayoutError
				require.ErrorAs(t, err, &lerr)
				assert.Equal(t, tt.what, lerr.What)
			}
		})
	}
}

func TestPVHNoteErrors(t *testing.T) {
	o := defaultELF()
	o.pvhEntry, o.pvhDescSize = 0x1000040, 8
	b := makeELF(o)
	img, err := ParseELF(b)
	require.NoError(t, err)
	require.True(t, img.HasPVH)
	assert.Equal(t, uint64(0x1000040), img.PVHEntry)

	// An entry above 4 GiB is rejected.
	o.pvhEntry = 1 << 33
	_, err = ParseELF(makeELF(o))
	var fe *FormatError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "XEN_ELFNOTE_PHYS32_ENTRY", fe.Field)

	// A note whose descsz overruns the area is rejected.
	o.pvhEntry = 0x1000040
	b = makeELF(o)
	idx := len(b) - 8 - 4 - 4 - 4 // descsz of the Xen note
	binary.LittleEndian.PutUint32(b[idx:], 0x7FFFFFFF)
	_, err = ParseELF(b)
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "n_descsz", fe.Field)
}

// TestRealBzImage parses and loads the host's distribution kernel.
func TestRealBzImage(t *testing.T) {
	paths, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(paths) == 0 {
		t.Skip("no /boot/vmlinuz-* on this machine")
	}
	image, err := os.ReadFile(paths[0])
	if errors.Is(err, os.ErrPermission) {
		t.Skipf("cannot read %s: %v", paths[0], err)
	}
	require.NoError(t, err)
	require.Equal(t, FormatBzImage, DetectFormat(image))
	h, err := ParseSetupHeader(image)
	require.NoError(t, err, paths[0])
	t.Logf("%s: %v", paths[0], h)
	assert.GreaterOrEqual(t, h.Version, uint16(0x020C))
	assert.NotZero(t, h.InitSize)

	const ram = 512 * testMiB
	mem := newMem(t, ram)
	initrd := testInitrd(3 * testMiB)
	e, err := LoadLinux(mem, image, initrd, "console=ttyS0 panic=-1", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, uint64(0x100200), e.IP)
	assert.Equal(t, image[h.KernelOffset:h.KernelOffset+4096], readBytes(t, mem, 0x100000, 4096))
	addr := uint64(rd32(t, mem, ZeroPageAddr+hdrRamdiskImage))
	assert.Equal(t, uint64(ram-3*testMiB), addr)
	assert.GreaterOrEqual(t, addr, h.PrefAddress+uint64(h.InitSize))
}
