package boot

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

func TestLoadFlatLong(t *testing.T) {
	mem := newMem(t, 4*testMiB)
	image := []byte{0xF4, 0xEB, 0xFD, 0x90, 0x42}
	e, err := LoadFlat(mem, image, FlatOptions{VCPUs: 4})
	require.NoError(t, err)
	assert.Equal(t, image, readBytes(t, mem, 0x100000, len(image)))

	// GDT: null, 64-bit code at 0x8, data at 0x10, busy TSS at 0x18.
	assert.Equal(t, uint64(0), rd64(t, mem, 0x500))
	assert.Equal(t, uint64(0x00AF9B000000FFFF), rd64(t, mem, 0x508))
	assert.Equal(t, uint64(0x00CF93000000FFFF), rd64(t, mem, 0x510))
	assert.Equal(t, uint64(0x00008B0000000067), rd64(t, mem, 0x518))
	checkPageTables(t, mem)

	var regs kvm.Regs
	sregs := kvm.Sregs{APICBase: 0xFEE00900, CR0: 0x60000010}
	e.Apply(2, 4, &regs, &sregs)
	assert.Equal(t, kvm.Regs{RIP: 0x100000, RFLAGS: 2, RSP: 0x80000 - 2*0x4000, RDI: 2, RSI: 4, RDX: 4 * testMiB}, regs)
	assert.Equal(t, uint64(0xFEE00900), sregs.APICBase, "APIC base kept")
	assert.Equal(t, uint64(0x80000033), sregs.CR0)
	assert.Equal(t, uint64(0x620), sregs.CR4)
	assert.Equal(t, uint64(0x500), sregs.EFER)
	assert.Equal(t, uint64(0x9000), sregs.CR3)
	assert.Equal(t, kvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x8, Type: 0xB, Present: 1, S: 1, L: 1, G: 1}, sregs.CS)
	for _, s := range []kvm.Segment{sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS} {
		assert.Equal(t, kvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x10, Type: 0x3, Present: 1, DB: 1, S: 1, G: 1}, s)
	}
	assert.Equal(t, kvm.Segment{Limit: 0x67, Selector: 0x18, Type: 0xB, Present: 1}, sregs.TR)
	assert.Equal(t, uint8(1), sregs.LDT.Unusable)
	assert.Equal(t, kvm.DTable{Base: 0x500, Limit: 0x27}, sregs.GDT)
	assert.True(t, e.Starts(3))

	// vCPU 0 gets the top stack.
	e.Apply(0, 4, &regs, &sregs)
	assert.Equal(t, uint64(0x80000), regs.RSP)
	assert.Equal(t, uint64(0), regs.RDI)
}

// checkPageTables verifies the 4 GiB identity map with 2 MiB pages.
func checkPageTables(t *testing.T, mem kvm.GuestMemory) {
	t.Helper()
	assert.Equal(t, uint64(0xA003), rd64(t, mem, 0x9000))
	assert.Equal(t, uint64(0), rd64(t, mem, 0x9008))
	for i := range uint64(4) {
		assert.Equal(t, 0xB003+i*0x1000, rd64(t, mem, 0xA000+i*8))
	}
	assert.Equal(t, uint64(0), rd64(t, mem, 0xA020))
	for _, i := range []uint64{0, 1, 511, 512, 1000, 2047} {
		assert.Equal(t, i<<21|0x83, rd64(t, mem, 0xB000+i*8), "PD entry %d", i)
	}
}

func TestLoadFlatReal(t *testing.T) {
	mem := newMem(t, testMiB)
	image := []byte{0xFA, 0xF4}
	e, err := LoadFlat(mem, image, FlatOptions{Mode: FlatReal, VCPUs: 2})
	require.NoError(t, err)
	assert.Equal(t, image, readBytes(t, mem, 0x7C00, 2))
	assert.Equal(t, ProtoFlatReal, e.Protocol)
	var regs kvm.Regs
	sregs := kvm.Sregs{CR0: 0x60000010, CS: kvm.Segment{Selector: 0xF000, Base: 0xFFFF0000}}
	e.Apply(0, 2, &regs, &sregs)
	assert.Equal(t, kvm.Regs{RIP: 0x7C00, RSP: 0x7C00, RFLAGS: 2}, regs)
	assert.Equal(t, kvm.Segment{Limit: 0xFFFF, Type: 0xB, Present: 1, S: 1}, sregs.CS)
	for _, s := range []kvm.Segment{sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS} {
		assert.Equal(t, uint64(0), s.Base)
		assert.Equal(t, uint16(0), s.Selector)
	}
	assert.Equal(t, uint64(0x60000010), sregs.CR0, "real mode: PE and PG clear")
	// Only vCPU 0 starts; others untouched.
	assert.False(t, e.Starts(1))
	regs2 := kvm.Regs{RAX: 7}
	e.Apply(1, 2, &regs2, &sregs)
	assert.Equal(t, kvm.Regs{RAX: 7}, regs2)
}

func TestLoadFlatErrors(t *testing.T) {
	tests := []struct {
		name  string
		ram   uint64
		image int
		opts  FlatOptions
		what  string
	}{
		{"empty", 4 * testMiB, 0, FlatOptions{}, "image"},
		{"long too large", 2 * testMiB, testMiB + 1, FlatOptions{}, "image"},
		{"long exactly fits", 2 * testMiB, testMiB, FlatOptions{}, ""},
		{"RAM below page tables and stacks", 0x40000, 16, FlatOptions{}, "RAM"},
		{"too many vCPUs", 4 * testMiB, 16, FlatOptions{VCPUs: MaxFlatVCPUs + 1}, "vcpus"},
		{"max vCPUs", 4 * testMiB, 16, FlatOptions{VCPUs: MaxFlatVCPUs}, ""},
		{"real too large", 4 * testMiB, 0xA0000 - 0x7C00 + 1, FlatOptions{Mode: FlatReal}, "image"},
		{"real exactly fits", 4 * testMiB, 0xA0000 - 0x7C00, FlatOptions{Mode: FlatReal}, ""},
		{"real RAM too small", 0x8000, 0x1000, FlatOptions{Mode: FlatReal}, "image"},
		{"bad mode", 4 * testMiB, 16, FlatOptions{Mode: 7}, "mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newMem(t, tt.ram)
			_, err := LoadFlat(mem, make([]byte, tt.image), tt.opts)
			if tt.what == "" {
				require.NoError(t, err)
				return
			}
			var le *LayoutError
			require.True(t, errors.As(err, &le), "got %v", err)
			assert.Equal(t, tt.what, le.What)
		})
	}
}

func TestMaxFlatVCPUsStacksClearPageTables(t *testing.T) {
	lowest := uint64(FlatStackTop - MaxFlatVCPUs*FlatStackStride)
	assert.GreaterOrEqual(t, lowest, uint64(pageTablesEnd))
	assert.Less(t, uint64(FlatStackTop-(MaxFlatVCPUs+1)*FlatStackStride), uint64(pageTablesEnd))
}

func TestLoadFlatExplicitRAM(t *testing.T) {
	mem := newMem(t, 4*testMiB)
	e, err := LoadFlat(mem, []byte{1}, FlatOptions{RAM: []kvm.RegionSpec{{GPA: 0, Size: 2 * testMiB}}})
	require.NoError(t, err)
	assert.Equal(t, uint64(2*testMiB), e.RAMSize)
}

type plainMem struct{ kvm.GuestMemory }

func TestLoadFlatNeedsRAMLayout(t *testing.T) {
	mem := newMem(t, 4*testMiB)
	_, err := LoadFlat(plainMem{mem}, []byte{1}, FlatOptions{})
	var le *LayoutError
	require.ErrorAs(t, err, &le)
	assert.Equal(t, "RAM", le.What)
}
