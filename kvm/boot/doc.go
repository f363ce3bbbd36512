// Package boot loads guest images into guest memory and describes how the
// vCPUs must start: the flat bare-metal ABI (long mode or real mode), the
// Linux x86 boot protocol for bzImage, uncompressed 64-bit ELF vmlinux, and
// the Xen PVH entry. Every loader is a pure function of its inputs (image
// bytes and options) that writes into a kvm.GuestMemory and returns an
// Entry; applying the Entry to vCPU registers is the caller's job, so the
// loaders are testable and fuzzable without /dev/kvm.
//
// Fixed guest-physical addresses written by the loaders:
//
//	0x00500-0x0052F  GDT (null, code, data, TSS descriptors; layout per protocol)
//	0x06000-0x06037  PVH hvm_start_info
//	0x06040-0x0605F  PVH module list (one entry: the initrd)
//	0x06080-0x06FFF  PVH memory map (at most 128 entries)
//	0x07000-0x07FFF  Linux boot_params ("zero page")
//	0x07C00-         flat real-mode image
//	0x09000-0x09FFF  PML4 (long mode)
//	0x0A000-0x0AFFF  PDPT (long mode)
//	0x0B000-0x0EFFF  four page directories, 2 MiB pages identity-mapping 4 GiB
//	0x20000-         kernel command line (NUL terminated)
//	0x9FC00-0xFFFFF  reserved in the e820 map (EBDA/BIOS area): the x86
//	                 package's MP table (0x9FC00) and ACPI tables (0xE0000)
//	0x100000-        flat long-mode image, bzImage protected-mode kernel
//	ELF p_paddr      vmlinux/PVH segments (must be at or above 1 MiB)
//	top of RAM       initrd, page aligned, as high as possible below 4 GiB
//	                 and the kernel's initrd_addr_max
//
// The TSS descriptor has base 0 and limit 0x67 (the PVH specification's
// value); no TSS is written to memory, since no privilege change happens
// before the guest installs its own.
package boot
