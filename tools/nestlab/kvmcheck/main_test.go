package main

import (
	"os"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

func TestABISizes(t *testing.T) {
	// Sizes from <linux/kvm.h>; they are encoded in the ioctl numbers.
	require.Equal(t, uintptr(32), unsafe.Sizeof(userspaceMemoryRegion{}))
	require.Equal(t, uintptr(144), unsafe.Sizeof(regs{}))
	require.Equal(t, uintptr(24), unsafe.Sizeof(segment{}))
	require.Equal(t, uintptr(312), unsafe.Sizeof(sregs{}))
	require.Equal(t, uintptr(0x4020AE46), uintptr(kvmSetUserMemoryRegion))
	require.Equal(t, uintptr(144)<<16, uintptr(kvmGetRegs)&0x3fff0000)
	require.Equal(t, uintptr(312)<<16, uintptr(kvmSetSregs)&0x3fff0000)
}

func TestCheck(t *testing.T) {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm: run with `go run ./tools/nestlab selftest`")
	}
	require.NoError(t, check(1000))
}
