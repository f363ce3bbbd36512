// Package lab runs commands inside a "nested lab": an L1 Linux guest booted
// under QEMU TCG with an emulated AMD SVM CPU, in which the host's Debian
// cloud kernel loads kvm.ko and kvm-amd.ko and so offers a real /dev/kvm.
//
// It finds the host kernel and modules (FindHost), packs an initramfs
// (CPIOWriter, Image), generates the L1 /init (InitScript), boots QEMU and
// streams its serial console while watching for marker lines (Run,
// ParseMarker). The nestlab command (tools/nestlab) is a thin CLI over it.
package lab
