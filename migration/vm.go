package migration

import (
	"context"

	"github.com/kvmkit/kvmkit/kvm"
)

// Source is what a running VM offers to be saved or migrated. [Migrate] and
// the snapshot functions call it from one goroutine; the VM's vCPUs keep
// running concurrently until Pause.
//
// Ordering, as used by Migrate: Config, Memory, StartDirtyLog, (full pass
// reading Memory while the guest runs), DirtyBitmap per region per round,
// Throttle as needed, Pause, DirtyBitmap (final), Flush, SaveState, then on
// success StopDirtyLog and the VM stays paused (the target owns the guest:
// destroy the source); on failure Throttle(0), StopDirtyLog, Resume.
type Source interface {
	// Config describes the VM; Config().Regions[i] must describe Memory()[i].
	Config() Config
	// Memory returns the guest RAM host mappings, sorted by GPA. Migration
	// reads them while the guest runs (torn reads are repaired by the dirty
	// log) and never writes them.
	Memory() []kvm.Region
	// StartDirtyLog starts dirty-page tracking with every page clean: the
	// first DirtyBitmap reports pages written after StartDirtyLog returned.
	// Calling it while tracking is already on must not fail.
	StartDirtyLog() error
	// DirtyBitmap harvests and clears the dirty bits of region i since the
	// last call (or since StartDirtyLog): one bit per 4 KiB page, bit b of
	// word w is page 64*w+b; len(bitmap) == BitmapWords(region size). The
	// bitmap is overwritten, not ored. A page written after its bit was
	// harvested must be reported again by the next call (KVM write-protects
	// again on harvest).
	DirtyBitmap(region int, bitmap []uint64) error
	// StopDirtyLog stops tracking.
	StopDirtyLog() error
	// Pause stops all vCPUs and returns once none runs and no device writes
	// guest memory any more.
	Pause(ctx context.Context) error
	// Resume restarts the vCPUs after Pause.
	Resume() error
	// Throttle keeps vCPUs out of the guest for the given fraction of the
	// time (0 = full speed, at most 0.99): auto-converge.
	Throttle(fraction float64)
	// SaveState returns the vCPU, VM and device state, encoded and
	// versioned by the VM (opaque here). Called while paused.
	SaveState() ([]byte, error)
	// Flush writes buffered disk data to storage before the switch-over.
	// Called while paused.
	Flush() error
}

// Target builds a VM from an incoming config, receives memory, then state.
// [Receive] calls it from one goroutine in the order Prepare, (memory is
// written into the returned regions), LoadState, Resume, Announce; Abort on
// any failure, possibly after Resume (when the Ack could not be sent the
// source resumes, so the target must discard the guest).
type Target interface {
	// Prepare allocates RAM matching cfg (the regions returned must have
	// cfg's GPAs and sizes, in order, and be zero filled: the full pass
	// skips zero pages without writing them) and checks that the VM
	// can run here: an incompatible CPUID or device set is an error, whose
	// message the source sees.
	Prepare(cfg Config) ([]kvm.Region, error)
	// LoadState restores vCPU, VM and device state saved by Source.SaveState.
	LoadState(state []byte) error
	// Resume starts the vCPUs.
	Resume() error
	// Announce tells the network where the guest now is (for example a
	// RARP or gratuitous ARP for each guest MAC). Called after the Ack; an
	// error is reported but does not fail the migration.
	Announce() error
	// Abort discards the VM being built (or resumed) after a failure.
	Abort()
}

// MemoryAdopter is implemented by a Target that can run on memory it did
// not allocate. [Restore] uses it to hand over the private, lazily loaded
// mappings of a snapshot's memory file instead of copying them; the target
// owns the regions afterwards (unmap them with kvm.Memory.Close or
// unix.Munmap).
type MemoryAdopter interface {
	PrepareWithMemory(cfg Config, regions []kvm.Region) error
}
