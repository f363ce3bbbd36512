// Package machine assembles a runnable VM from kvmkit's parts: guest
// memory, vCPUs with a filtered CPUID, the in-kernel interrupt controllers
// and PIT, the platform devices (COM1, exit port, i8042, RTC, pvpanic) and
// a boot entry. It is the builder the examples use; every part it wires is
// usable on its own. The KVM side of a machine can be built ahead of need
// (Shell, Pool), so that a guest or a restored snapshot starts without
// waiting for VM creation.
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
	// Memory, if set, is used as guest RAM (the machine takes ownership,
	// also when New fails); its layout must equal RAMLayout(MemSize).
	// Restore uses it to run on a snapshot's lazily mapped memory file.
	Memory *kvm.Memory
	// Shell, if set, is a VM built ahead of need by NewShell for this
	// machine's MemSize, CPUs, NoIRQChip, AnonymousMemory and Device; New
	// takes it over (also when it fails) and creates no VM. With Memory
	// set too, that memory is moved into the shell's memory slots.
	Shell *Shell
	// Pool, if set and Shell is not, lends New a ready shell of this
	// shape; when it has none New builds the VM itself.
	Pool *Pool
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
	kvmParts
	cfg  Config
	log  *slog.Logger
	pio  *kvm.Bus
	mmio *kvm.Bus
	// fromShell records that New took a pre-built shell (Config.Shell or
	// Config.Pool) instead of creating the VM.
	fromShell bool

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

// New creates the VM, its memory, vCPUs and platform devices. With
// Config.Shell, or a ready shell of Config.Pool built for this shape, the
// VM, memory and vCPUs are the shell's and only the devices are made here.
func New(cfg Config) (_ *Machine, err error) {
	if cfg, err = cfg.withDefaults(); err != nil {
		return nil, err
	}
	m := &Machine{cfg: cfg, log: cfg.Logger, pio: kvm.NewBus(), mmio: kvm.NewBus()}
	if m.log == nil {
		m.log = slog.Default()
	}
	defer func() {
		if err != nil {
			m.Close()
			if cfg.Memory != nil {
				cfg.Memory.Close() // idempotent: it may be m's already
			}
		}
	}()
	sh := cfg.Shell
	if sh == nil && cfg.Pool != nil {
		sh = cfg.Pool.get(cfg)
	}
	if sh != nil {
		if err = m.adoptShell(sh); err != nil {
			return nil, err
		}
	} else if m.kvmParts, err = buildParts(cfg); err != nil {
		return nil, err
	}
	if err = m.setupDevices(); err != nil {
		return nil, err
	}
	return m, nil
}

// withDefaults fills in defaults and checks the shape.
func (cfg Config) withDefaults() (Config, error) {
	if cfg.MemSize == 0 {
		cfg.MemSize = DefaultMemSize
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.MemSize%kvm.PageSize != 0 || cfg.MemSize < 1<<20 {
		return cfg, fmt.Errorf("machine: memory size %d: want a multiple of 4 KiB, at least 1 MiB", cfg.MemSize)
	}
	if cfg.CPUs < 1 || cfg.CPUs > 64 {
		return cfg, fmt.Errorf("machine: %d vCPUs: want 1..64", cfg.CPUs)
	}
	return cfg, nil
}

// adoptShell takes sh's VM, memory and vCPUs (sh is consumed, also on
// error) and, when cfg.Memory is set, moves that memory into the shell's
// slots.
func (m *Machine) adoptShell(sh *Shell) error {
	parts, key := sh.take()
	if parts.vm == nil {
		return fmt.Errorf("machine: %w", ErrShellUsed)
	}
	m.kvmParts, m.fromShell = parts, true
	if want := shapeOf(m.cfg); key != want {
		return fmt.Errorf("machine: %w: shell built for %v, machine wants %v", ErrShellMismatch, key, want)
	}
	if m.cfg.Memory == nil {
		return nil
	}
	if err := checkLayout(m.cfg.Memory, m.cfg.MemSize); err != nil {
		return err
	}
	return m.mem.MoveFrom(m.cfg.Memory)
}

// FromShell reports whether New took a pre-built shell (Config.Shell, or
// one of Config.Pool's) instead of creating the VM itself.
func (m *Machine) FromShell() bool { return m.fromShell }

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
	errs = append(errs, m.kvmParts.close())
	return errors.Join(errs...)
}
