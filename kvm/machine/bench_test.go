package machine_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

// benchLoop runs a loop guest for b.N iterations through the full run loop
// and bus, with a no-op device at the loop's address.
func benchLoop(b *testing.B, guest string, mmio bool) {
	requireKVM(b)
	m := newGuest(b, guest, machine.Config{NoIRQChip: true, MemSize: 16 << 20}, &guests.Params{Iterations: uint64(b.N)})
	var err error
	if mmio {
		err = m.MMIO().Register(guests.MMIOAddr, 4, kvm.DeviceFunc{WriteFunc: func(uint64, []byte) {}})
	} else {
		err = m.PIO().Register(guests.PIOPort, 1, kvm.DeviceFunc{WriteFunc: func(uint64, []byte) {}})
	}
	require.NoError(b, err)
	b.ReportAllocs()
	b.ResetTimer()
	res, err := m.Run(context.Background())
	b.StopTimer()
	require.NoError(b, err)
	require.Equal(b, uint8(0), res.ExitCode)
}

// BenchmarkPIOExit is the cost of one port-I/O exit handled by a device.
func BenchmarkPIOExit(b *testing.B) { benchLoop(b, guests.PIOLoop, false) }

// BenchmarkMMIOExit is the cost of one MMIO exit handled by a device.
func BenchmarkMMIOExit(b *testing.B) { benchLoop(b, guests.MMIOLoop, true) }

// BenchmarkCreateToFirstExit is the time from creating a VM (one slot of
// 1 MiB, one vCPU, real mode) to its first exit, through kvm.Runner: the
// same work as the C reference in bench/c.
func BenchmarkCreateToFirstExit(b *testing.B) {
	requireKVM(b)
	sys, err := kvm.Open("")
	require.NoError(b, err)
	defer sys.Close()
	img, _, err := guests.Get(guests.Exit42x16)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		vm, err := sys.CreateVM(kvm.VMOptions{})
		require.NoError(b, err)
		mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{})
		require.NoError(b, err)
		require.NoError(b, vm.AddMemory(mem, 0, 0))
		_, err = mem.WriteAt(img, guests.RealLoadAddr)
		require.NoError(b, err)
		c, err := vm.CreateVCPU(0)
		require.NoError(b, err)
		sregs, err := c.Sregs()
		require.NoError(b, err)
		sregs.CS.Base, sregs.CS.Selector = 0, 0
		require.NoError(b, c.SetSregs(sregs))
		require.NoError(b, c.SetRegs(kvm.Regs{RIP: guests.RealLoadAddr, RSP: guests.RealStackTop, RFLAGS: 2}))
		pio := kvm.NewBus()
		var r *kvm.Runner
		_ = pio.Register(guests.ExitPort, 1, kvm.DeviceFunc{WriteFunc: func(_ uint64, d []byte) {
			r.Stop(kvm.Result{Reason: kvm.StopExitPort, ExitCode: d[0]})
		}})
		r = kvm.NewRunner([]*kvm.VCPU{c}, kvm.RunnerOptions{PIO: pio})
		res, err := r.Run(context.Background())
		require.NoError(b, err)
		require.Equal(b, uint8(42), res.ExitCode)
		c.Close()
		vm.Close()
		mem.Close()
	}
}

// BenchmarkMachineBoot is the time from machine.New (irqchip, PIT, CPUID,
// platform devices, 128 MiB memfd RAM) to the exit of a long-mode guest.
func BenchmarkMachineBoot(b *testing.B) {
	requireKVM(b)
	img, _, err := guests.Get(guests.Exit42)
	require.NoError(b, err)
	for b.Loop() {
		m, err := machine.New(machine.Config{})
		require.NoError(b, err)
		require.NoError(b, m.LoadFlat(img, 0))
		res, err := m.Run(context.Background())
		require.NoError(b, err)
		require.Equal(b, uint8(42), res.ExitCode)
		m.Close()
	}
}

// BenchmarkSaveState is the state part of a migration's downtime: reading
// every vCPU's and the VM's state from KVM and encoding it, on a paused
// machine with the in-kernel irqchip, by parts (vcpu = one
// kvm.VCPU.SaveState, vm = kvm.VM.SaveState, encode = State.Bytes, all =
// Machine.SaveState plus encoding).
func BenchmarkSaveState(b *testing.B) {
	requireKVM(b)
	for _, cpus := range []int{1, 2} {
		m := newGuest(b, guests.PIOLoop, machine.Config{MemSize: 16 << 20, CPUs: cpus}, nil) // loops forever
		require.NoError(b, m.PIO().Register(guests.PIOPort, 1, kvm.DeviceFunc{WriteFunc: func(uint64, []byte) {}}))
		require.NoError(b, m.Start(context.Background()))
		require.NoError(b, m.Pause(context.Background()))
		st, err := m.SaveState()
		require.NoError(b, err)
		b.Run(fmt.Sprintf("cpus=%d/vcpu", cpus), func(b *testing.B) {
			for b.Loop() {
				_, err := m.VCPUs()[0].SaveState()
				require.NoError(b, err)
			}
		})
		b.Run(fmt.Sprintf("cpus=%d/vm", cpus), func(b *testing.B) {
			for b.Loop() {
				_, err := m.VM().SaveState(true, true)
				require.NoError(b, err)
			}
		})
		b.Run(fmt.Sprintf("cpus=%d/encode", cpus), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_, err := st.Bytes()
				require.NoError(b, err)
			}
		})
		b.Run(fmt.Sprintf("cpus=%d/all", cpus), func(b *testing.B) {
			for b.Loop() {
				s, err := m.SaveState()
				require.NoError(b, err)
				_, err = s.Bytes()
				require.NoError(b, err)
			}
		})
		m.Stop(kvm.Result{Reason: kvm.StopCanceled})
		_, _ = m.Wait()
	}
}
