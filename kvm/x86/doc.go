// Package x86 prepares x86 CPU and platform state for guests as pure
// functions: the per-vCPU CPUID table (topology, hypervisor leaves, feature
// masking, migration compatibility), the initial MSR values for a Linux
// boot, and the Intel MultiProcessor table that lets a guest find its CPUs
// and IOAPIC without ACPI.
package x86
