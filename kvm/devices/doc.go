// Package devices provides the legacy PC platform devices a KVM guest expects
// on the port-I/O bus (16550A UARTs, CMOS RTC, i8042 reset, pvpanic, an exit
// port, the POST/delay port, absorbing null ranges) and the host-side crash
// detection helpers that watch them (ConsoleWatcher, Watchdog).
//
// Every device implements kvm.Device with offsets relative to the base it is
// registered at. A multi-byte access is treated as a run of byte accesses to
// consecutive ports, as an ISA bus splits it; bytes past the device's ports
// read as 0xFF and writes to them are dropped. All devices are safe for
// concurrent use by several vCPU threads and host goroutines. Callbacks are
// always invoked without any device lock held.
package devices
