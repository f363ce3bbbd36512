package boot

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// lz4Block decodes one LZ4 block, appending to dst; it fails rather than
// growing past limit.
func lz4Block(dst, src []byte, limit int) ([]byte, error) {
	bad := errors.New("corrupt LZ4 block")
	length := func(n int, i *int) (int, error) {
		if n != 15 {
			return n, nil
		}
		for {
			if *i >= len(src) {
				return 0, bad
			}
			c := src[*i]
			*i++
			n += int(c)
			if c != 255 {
				return n, nil
			}
		}
	}
	for i := 0; i < len(src); {
		tok := src[i]
		i++
		lit, err := length(int(tok>>4), &i)
		if err != nil || lit > len(src)-i || len(dst)+lit > limit {
			return nil, bad
		}
		dst = append(dst, src[i:i+lit]...)
		i += lit
		if i == len(src) {
			return dst, nil
		}
		if i+2 > len(src) {
			return nil, bad
		}
		off := int(binary.LittleEndian.Uint16(src[i:]))
		i += 2
		ml, err := length(int(tok&15), &i)
		if err != nil || off == 0 || off > len(dst) || len(dst)+ml+4 > limit {
			return nil, bad
		}
		for k := 0; k < ml+4; k++ {
			dst = append(dst, dst[len(dst)-off])
		}
	}
	return dst, nil
}

// lz4Legacy decodes the legacy LZ4 frame format Linux uses for
// CONFIG_KERNEL_LZ4 payloads.
func lz4Legacy(src []byte, limit int) ([]byte, error) {
	const magic = 0x184C2102
	if len(src) < 4 || binary.LittleEndian.Uint32(src) != magic {
		return nil, errors.New("not a legacy LZ4 stream")
	}
	var out []byte
	for i := 4; len(src)-i >= 4; {
		n := int(binary.LittleEndian.Uint32(src[i:]))
		i += 4
		if n == magic {
			continue
		}
		if n > len(src)-i {
			break // the trailing uncompressed size appended by the kernel build
		}
		var err error
		if out, err = lz4Block(out, src[i:i+n], limit); err != nil {
			return nil, err
		}
		i += n
	}
	return out, nil
}

// realVmlinux extracts the ELF vmlinux from the host's bzImage, when it is
// LZ4-compressed (as on Debian cloud kernels).
func realVmlinux(t *testing.T) []byte {
	paths, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(paths) == 0 {
		t.Skip("no /boot/vmlinuz-* on this machine")
	}
	image, err := os.ReadFile(paths[0])
	if err != nil {
		t.Skipf("cannot read %s: %v", paths[0], err)
	}
	h, err := ParseSetupHeader(image)
	require.NoError(t, err)
	off := h.KernelOffset + int(binary.LittleEndian.Uint32(image[0x248:]))
	n := int(binary.LittleEndian.Uint32(image[0x24C:]))
	require.LessOrEqual(t, off+n, len(image))
	elf, err := lz4Legacy(image[off:off+n], 256<<20)
	if err != nil {
		t.Skipf("%s payload: %v", paths[0], err)
	}
	return elf
}

// TestRealVmlinux boots the host kernel's own ELF vmlinux (decompressed from
// its bzImage) through the ELF and PVH loaders.
func TestRealVmlinux(t *testing.T) {
	vmlinux := realVmlinux(t)
	img, err := ParseELF(vmlinux)
	require.NoError(t, err)
	t.Logf("vmlinux: %d bytes, entry %#x, %d PT_LOAD, PVH %v at %#x", len(vmlinux), img.Entry, len(img.Segments), img.HasPVH, img.PVHEntry)
	require.Equal(t, 64, img.Class)
	assert.Equal(t, uint64(0x1000000), img.Entry, "phys startup_64 at CONFIG_PHYSICAL_START")

	const ram = 512 * testMiB
	mem := newMem(t, ram)
	e, err := LoadLinux(mem, vmlinux, testInitrd(testMiB), "console=ttyS0", LinuxOptions{NoPVH: true})
	require.NoError(t, err)
	assert.Equal(t, ProtoELF, e.Protocol)
	assert.Equal(t, img.Entry, e.IP)
	s := img.Segments[0]
	n := min(s.Filesz, 4096)
	assert.Equal(t, vmlinux[s.Offset:s.Offset+n], readBytes(t, mem, s.Paddr, int(n)))

	if !img.HasPVH {
		t.Skip("kernel built without CONFIG_PVH")
	}
	e, err = LoadLinux(mem, vmlinux, testInitrd(testMiB), "console=ttyS0", LinuxOptions{})
	require.NoError(t, err)
	assert.Equal(t, ProtoPVH, e.Protocol)
	assert.Equal(t, img.PVHEntry, e.IP)
	assert.Equal(t, ProtectedMode, e.Mode)
}
