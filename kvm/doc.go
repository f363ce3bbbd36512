// Package kvm is the hypervisor core: typed handles for /dev/kvm (System, VM,
// VCPU) with one method per ioctl, guest memory, the port-I/O and MMIO buses,
// the vCPU run loop, vCPU and VM state save/restore, and dirty logging.
package kvm
