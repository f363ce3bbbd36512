// Package machine assembles a runnable VM from kvmkit's parts: guest
// memory, vCPUs with a filtered CPUID, the in-kernel interrupt controllers
// and PIT, the platform devices (COM1, exit port, i8042, RTC, pvpanic) and
// a boot entry. It is the builder the examples use; every part it wires is
// usable on its own.
package machine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"sync"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/devices"
)

// Guest-physical layout constants.
const (
	// MMIOHoleStart is where RAM stops below 4 GiB; device MMIO (virtio at
	// VirtioMMIOBase, IOAPIC, LAPIC) lives above it.
	MMIOHoleStart = 0xC000_0000
	// HighRAMStart is where RAM continues above the hole.
	HighRAMStart = 1 << 32
	// VirtioMMIOBase is the first virtio-mmio window.
	VirtioMMIOBase = 0xD000_0000
	tssAddr        = 0xFFFB_D000
	identityMap    = 0xFFFB_C000
	// COM1IRQ is COM1's ISA interrupt.
	COM1IRQ = 4
	com1    = 0x3F8
)

// ResetPolicy says what a guest reset (i8042 pulse, triple fault is not a
// reset) does.
type ResetPolicy int

// Reset policies.
const (
	ResetStops   ResetPolicy = iota // the run ends with StopReset
	ResetRestart                    // the caller may build and boot again; reported as StopReset too
)

// Config describes a machine.
type Config struct {
	// MemSize is the guest RAM size in bytes (default 128 MiB), page aligned.
	MemSize uint64
	// CPUs is the number of vCPUs (default 1).
	CPUs int
	// Serial receives COM1 output (nil discards it).
	Serial io.Writer
	// SerialIn, if set, is pumped into COM1's receive FIFO.
	SerialIn io.Reader
	// NoIRQChip leaves out the in-kernel PIC/IOAPIC/LAPIC and PIT (then a
	// HLT exits to user space and ends that vCPU's loop).
	NoIRQChip bool
	// AnonymousMemory uses anonymous RAM instead of memfd-backed RAM.
	AnonymousMemory bool
	// Device is the KVM device path (default /dev/kvm).
	Device string
	// System, if set, is used instead of opening Device.
	System *kvm.System
	// Memory, if set, is used as guest RAM (the machine takes ownership);
	// its layout must equal RAMLayout(MemSize). Restore uses it to run on
	// a snapshot's lazily mapped memory file.
	Memory *kvm.Memory
	// Logger receives diagnostics (default slog.Default()).
	Logger *slog.Logger
	// Watchdog, if positive, ends the run with a CrashWatchdog crash when
	// the guest makes no progress (no VM exits, no console output) for that
	// long while not paused.
	Watchdog time.Duration
	// VCPUThreadInit runs on each vCPU thread before it first enters the
	// guest (see kvm.RunnerOptions.ThreadInit).
	VCPUThreadInit func(vcpu int) error
	// PanicPatterns are console regexps that count as a guest crash
	// (default: "Kernel panic"); set WatchConsole to enable.
	WatchConsole  bool
	PanicPatterns []string
}

// DefaultMemSize is the RAM size used when Config.MemSize is 0.
const DefaultMemSize = 128 << 20

// Machine is an assembled VM. Build it with New, load a guest (LoadFlat or
// LoadLinux), then Run it (or Start and Wait).
type Machine struct {
	cfg    Config
	log    *slog.Logger
	sys    *kvm.System
	ownSys bool
	vm     *kvm.VM
	mem    *kvm.Memory
	vcpus  []*kvm.VCPU
	pio    *kvm.Bus
	mmio   *kvm.Bus
	cpuid  [][]kvm.CPUIDEntry

	uart    *devices.UART
	console *devices.ConsoleWatcher
	exit    *devices.ExitPort

	mu        sync.Mutex
	runner    *kvm.Runner
	runDone   chan struct{}
	result    kvm.Result
	runErr    error
	dirty     *kvm.DirtyLog
	extra     []io.Closer
	devNames  []string
	stateDevs map[string]StateSaver
	closed    bool

	manualTried bool
	announcers  []func() error
	flushers    []func() error
}

// New creates the VM, its memory, vCPUs and platform devices.
func New(cfg Config) (_ *Machine, err error) {
	if cfg.MemSize == 0 {
		cfg.MemSize = DefaultMemSize
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.MemSize%kvm.PageSize != 0 || cfg.MemSize < 1<<20 {
		return nil, fmt.Errorf("machine: memory size %d: want a multiple of 4 KiB, at least 1 MiB", cfg.MemSize)
	}
	if cfg.CPUs < 1 || cfg.CPUs > 64 {
		return nil, fmt.Errorf("machine: %d vCPUs: want 1..64", cfg.CPUs)
	}
	m := &Machine{cfg: cfg, log: cfg.Logger, pio: kvm.NewBus(), mmio: kvm.NewBus()}
	if m.log == nil {
		m.log = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if cfg.System != nil {
		m.sys = cfg.System
	} else {
		if m.sys, err = kvm.Open(cfg.Device); err != nil {
			return nil, err
		}
		m.ownSys = true
	}
	if m.vm, err = m.sys.CreateVM(kvm.VMOptions{}); err != nil {
		return nil, err
	}
	if err = m.setupPlatform(); err != nil {
		return nil, err
	}
	mem := cfg.Memory
	if mem == nil {
		if mem, err = kvm.NewMemory(RAMLayout(cfg.MemSize), kvm.MemoryOptions{Memfd: !cfg.AnonymousMemory, Name: "kvmkit-ram"}); err != nil {
			return nil, err
		}
	} else if err = checkLayout(mem, cfg.MemSize); err != nil {
		return nil, err
	}
	if err = m.adoptMemory(mem); err != nil {
		mem.Close()
		return nil, err
	}
	if err = m.createVCPUs(); err != nil {
		return nil, err
	}
	if err = m.setupDevices(); err != nil {
		return nil, err
	}
	return m, nil
}

func checkLayout(mem *kvm.Memory, size uint64) error {
	want := RAMLayout(size)
	got := mem.Regions()
	if len(got) != len(want) {
		return fmt.Errorf("machine: memory has %d regions, layout for %d bytes has %d", len(got), size, len(want))
	}
	for i, w := range want {
		if got[i].GPA != w.GPA || uint64(len(got[i].Host)) != w.Size {
			return fmt.Errorf("machine: memory region %d is [%#x,+%#x), want [%#x,+%#x)", i, got[i].GPA, len(got[i].Host), w.GPA, w.Size)
		}
	}
	return nil
}

// RAMLayout splits size bytes of RAM around the 32-bit MMIO hole.
func RAMLayout(size uint64) []kvm.RegionSpec {
	if size <= MMIOHoleStart {
		return []kvm.RegionSpec{{GPA: 0, Size: size}}
	}
	return []kvm.RegionSpec{{GPA: 0, Size: MMIOHoleStart}, {GPA: HighRAMStart, Size: size - MMIOHoleStart}}
}

func (m *Machine) setupPlatform() error {
	if err := m.vm.SetTSSAddr(tssAddr); err != nil {
		return err
	}
	if err := m.vm.SetIdentityMapAddr(identityMap); err != nil {
		return err
	}
	if m.cfg.NoIRQChip {
		return nil
	}
	if err := m.vm.CreateIRQChip(); err != nil {
		return err
	}
	return m.vm.CreatePIT2(kvm.PITSpeakerDummy)
}

// adoptMemory registers mem's regions as slots 0.. and takes ownership.
func (m *Machine) adoptMemory(mem *kvm.Memory) error {
	if err := m.vm.AddMemory(mem, 0, 0); err != nil {
		return err
	}
	m.mem = mem
	return nil
}

func (m *Machine) createVCPUs() error {
	supported, err := m.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	for i := range m.cfg.CPUs {
		c, err := m.vm.CreateVCPU(i)
		if err != nil {
			return err
		}
		m.vcpus = append(m.vcpus, c)
		entries := cpuidFor(supported, i, m.cfg.CPUs)
		if err := c.SetCPUID(entries); err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
		m.cpuid = append(m.cpuid, entries)
	}
	// SaveState's first call would otherwise find the readable MSRs inside
	// a migration's downtime; the vCPU is not running yet, so ask now.
	if len(m.vcpus) > 0 {
		if err := m.vcpus[0].ProbeMSRs(); err != nil {
			return err
		}
	}
	return nil
}

func (m *Machine) irq(n uint32) kvm.IRQ {
	if m.cfg.NoIRQChip {
		return kvm.NoIRQ{}
	}
	return m.vm.Line(n)
}

func (m *Machine) setupDevices() error {
	out := m.cfg.Serial
	if m.cfg.WatchConsole {
		var pats []*regexp.Regexp
		for _, p := range m.cfg.PanicPatterns {
			re, err := regexp.Compile(p)
			if err != nil {
				return fmt.Errorf("panic pattern %q: %w", p, err)
			}
			pats = append(pats, re)
		}
		w, err := devices.NewConsoleWatcher(devices.ConsoleConfig{
			Next:     out,
			Patterns: pats,
			OnMatch: func(cm devices.ConsoleMatch) {
				m.fail(&kvm.GuestCrash{Kind: kvm.CrashPanic, VCPU: -1, Detail: "console: " + cm.Line})
			},
		})
		if err != nil {
			return err
		}
		m.console = w
		out = w
	}
	uart, err := devices.NewUART(devices.UARTConfig{Name: "COM1", Out: out, IRQ: m.irq(COM1IRQ), Logger: m.log})
	if err != nil {
		return err
	}
	m.uart = uart
	m.extra = append(m.extra, uart)
	m.exit = devices.NewExitPort(func(code uint8) {
		m.stop(kvm.Result{Reason: kvm.StopExitPort, ExitCode: code})
	})
	pvp := devices.NewPVPanic(func(ev uint8) {
		m.fail(&kvm.GuestCrash{Kind: kvm.CrashPanic, VCPU: -1, Detail: fmt.Sprintf("pvpanic event %#x", ev)})
	})
	kbd := devices.NewI8042(devices.I8042Config{
		OnReset: func() { m.stop(kvm.Result{Reason: kvm.StopReset}) },
		KbdIRQ:  m.irq(devices.KbdIRQ),
		AuxIRQ:  m.irq(devices.AuxIRQ),
	})
	rtc := devices.NewRTC(devices.RTCConfig{})
	regs := []struct {
		base, size uint64
		dev        kvm.Device
		name       string
	}{
		{com1, devices.UARTSize, uart, "com1"},
		{devices.ExitPortBase, 1, m.exit, "exit-port"},
		{devices.PVPanicPort, 1, pvp, "pvpanic"},
		{devices.I8042Base, devices.I8042Size, kbd, "i8042"},
		{devices.RTCBase, devices.RTCSize, rtc, "rtc"},
		{devices.PostCodePort, 1, &devices.PostCode{}, "post"},
		{devices.DelayPort, 1, &devices.Null{}, "delay"},
	}
	for _, r := range regs {
		if err := m.pio.Register(r.base, r.size, r.dev); err != nil {
			return fmt.Errorf("register %s: %w", r.name, err)
		}
	}
	if m.cfg.SerialIn != nil {
		go func() { _ = uart.Pump(context.Background(), m.cfg.SerialIn) }()
	}
	// The ACPI PM registers are always there, so a machine restored from a
	// snapshot or a migration can still power off.
	return m.addACPIPM()
}

// VM returns the KVM VM handle.
func (m *Machine) VM() *kvm.VM { return m.vm }

// System returns the KVM system handle.
func (m *Machine) System() *kvm.System { return m.sys }

// Mem returns guest memory.
func (m *Machine) Mem() *kvm.Memory { return m.mem }

// VCPUs returns the vCPUs.
func (m *Machine) VCPUs() []*kvm.VCPU { return m.vcpus }

// PIO returns the port-I/O bus, for adding devices.
func (m *Machine) PIO() *kvm.Bus { return m.pio }

// MMIO returns the MMIO bus, for adding devices.
func (m *Machine) MMIO() *kvm.Bus { return m.mmio }

// IRQ returns GSI n as an interrupt line for devices.
func (m *Machine) IRQ(n uint32) kvm.IRQ { return m.irq(n) }

// UART returns COM1.
func (m *Machine) UART() *devices.UART { return m.uart }

// AddDevice registers dev on the MMIO (mmio true) or port bus, names it for
// migration compatibility checks, and closes it with the machine when it is
// an io.Closer.
func (m *Machine) AddDevice(name string, mmio bool, base, size uint64, dev kvm.Device) error {
	bus := m.pio
	if mmio {
		bus = m.mmio
	}
	if err := bus.Register(base, size, dev); err != nil {
		return fmt.Errorf("device %s: %w", name, err)
	}
	m.devNames = append(m.devNames, fmt.Sprintf("%s@%#x", name, base))
	if c, ok := dev.(io.Closer); ok {
		m.extra = append(m.extra, c)
	}
	return nil
}

// AddAnnouncer registers a function Announce calls: after a migration a
// NIC tells the network where the guest now is.
func (m *Machine) AddAnnouncer(f func() error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.announcers = append(m.announcers, f)
}

// Announce runs every announcer and joins their errors.
func (m *Machine) Announce() error {
	m.mu.Lock()
	fs := append([]func() error(nil), m.announcers...)
	m.mu.Unlock()
	var errs []error
	for _, f := range fs {
		errs = append(errs, f())
	}
	return errors.Join(errs...)
}

// AddFlusher registers a function Flush calls (a disk's sync).
func (m *Machine) AddFlusher(f func() error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushers = append(m.flushers, f)
}

// Flush runs every flusher (write disks to stable storage) and joins
// their errors; migration calls it while paused, before the switch-over.
func (m *Machine) Flush() error {
	m.mu.Lock()
	fs := append([]func() error(nil), m.flushers...)
	m.mu.Unlock()
	var errs []error
	for _, f := range fs {
		errs = append(errs, f())
	}
	return errors.Join(errs...)
}

// AddCloser makes Close close c (a device back end, a file).
func (m *Machine) AddCloser(c io.Closer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.extra = append(m.extra, c)
}

// Close releases the vCPUs, VM, memory and devices.
func (m *Machine) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	r := m.runner
	m.mu.Unlock()
	if r != nil {
		r.Stop(kvm.Result{Reason: kvm.StopCanceled})
		<-m.runDone
	}
	var errs []error
	for _, c := range m.extra {
		errs = append(errs, c.Close())
	}
	for _, c := range m.vcpus {
		errs = append(errs, c.Close())
	}
	if m.vm != nil {
		errs = append(errs, m.vm.Close())
	}
	if m.mem != nil {
		errs = append(errs, m.mem.Close())
	}
	if m.ownSys && m.sys != nil {
		errs = append(errs, m.sys.Close())
	}
	return errors.Join(errs...)
}
