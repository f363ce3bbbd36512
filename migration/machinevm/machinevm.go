// Package machinevm adapts a kvm/machine.Machine to the migration
// package's Source and Target interfaces, so a machine can be snapshotted,
// restored and live-migrated.
package machinevm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/kvm/x86"
	"github.com/kvmkit/kvmkit/migration"
)

// extraVersion versions the Extra blob of a migration.Config made here.
const extraVersion = 1

// Extra is the machine configuration carried in migration.Config.Extra: what
// a target needs to build an identical empty machine.
type Extra struct {
	Version   int
	MemSize   uint64
	CPUs      int
	NoIRQChip bool
	// App is opaque configuration of the program assembling the machine
	// (for example vmm's device flags), handed back to its Build function.
	App json.RawMessage `json:",omitempty"`
}

// Source offers a running machine to migration.Migrate and
// migration.SaveSnapshot.
type Source struct {
	M *machine.Machine
	// App is stored in Extra.App for the target's Build function.
	App json.RawMessage
	// FlushFunc, if set, replaces the machine's Flush (its disks' sync),
	// called while paused before the switch-over.
	FlushFunc func() error
}

var _ migration.Source = (*Source)(nil)

// Config implements migration.Source.
func (s *Source) Config() migration.Config {
	mc := s.M.Config()
	extra, _ := json.Marshal(Extra{Version: extraVersion, MemSize: mc.MemSize, CPUs: mc.CPUs, NoIRQChip: mc.NoIRQChip, App: s.App})
	var regions []migration.RegionConfig
	for _, r := range s.M.Mem().Regions() {
		regions = append(regions, migration.RegionConfig{GPA: r.GPA, Size: uint64(len(r.Host))})
	}
	return migration.Config{
		VCPUs:   len(s.M.VCPUs()),
		Regions: regions,
		CPUID:   EncodeCPUID(s.M.CPUID(0)),
		Devices: s.M.Devices(),
		Extra:   extra,
	}
}

// Memory implements migration.Source.
func (s *Source) Memory() []kvm.Region { return s.M.Mem().Regions() }

// StartDirtyLog implements migration.Source.
func (s *Source) StartDirtyLog() error { return s.M.StartDirtyLog() }

// DirtyBitmap implements migration.Source.
func (s *Source) DirtyBitmap(i int, bm []uint64) error { return s.M.DirtyBitmap(i, bm) }

// StopDirtyLog implements migration.Source.
func (s *Source) StopDirtyLog() error { return s.M.StopDirtyLog() }

// Pause implements migration.Source.
func (s *Source) Pause(ctx context.Context) error { return s.M.Pause(ctx) }

// Resume implements migration.Source.
func (s *Source) Resume() error { return s.M.Resume() }

// Throttle implements migration.Source.
func (s *Source) Throttle(f float64) { s.M.Throttle(f) }

// SaveState implements migration.Source.
func (s *Source) SaveState() ([]byte, error) {
	st, err := s.M.SaveState()
	if err != nil {
		return nil, err
	}
	return st.Bytes()
}

// Flush implements migration.Source.
func (s *Source) Flush() error {
	if s.FlushFunc == nil {
		return s.M.Flush()
	}
	return s.FlushFunc()
}

// BuildFunc builds an empty machine for an incoming VM: cfg carries the
// memory size, vCPUs and irqchip choice (and Memory when restoring from a
// snapshot's mapped file); app is the source's Extra.App.
type BuildFunc func(cfg machine.Config, app json.RawMessage) (*machine.Machine, error)

// Target receives a VM into a new machine.
type Target struct {
	// Build makes the machine (required). It should add the same devices
	// as the source, in the same order.
	Build BuildFunc
	// Base is the configuration Build starts from (serial sink, logger,
	// ...); memory size, vCPUs and irqchip come from the source.
	Base machine.Config
	// Ctx is the context the machine runs under after Resume.
	Ctx context.Context
	// OnAnnounce is called after the target owns the VM (announce NICs).
	OnAnnounce func(*machine.Machine) error
	// Logger; default slog.Default().
	Logger *slog.Logger

	// M is the machine, once Prepare succeeded.
	M *machine.Machine
}

var (
	_ migration.Target        = (*Target)(nil)
	_ migration.MemoryAdopter = (*Target)(nil)
)

// ErrIncompatible is wrapped when the incoming VM cannot run here.
var ErrIncompatible = errors.New("incompatible VM")

func (t *Target) prepare(cfg migration.Config, mem *kvm.Memory) error {
	if t.Build == nil {
		return errors.New("machinevm: Target.Build is nil")
	}
	var ex Extra
	if err := json.Unmarshal(cfg.Extra, &ex); err != nil {
		return fmt.Errorf("machinevm: config extra: %w", err)
	}
	if ex.Version != extraVersion {
		return fmt.Errorf("machinevm: config extra version %d, want %d: %w", ex.Version, extraVersion, ErrIncompatible)
	}
	if ex.CPUs != cfg.VCPUs {
		return fmt.Errorf("machinevm: %d vCPUs in extra, %d in config: %w", ex.CPUs, cfg.VCPUs, ErrIncompatible)
	}
	mc := t.Base
	mc.MemSize, mc.CPUs, mc.NoIRQChip, mc.Memory = ex.MemSize, ex.CPUs, ex.NoIRQChip, mem
	m, err := t.Build(mc, ex.App)
	if err != nil {
		return err
	}
	src, err := DecodeCPUID(cfg.CPUID)
	if err != nil {
		m.Close()
		return err
	}
	if err := x86.Compatible(src, m.CPUID(0)); err != nil {
		m.Close()
		return fmt.Errorf("machinevm: %w: %w", ErrIncompatible, err)
	}
	got := m.Mem().Regions()
	if len(got) != len(cfg.Regions) {
		m.Close()
		return fmt.Errorf("machinevm: %d memory regions here, %d in the source: %w", len(got), len(cfg.Regions), ErrIncompatible)
	}
	for i, r := range cfg.Regions {
		if got[i].GPA != r.GPA || uint64(len(got[i].Host)) != r.Size {
			m.Close()
			return fmt.Errorf("machinevm: region %d differs: %w", i, ErrIncompatible)
		}
	}
	if want, have := cfg.Devices, m.Devices(); !equalStrings(want, have) {
		m.Close()
		return fmt.Errorf("machinevm: devices %v here, %v in the source: %w", have, want, ErrIncompatible)
	}
	t.M = m
	return nil
}

// Prepare implements migration.Target.
func (t *Target) Prepare(cfg migration.Config) ([]kvm.Region, error) {
	if err := t.prepare(cfg, nil); err != nil {
		return nil, err
	}
	return t.M.Mem().Regions(), nil
}

// PrepareWithMemory implements migration.MemoryAdopter: the machine runs
// on regions (a snapshot's private mapping), loaded lazily.
func (t *Target) PrepareWithMemory(cfg migration.Config, regions []kvm.Region) error {
	mem, err := kvm.NewMemoryFromRegions(regions)
	if err != nil {
		return err
	}
	if err := t.prepare(cfg, mem); err != nil {
		if t.M == nil {
			mem.Close()
		}
		return err
	}
	return nil
}

// LoadState implements migration.Target.
func (t *Target) LoadState(b []byte) error {
	st, err := machine.DecodeState(bytes.NewReader(b))
	if err != nil {
		return err
	}
	return t.M.RestoreState(st)
}

// Resume implements migration.Target: the machine starts running.
func (t *Target) Resume() error {
	ctx := t.Ctx
	if ctx == nil {
		ctx = context.Background()
	}
	return t.M.Start(ctx)
}

// Announce implements migration.Target.
func (t *Target) Announce() error {
	if t.OnAnnounce == nil {
		return nil
	}
	return t.OnAnnounce(t.M)
}

// Abort implements migration.Target.
func (t *Target) Abort() {
	if t.M != nil {
		t.M.Close()
		t.M = nil
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// cpuidEntrySize is the encoded size of one CPUID entry.
const cpuidEntrySize = 28

// EncodeCPUID encodes CPUID entries for migration.Config.CPUID.
func EncodeCPUID(entries []kvm.CPUIDEntry) []byte {
	var b bytes.Buffer
	for _, e := range entries {
		for _, v := range []uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX} {
			_ = binary.Write(&b, binary.LittleEndian, v)
		}
	}
	return b.Bytes()
}

// DecodeCPUID decodes EncodeCPUID's output.
func DecodeCPUID(b []byte) ([]kvm.CPUIDEntry, error) {
	if len(b)%cpuidEntrySize != 0 {
		return nil, fmt.Errorf("machinevm: CPUID blob of %d bytes is not a multiple of %d", len(b), cpuidEntrySize)
	}
	r := bytes.NewReader(b)
	out := make([]kvm.CPUIDEntry, 0, len(b)/cpuidEntrySize)
	for r.Len() > 0 {
		var v [7]uint32
		if err := binary.Read(r, binary.LittleEndian, &v); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		out = append(out, kvm.CPUIDEntry{Function: v[0], Index: v[1], Flags: v[2], EAX: v[3], EBX: v[4], ECX: v[5], EDX: v[6]})
	}
	return out, nil
}
