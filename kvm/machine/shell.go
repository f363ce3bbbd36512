package machine

import (
	"errors"
	"fmt"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// ErrShellMismatch is wrapped when New is given a shell built for another
// shape (memory size, vCPUs, irqchip, memory kind or device).
var ErrShellMismatch = errors.New("shell does not fit the machine")

// ErrShellUsed is wrapped when New is given a shell another machine took,
// or one that was closed.
var ErrShellUsed = errors.New("shell used or closed already")

// kvmParts is the KVM side of a machine: what creating a VM costs.
type kvmParts struct {
	sys    *kvm.System
	ownSys bool
	vm     *kvm.VM
	mem    *kvm.Memory
	vcpus  []*kvm.VCPU
	cpuid  [][]kvm.CPUIDEntry
}

// shape is what a shell must share with the machine that adopts it.
type shape struct {
	MemSize         uint64
	CPUs            int
	NoIRQChip       bool
	AnonymousMemory bool
	Device          string
}

func shapeOf(cfg Config) shape {
	return shape{MemSize: cfg.MemSize, CPUs: cfg.CPUs, NoIRQChip: cfg.NoIRQChip, AnonymousMemory: cfg.AnonymousMemory, Device: cfg.Device}
}

func (s shape) String() string {
	chip := "irqchip"
	if s.NoIRQChip {
		chip = "no irqchip"
	}
	mem := "memfd"
	if s.AnonymousMemory {
		mem = "anonymous"
	}
	return fmt.Sprintf("%d MiB %s, %d vCPUs, %s", s.MemSize>>20, mem, s.CPUs, chip)
}

// buildParts creates the VM, its platform (TSS, identity map, irqchip,
// PIT), its memory (cfg.Memory or new) registered as slots 0.., and the
// vCPUs with their CPUID set and the readable MSRs probed. On error
// everything is closed, cfg.Memory included (New owns it then too).
func buildParts(cfg Config) (p kvmParts, err error) {
	defer func() {
		if err != nil {
			_ = p.close()
		}
	}()
	if cfg.System != nil {
		p.sys = cfg.System
	} else {
		if p.sys, err = kvm.Open(cfg.Device); err != nil {
			return p, err
		}
		p.ownSys = true
	}
	if p.vm, err = p.sys.CreateVM(kvm.VMOptions{}); err != nil {
		return p, err
	}
	if err = setupPlatform(p.vm, cfg.NoIRQChip); err != nil {
		return p, err
	}
	if p.mem = cfg.Memory; p.mem == nil {
		if p.mem, err = kvm.NewMemory(RAMLayout(cfg.MemSize), kvm.MemoryOptions{Memfd: !cfg.AnonymousMemory, Name: "kvmkit-ram"}); err != nil {
			return p, err
		}
	} else if err = checkLayout(p.mem, cfg.MemSize); err != nil {
		return p, err
	}
	if err = p.vm.AddMemory(p.mem, 0, 0); err != nil {
		return p, err
	}
	if err = p.createVCPUs(cfg.CPUs); err != nil {
		return p, err
	}
	return p, nil
}

func setupPlatform(vm *kvm.VM, noIRQChip bool) error {
	if err := vm.SetTSSAddr(tssAddr); err != nil {
		return err
	}
	if err := vm.SetIdentityMapAddr(identityMap); err != nil {
		return err
	}
	if noIRQChip {
		return nil
	}
	if err := vm.CreateIRQChip(); err != nil {
		return err
	}
	return vm.CreatePIT2(kvm.PITSpeakerDummy)
}

func (p *kvmParts) createVCPUs(n int) error {
	supported, err := p.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	for i := range n {
		c, err := p.vm.CreateVCPU(i)
		if err != nil {
			return err
		}
		p.vcpus = append(p.vcpus, c)
		entries := cpuidFor(supported, i, n)
		if err := c.SetCPUID(entries); err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
		p.cpuid = append(p.cpuid, entries)
	}
	// SaveState's first call would otherwise find the readable MSRs inside
	// a migration's downtime; the vCPU is not running yet, so ask now.
	if len(p.vcpus) > 0 {
		if err := p.vcpus[0].ProbeMSRs(); err != nil {
			return err
		}
	}
	return nil
}

// close releases the vCPUs, VM, memory and (when owned) the system handle.
func (p *kvmParts) close() error {
	var errs []error
	for _, c := range p.vcpus {
		errs = append(errs, c.Close())
	}
	if p.vm != nil {
		errs = append(errs, p.vm.Close())
	}
	if p.mem != nil {
		errs = append(errs, p.mem.Close())
	}
	if p.ownSys && p.sys != nil {
		errs = append(errs, p.sys.Close())
	}
	*p = kvmParts{}
	return errors.Join(errs...)
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

// Shell is the KVM side of a machine built ahead of need: the VM with its
// platform (TSS, identity map, in-kernel irqchip and PIT), zero-filled RAM
// registered as its memory slots, and the vCPUs with CPUID set and readable
// MSRs probed. Creating those is most of what New costs (KVM_CREATE_VM
// alone is the largest part); a machine built on a shell only adds its
// devices. Pass it as Config.Shell, or keep shells ready in a Pool.
//
// A shell's vCPUs have never run, so a machine built on it can boot a
// guest or restore a saved state alike. A Shell is used by at most one
// machine; Close releases one that was never used.
type Shell struct {
	mu    sync.Mutex
	parts kvmParts
	shape shape
}

// NewShell builds a shell for cfg's MemSize, CPUs, NoIRQChip,
// AnonymousMemory and Device (System, if set, is used instead of opening
// Device; the other fields are the machine's business and ignored).
func NewShell(cfg Config) (*Shell, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	cfg.Memory = nil
	p, err := buildParts(cfg)
	if err != nil {
		return nil, err
	}
	return &Shell{parts: p, shape: shapeOf(cfg)}, nil
}

// take hands the parts over (once; later calls get none).
func (s *Shell) take() (kvmParts, shape) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.parts
	s.parts = kvmParts{}
	return p, s.shape
}

// Close releases a shell no machine took. Closing a shell a machine took
// does nothing: the machine owns its parts.
func (s *Shell) Close() error {
	p, _ := s.take()
	return p.close()
}
