package boot

import (
	"bytes"
	"encoding/binary"

	"github.com/kvmkit/kvmkit/kvm"
)

// KernelFormat is the detected format of a kernel image.
type KernelFormat int

// Kernel formats.
const (
	FormatUnknown KernelFormat = iota
	FormatBzImage
	FormatELF
)

// DetectFormat tells a bzImage (setup header magic "HdrS" at 0x202) from an
// ELF file (magic "\x7fELF").
func DetectFormat(image []byte) KernelFormat {
	switch {
	case len(image) >= 4 && bytes.Equal(image[:4], []byte("\x7fELF")):
		return FormatELF
	case len(image) >= hdrMagic+4 && binary.LittleEndian.Uint32(image[hdrMagic:]) == hdrSMagic:
		return FormatBzImage
	}
	return FormatUnknown
}

// LoadLinux is the front door for Linux kernels: it detects a bzImage or an
// ELF vmlinux and loads it with the kernel command line and optional initrd.
// An ELF with a PVH note is booted through PVH unless opts.NoPVH is set;
// otherwise through the 64-bit boot protocol.
func LoadLinux(mem kvm.GuestMemory, kernel, initrd []byte, cmdline string, opts LinuxOptions) (*Entry, error) {
	switch DetectFormat(kernel) {
	case FormatBzImage:
		return LoadBzImage(mem, kernel, initrd, cmdline, opts)
	case FormatELF:
		if !opts.NoPVH {
			img, err := ParseELF(kernel)
			if err != nil {
				return nil, err
			}
			if img.HasPVH {
				return LoadPVH(mem, kernel, initrd, cmdline, opts)
			}
		}
		return LoadELF(mem, kernel, initrd, cmdline, opts)
	}
	return nil, formatErr("kernel", "magic", "neither a bzImage (\"HdrS\" at 0x202) nor an ELF file")
}
