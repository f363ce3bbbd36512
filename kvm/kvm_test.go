package kvm_test

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

// openKVM opens /dev/kvm or skips the test with a one-line reason.
func openKVM(t testing.TB) *kvm.System {
	t.Helper()
	sys, err := kvm.Open("")
	if err != nil {
		t.Skipf("no /dev/kvm: %v", err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

// rmVM is a one-vCPU real-mode VM with 1 MiB of RAM and code at 0x7C00.
type rmVM struct {
	vm   *kvm.VM
	mem  *kvm.Memory
	vcpu *kvm.VCPU
	pio  *kvm.Bus
	mmio *kvm.Bus
}

func newRealModeVM(t testing.TB, sys *kvm.System, code []byte, irqchip bool) *rmVM {
	t.Helper()
	vm, err := sys.CreateVM(kvm.VMOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { vm.Close() })
	require.NoError(t, vm.SetTSSAddr(0xfffbd000))
	if irqchip {
		require.NoError(t, vm.CreateIRQChip())
		require.NoError(t, vm.CreatePIT2(kvm.PITSpeakerDummy))
	}
	mem, err := kvm.SingleRegion(1<<20, kvm.MemoryOptions{Memfd: true})
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, vm.AddMemory(mem, 0, 0))
	_, err = mem.WriteAt(code, 0x7c00)
	require.NoError(t, err)
	vcpu, err := vm.CreateVCPU(0)
	require.NoError(t, err)
	t.Cleanup(func() { vcpu.Close() })
	sregs, err := vcpu.Sregs()
	require.NoError(t, err)
	for _, s := range []*kvm.Segment{&sregs.CS, &sregs.DS, &sregs.ES, &sregs.FS, &sregs.GS, &sregs.SS} {
		s.Base, s.Selector = 0, 0
	}
	require.NoError(t, vcpu.SetSregs(sregs))
	require.NoError(t, vcpu.SetRegs(kvm.Regs{RIP: 0x7c00, RSP: 0x7c00, RFLAGS: 2}))
	return &rmVM{vm: vm, mem: mem, vcpu: vcpu, pio: kvm.NewBus(), mmio: kvm.NewBus()}
}

func (v *rmVM) runner() *kvm.Runner {
	return kvm.NewRunner([]*kvm.VCPU{v.vcpu}, kvm.RunnerOptions{PIO: v.pio, MMIO: v.mmio})
}

// exitPort registers a 1-byte exit device at 0xF4 that stops r.
func exitPort(b *kvm.Bus, r **kvm.Runner) {
	_ = b.Register(0xf4, 1, kvm.DeviceFunc{WriteFunc: func(_ uint64, d []byte) {
		(*r).Stop(kvm.Result{Reason: kvm.StopExitPort, ExitCode: d[0]})
	}})
}

// Real-mode code fragments (hand-assembled, commented).
var (
	// mov al, 42 ; out 0xF4, al ; hlt
	codeExit42 = []byte{0xb0, 0x2a, 0xe6, 0xf4, 0xf4}
	// loop: inc ax ; out 0xE0, ax ; jmp loop
	codeCountLoop = []byte{0x40, 0xe7, 0xe0, 0xeb, 0xfb}
	// lidt [0x7c10] ; int3 ; (padding) ; at 0x7c10: a zero IDT descriptor
	codeTriple = append([]byte{0x0f, 0x01, 0x1e, 0x10, 0x7c, 0xcc}, make([]byte, 16)...)
	// mov bx, 0x1000 ; loop: mov [bx], al ; add bx, 0x1000 ; cmp bx, 0x5000 ; jne loop ; mov al, 0 ; out 0xF4, al
	codeDirty = []byte{0xbb, 0x00, 0x10, 0x88, 0x07, 0x81, 0xc3, 0x00, 0x10, 0x81, 0xfb, 0x00, 0x50, 0x75, 0xf4, 0xb0, 0x00, 0xe6, 0xf4}
)

func TestSystemQueries(t *testing.T) {
	sys := openKVM(t)
	v, err := sys.APIVersion()
	require.NoError(t, err)
	assert.Equal(t, kvm.APIVersion, v)
	n, err := sys.CheckExtension(kvm.CapUserMemory)
	require.NoError(t, err)
	assert.Positive(t, n)
	cpuid, err := sys.SupportedCPUID()
	require.NoError(t, err)
	assert.NotEmpty(t, cpuid)
	msrs, err := sys.MSRIndexList()
	require.NoError(t, err)
	assert.NotEmpty(t, msrs)
	assert.Greater(t, sys.VCPUMmapSize(), 4095)
}

func TestIoctlErrorNamesIoctl(t *testing.T) {
	sys := openKVM(t)
	vm, err := sys.CreateVM(kvm.VMOptions{})
	require.NoError(t, err)
	defer vm.Close()
	// A slot at an unaligned size is refused by KVM with EINVAL.
	err = vm.SetUserMemoryRegion(0, 0, 0x1000, make([]byte, 100))
	var ie *kvm.IoctlError
	require.ErrorAs(t, err, &ie)
	assert.Equal(t, "KVM_SET_USER_MEMORY_REGION", ie.Op)
}

func TestRealModeExitPort(t *testing.T) {
	sys := openKVM(t)
	for _, irqchip := range []bool{false, true} {
		v := newRealModeVM(t, sys, codeExit42, irqchip)
		r := v.runner()
		exitPort(v.pio, &r)
		res, err := r.Run(context.Background())
		require.NoError(t, err)
		assert.Equal(t, kvm.Result{Reason: kvm.StopExitPort, ExitCode: 42}, res)
	}
}

func TestTripleFaultIsTypedCrash(t *testing.T) {
	sys := openKVM(t)
	v := newRealModeVM(t, sys, codeTriple, true)
	r := v.runner()
	_, err := r.Run(context.Background())
	require.ErrorIs(t, err, kvm.ErrGuestCrash)
	var gc *kvm.GuestCrash
	require.ErrorAs(t, err, &gc)
	assert.Equal(t, kvm.CrashTripleFault, gc.Kind)
	assert.Equal(t, kvm.ExitShutdown, gc.Exit)
	assert.Contains(t, gc.Error(), "triple fault")
}

// counter is a port device that records the last 16-bit value written.
type counter struct {
	n    atomic.Uint64
	last atomic.Uint32
}

func (c *counter) Read(uint64, []byte) {}
func (c *counter) Write(_ uint64, d []byte) {
	c.n.Add(1)
	if len(d) >= 2 {
		c.last.Store(uint32(binary.LittleEndian.Uint16(d)))
	}
}

func TestPauseResumeAndCancel(t *testing.T) {
	sys := openKVM(t)
	v := newRealModeVM(t, sys, codeCountLoop, true)
	var c counter
	require.NoError(t, v.pio.Register(0xe0, 2, &c))
	r := v.runner()
	ctx, cancel := context.WithCancel(context.Background())
	var res kvm.Result
	var runErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); res, runErr = r.Run(ctx) }()

	waitFor(t, func() bool { return c.n.Load() > 100 })
	for range 5 {
		require.NoError(t, r.Pause(context.Background()))
		n := c.n.Load()
		time.Sleep(5 * time.Millisecond)
		assert.Equal(t, n, c.n.Load(), "no exits while paused")
		require.NoError(t, r.Resume())
		waitFor(t, func() bool { return c.n.Load() > n+10 })
	}
	cancel()
	wg.Wait()
	assert.ErrorIs(t, runErr, context.Canceled)
	assert.Equal(t, kvm.StopCanceled, res.Reason)
	assert.ErrorIs(t, r.Pause(context.Background()), kvm.ErrStopped)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestStateSaveRestore runs a counting guest, pauses it, moves its vCPU,
// VM and memory state into a fresh VM and checks it continues exactly where
// it stopped.
func TestStateSaveRestore(t *testing.T) {
	sys := openKVM(t)
	src := newRealModeVM(t, sys, codeCountLoop, true)
	var c counter
	require.NoError(t, src.pio.Register(0xe0, 2, &c))
	r := src.runner()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _, _ = r.Run(context.Background()) }()
	waitFor(t, func() bool { return c.n.Load() > 1000 })
	require.NoError(t, r.Pause(context.Background()))
	last := c.last.Load()
	vs, err := src.vcpu.SaveState()
	require.NoError(t, err)
	ms, err := src.vm.SaveState(true, true)
	require.NoError(t, err)
	r.Stop(kvm.Result{Reason: kvm.StopCanceled})
	wg.Wait()

	dst := newRealModeVM(t, sys, nil, true)
	ram, err := src.mem.Slice(0, 1<<20)
	require.NoError(t, err)
	_, err = dst.mem.WriteAt(ram, 0)
	require.NoError(t, err)
	require.NoError(t, dst.vm.RestoreState(ms))
	require.NoError(t, dst.vcpu.RestoreState(vs))
	vs2, err := dst.vcpu.SaveState()
	require.NoError(t, err)
	assert.Equal(t, vs.Regs, vs2.Regs)
	assert.Equal(t, vs.Sregs, vs2.Sregs)
	assert.Equal(t, vs.XCRs, vs2.XCRs)

	var got []uint32
	var d counter
	var mu sync.Mutex
	r2 := dst.runner()
	require.NoError(t, dst.pio.Register(0xe0, 2, kvm.DeviceFunc{WriteFunc: func(off uint64, b []byte) {
		mu.Lock()
		defer mu.Unlock()
		d.Write(off, b)
		if len(got) < 5 {
			got = append(got, d.last.Load())
		} else {
			r2.Stop(kvm.Result{Reason: kvm.StopExitPort})
		}
	}}))
	_, err = r2.Run(context.Background())
	require.NoError(t, err)
	want := []uint32{(last + 1) & 0xffff, (last + 2) & 0xffff, (last + 3) & 0xffff, (last + 4) & 0xffff, (last + 5) & 0xffff}
	assert.Equal(t, want, got, "restored guest continues the sequence")
}

func TestDirtyLog(t *testing.T) {
	sys := openKVM(t)
	for _, manual := range []bool{false, true} {
		v := newRealModeVM(t, sys, codeDirty, true)
		if manual {
			ok, err := v.vm.EnableManualDirtyLog()
			require.NoError(t, err)
			if !ok {
				t.Log("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered; legacy path only")
				continue
			}
		}
		dl, err := v.vm.StartDirtyLog(0)
		require.NoError(t, err)
		assert.Equal(t, manual, dl.Manual())
		first, err := dl.Harvest(0)
		require.NoError(t, err)
		assert.Zero(t, kvm.CountDirty(first), "tracking starts clean")
		r := v.runner()
		exitPort(v.pio, &r)
		_, err = r.Run(context.Background())
		require.NoError(t, err)
		bm, err := dl.Harvest(0)
		require.NoError(t, err)
		for _, page := range []int{1, 2, 3, 4} {
			assert.NotZero(t, bm[0]&(1<<page), "page %d dirty (manual=%v)", page, manual)
		}
		assert.Zero(t, bm[0]&(1<<5), "page 5 untouched")
		bm, err = dl.Harvest(0)
		require.NoError(t, err)
		assert.Zero(t, kvm.CountDirty(bm), "nothing dirtied since last harvest")
		require.NoError(t, dl.Stop())
	}
}

func TestIRQFDAndIOEventFD(t *testing.T) {
	sys := openKVM(t)
	v := newRealModeVM(t, sys, codeCountLoop, true)
	efd, err := newEventFD()
	require.NoError(t, err)
	defer closeFD(efd)
	require.NoError(t, v.vm.IRQFD(efd, 5))
	require.NoError(t, v.vm.RemoveIRQFD(efd, 5))
	// An ioeventfd on port 0xE0 absorbs the guest's writes in the kernel.
	require.NoError(t, v.vm.AddIOEventFD(kvm.IOEventFD{FD: efd, Addr: 0xe0, Len: 2, PIO: true}))
	var c counter
	require.NoError(t, v.pio.Register(0xe0, 2, &c))
	r := v.runner()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = r.Run(ctx)
	require.True(t, errors.Is(err, context.DeadlineExceeded))
	assert.Zero(t, c.n.Load(), "writes went to the eventfd, not to userspace")
	n, err := readEventFD(efd)
	require.NoError(t, err)
	assert.Positive(t, n)
}

// BenchmarkPauseResume is one Pause (all vCPUs out of the guest) plus one
// Resume of a running one-vCPU guest.
func BenchmarkPauseResume(b *testing.B) {
	sys := openKVM(b)
	v := newRealModeVM(b, sys, codeCountLoop, true)
	var c counter
	require.NoError(b, v.pio.Register(0xe0, 2, &c))
	r := v.runner()
	done := make(chan struct{})
	go func() { defer close(done); _, _ = r.Run(context.Background()) }()
	for c.n.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx := context.Background()
	for b.Loop() {
		if err := r.Pause(ctx); err != nil {
			b.Fatal(err)
		}
		if err := r.Resume(); err != nil {
			b.Fatal(err)
		}
	}
	r.Stop(kvm.Result{Reason: kvm.StopCanceled})
	<-done
}

// TestCloseIsIdempotent closes every handle twice: the second Close must
// not close a descriptor number the process has since reused.
func TestCloseIsIdempotent(t *testing.T) {
	sys, err := kvm.Open("")
	if err != nil {
		t.Skipf("no /dev/kvm: %v", err)
	}
	vm, err := sys.CreateVM(kvm.VMOptions{})
	require.NoError(t, err)
	vcpu, err := vm.CreateVCPU(0)
	require.NoError(t, err)
	require.NoError(t, vcpu.Close())
	require.NoError(t, vm.Close())
	require.NoError(t, sys.Close())
	// The numbers are free again; a new handle may get one of them.
	other, err := kvm.Open("")
	require.NoError(t, err)
	defer other.Close()
	require.NoError(t, vcpu.Close())
	require.NoError(t, vm.Close())
	require.NoError(t, sys.Close())
	v, err := other.APIVersion()
	require.NoError(t, err, "a second Close closed a reused descriptor")
	assert.Equal(t, kvm.APIVersion, v)
}

// BenchmarkVMCreate splits what building a VM costs (it dominates a
// snapshot restore): the VM itself, the in-kernel irqchip and PIT, one
// vCPU with the supported CPUID (each of these three timed from create to
// close), and the readable-MSR probe alone.
func BenchmarkVMCreate(b *testing.B) {
	sys := openKVM(b)
	cpuid, err := sys.SupportedCPUID()
	require.NoError(b, err)
	build := func(b *testing.B, irqchip, vcpu bool) (*kvm.VM, *kvm.VCPU) {
		vm, err := sys.CreateVM(kvm.VMOptions{})
		require.NoError(b, err)
		if irqchip {
			require.NoError(b, vm.SetTSSAddr(0xfffbd000))
			require.NoError(b, vm.CreateIRQChip())
			require.NoError(b, vm.CreatePIT2(kvm.PITSpeakerDummy))
		}
		var c *kvm.VCPU
		if vcpu {
			c, err = vm.CreateVCPU(0)
			require.NoError(b, err)
			require.NoError(b, c.SetCPUID(cpuid))
		}
		return vm, c
	}
	closeAll := func(vm *kvm.VM, c *kvm.VCPU) {
		if c != nil {
			c.Close()
		}
		vm.Close()
	}
	b.Run("vm", func(b *testing.B) {
		for b.Loop() {
			closeAll(build(b, false, false))
		}
	})
	b.Run("vm+irqchip+pit", func(b *testing.B) {
		for b.Loop() {
			closeAll(build(b, true, false))
		}
	})
	b.Run("vm+irqchip+pit+vcpu", func(b *testing.B) {
		for b.Loop() {
			closeAll(build(b, true, true))
		}
	})
	b.Run("probe-msrs", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			vm, c := build(b, true, true)
			b.StartTimer()
			require.NoError(b, c.ProbeMSRs())
			b.StopTimer()
			closeAll(vm, c)
			b.StartTimer()
		}
	})
}
