// Package migrationtest provides FakeVM, a pure-Go VM that implements
// migration.Source and migration.Target, for testing live migration and
// snapshots without /dev/kvm.
//
// Its "guest" is one goroutine per vCPU. Each vCPU owns a working set of
// pages and rewrites them in order, forever: the page it is about to write
// must hold the previous pass's contents (pass counter, page number and a
// fill derived from both), so a page lost, stale or torn by a migration is
// detected by the guest itself, like the real dirtying test guest. Writes
// are tracked in per-region dirty bitmaps under a mutex, emulating KVM dirty
// logging; Pause parks every vCPU; Throttle keeps vCPUs out for a fraction
// of the time. The rest of RAM holds seeded static data and zero pages.
package migrationtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
)

const pageSize = kvm.PageSize

// Options configure a FakeVM. Zero fields take the defaults given.
type Options struct {
	// Regions is the RAM layout; default one 16 MiB region at 0.
	Regions []kvm.RegionSpec
	// VCPUs is the number of vCPU goroutines; default 2.
	VCPUs int
	// WorkingSetPages is the number of pages each vCPU rewrites; default 64.
	WorkingSetPages int
	// DirtyRate is the pages each vCPU writes per second of run time; 0
	// writes as fast as it can. Like Seed, FillPercent and WorkingSetPages
	// it is guest behaviour: it travels in the saved state, a target
	// ignores its own.
	DirtyRate int
	// Seed selects the static contents; default 1.
	Seed uint64
	// FillPercent is the share of pages outside the working sets that hold
	// data (the rest are zero); default 67, -1 for none.
	FillPercent int
	// CPUID is what this VM offers. As a target, Prepare rejects a config
	// whose CPUID differs (when both are set).
	CPUID []byte
	// Devices is the device list; as a target, Prepare rejects a config
	// whose list differs (when set).
	Devices []string
	// DeviceState is opaque device state carried in SaveState.
	DeviceState []byte
	// FailLoadState and FailResume make the target fail those steps.
	FailLoadState, FailResume error
	// NoResumeCheck skips the memory check and hash a target makes at its
	// first Resume (they count as downtime: benchmarks skip them).
	NoResumeCheck bool
	// FailDirtyBitmap makes DirtyBitmap fail after that many calls (0 never).
	FailDirtyBitmap int
	// Memfd backs RAM with memfds, as kvm/machine does: never-written pages
	// are file holes, which the full pass skips.
	Memfd bool
}

func (o Options) withDefaults() Options {
	if len(o.Regions) == 0 {
		o.Regions = []kvm.RegionSpec{{GPA: 0, Size: 16 << 20}}
	}
	if o.VCPUs <= 0 {
		o.VCPUs = 2
	}
	if o.WorkingSetPages <= 0 {
		o.WorkingSetPages = 64
	}
	if o.Seed == 0 {
		o.Seed = 1
	}
	if o.FillPercent == 0 {
		o.FillPercent = 67
	}
	return o
}

type cursor struct {
	pass uint64 // pass being written; pages before next hold pass, the rest pass-1
	next uint64 // index in the working set
}

// FakeVM is a fake VM; see the package documentation. All methods are safe
// for concurrent use unless noted.
type FakeVM struct {
	opts Options

	mu      sync.Mutex // guest writes, dirty bitmaps, logging flag
	mem     *kvm.Memory
	regions []kvm.Region
	first   []uint64 // global index of each region's first page
	pages   uint64
	dirty   [][]uint64
	logging bool
	harvest int

	runMu    sync.Mutex
	cond     *sync.Cond
	cpus     []cursor
	started  bool
	alive    int
	parked   int
	paused   atomic.Bool // requested
	stopped  atomic.Bool
	isPaused bool
	wg       sync.WaitGroup
	devState []byte
	aborted  bool
	resumeH  [32]byte

	throttle    atomic.Uint64 // float64 bits
	maxThrottle atomic.Uint64
	writes      atomic.Uint64
	flushes     atomic.Int64
	announces   atomic.Int64
	errMu       sync.Mutex
	err         error
}

func newFake(opts Options) *FakeVM {
	vm := &FakeVM{opts: opts.withDefaults()}
	vm.cond = sync.NewCond(&vm.runMu)
	return vm
}

// NewSource returns a running fake VM: memory filled, vCPUs dirtying.
func NewSource(opts Options) (*FakeVM, error) {
	vm := newFake(opts)
	if err := vm.allocate(vm.opts.Regions); err != nil {
		return nil, err
	}
	w := uint64(vm.opts.WorkingSetPages)
	if uint64(vm.opts.VCPUs)*w > vm.pages {
		vm.mem.Close()
		return nil, fmt.Errorf("fake vm: %d vCPUs x %d working-set pages exceed %d pages of RAM", vm.opts.VCPUs, w, vm.pages)
	}
	vm.cpus = make([]cursor, vm.opts.VCPUs)
	for g := uint64(0); g < vm.pages; g++ {
		p := vm.page(g)
		if g < uint64(vm.opts.VCPUs)*w {
			fillPage(p, vm.opts.Seed, g, 0)
		} else if !staticZero(vm.opts.Seed, g, vm.opts.FillPercent) {
			// Fresh RAM is zero: zero pages are left untouched.
			staticPage(p, vm.opts.Seed, g, vm.opts.FillPercent)
		}
	}
	for i := range vm.cpus {
		vm.cpus[i] = cursor{pass: 1}
	}
	vm.devState = append([]byte(nil), vm.opts.DeviceState...)
	vm.runMu.Lock()
	vm.startLocked()
	vm.runMu.Unlock()
	return vm, nil
}

// NewTarget returns an empty fake VM waiting for migration.Receive or
// migration.Restore to build it.
func NewTarget(opts Options) *FakeVM { return newFake(opts) }

func (vm *FakeVM) allocate(specs []kvm.RegionSpec) error {
	mem, err := kvm.NewMemory(specs, kvm.MemoryOptions{Memfd: vm.opts.Memfd, Name: "fakevm"})
	if err != nil {
		return err
	}
	return vm.adopt(mem)
}

func (vm *FakeVM) adopt(mem *kvm.Memory) error {
	vm.mem = mem
	vm.regions = mem.Regions()
	vm.first = make([]uint64, len(vm.regions))
	vm.dirty = make([][]uint64, len(vm.regions))
	vm.pages = 0
	for i, r := range vm.regions {
		vm.first[i] = vm.pages
		vm.pages += uint64(len(r.Host)) / pageSize
		vm.dirty[i] = make([]uint64, migration.BitmapWords(uint64(len(r.Host))))
	}
	return nil
}

// page returns global page g's bytes and marks nothing.
func (vm *FakeVM) page(g uint64) []byte {
	r, off := vm.locate(g)
	return vm.regions[r].Host[off*pageSize : (off+1)*pageSize]
}

func (vm *FakeVM) locate(g uint64) (region int, page uint64) {
	for i := len(vm.first) - 1; i >= 0; i-- {
		if g >= vm.first[i] {
			return i, g - vm.first[i]
		}
	}
	return 0, g
}

func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// fillPage writes the working-set contents of page g at pass p.
func fillPage(b []byte, seed, g, p uint64) {
	binary.LittleEndian.PutUint64(b[0:], p)
	binary.LittleEndian.PutUint64(b[8:], g)
	base := mix(seed ^ g<<20 ^ p<<44)
	for i := 16; i < pageSize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], base+uint64(i))
	}
}

// checkPage verifies page g holds pass p.
func checkPage(b []byte, seed, g, p uint64) error {
	if got := binary.LittleEndian.Uint64(b[0:]); got != p {
		return fmt.Errorf("page %d holds pass %d, want %d", g, got, p)
	}
	if got := binary.LittleEndian.Uint64(b[8:]); got != g {
		return fmt.Errorf("page %d holds the number %d", g, got)
	}
	base := mix(seed ^ g<<20 ^ p<<44)
	for i := 16; i < pageSize; i += 8 {
		if binary.LittleEndian.Uint64(b[i:]) != base+uint64(i) {
			return fmt.Errorf("page %d pass %d: torn or corrupt at byte %d", g, p, i)
		}
	}
	return nil
}

// staticPage writes the seeded static contents of page g: fill percent of
// the pages hold data (half of them only in their first half), the rest
// are zero.
func staticPage(b []byte, seed, g uint64, fill int) {
	if staticZero(seed, g, fill) {
		clear(b)
		return
	}
	h := mix(seed ^ g*0x9e3779b97f4a7c15)
	n := pageSize
	if h&(1<<40) != 0 {
		n = pageSize / 2
	}
	clear(b[n:])
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], mix(h+uint64(i)))
	}
}

// staticZero reports whether static page g is a zero page.
func staticZero(seed, g uint64, fill int) bool {
	return fill <= 0 || mix(seed^g*0x9e3779b97f4a7c15)%100 >= uint64(fill)
}

func (vm *FakeVM) setErr(err error) {
	vm.errMu.Lock()
	if vm.err == nil {
		vm.err = err
	}
	vm.errMu.Unlock()
}

// Err returns the first inconsistency the guest found, or nil.
func (vm *FakeVM) Err() error {
	vm.errMu.Lock()
	defer vm.errMu.Unlock()
	return vm.err
}

// step makes vCPU v write its next page.
func (vm *FakeVM) step(v int) {
	c := &vm.cpus[v]
	w := uint64(vm.opts.WorkingSetPages)
	g := uint64(v)*w + c.next
	vm.mu.Lock()
	p := vm.page(g)
	if err := checkPage(p, vm.opts.Seed, g, c.pass-1); err != nil {
		vm.setErr(fmt.Errorf("vcpu %d: %w", v, err))
	}
	fillPage(p, vm.opts.Seed, g, c.pass)
	if vm.logging {
		r, off := vm.locate(g)
		vm.dirty[r][off/64] |= 1 << (off % 64)
	}
	vm.mu.Unlock()
	vm.writes.Add(1)
	c.next++
	if c.next == w {
		c.next = 0
		c.pass++
	}
}

// startLocked starts the vCPU goroutines; runMu held.
func (vm *FakeVM) startLocked() {
	vm.started = true
	vm.alive = len(vm.cpus)
	for v := range vm.cpus {
		vm.wg.Add(1)
		go vm.runVCPU(v)
	}
}

// gate parks the vCPU while paused; false means stop.
func (vm *FakeVM) gate() bool {
	if !vm.paused.Load() && !vm.stopped.Load() {
		return true
	}
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	for vm.paused.Load() && !vm.stopped.Load() {
		vm.parked++
		vm.cond.Broadcast()
		vm.cond.Wait()
		vm.parked--
	}
	return !vm.stopped.Load()
}

// nap sleeps d in small steps, returning early when a pause or stop is
// requested.
func (vm *FakeVM) nap(d time.Duration) {
	end := time.Now().Add(d)
	for {
		if vm.paused.Load() || vm.stopped.Load() {
			return
		}
		left := time.Until(end)
		if left <= 0 {
			return
		}
		if left > time.Millisecond {
			left = time.Millisecond
		}
		time.Sleep(left)
	}
}

func (vm *FakeVM) runVCPU(v int) {
	defer func() {
		vm.runMu.Lock()
		vm.alive--
		vm.cond.Broadcast()
		vm.runMu.Unlock()
		vm.wg.Done()
	}()
	quantum := time.Millisecond
	perQuantum := 0
	if r := vm.opts.DirtyRate; r > 0 {
		perQuantum = r / 1000
		if perQuantum < 1 {
			perQuantum = 1
			quantum = time.Second / time.Duration(r)
		}
	}
	for vm.gate() {
		start := time.Now()
		for n := 1; ; n++ {
			vm.step(v)
			if vm.paused.Load() || vm.stopped.Load() {
				break
			}
			if perQuantum > 0 && n >= perQuantum {
				break
			}
			if perQuantum == 0 && n%8 == 0 && time.Since(start) >= quantum {
				break
			}
		}
		if perQuantum > 0 {
			vm.nap(time.Until(start.Add(quantum)))
		}
		if f := math.Float64frombits(vm.throttle.Load()); f > 0 {
			vm.nap(time.Duration(float64(quantum) * f / (1 - f)))
		}
	}
}

// Config implements migration.Source.
func (vm *FakeVM) Config() migration.Config {
	cfg := migration.Config{VCPUs: len(vm.cpus), CPUID: vm.opts.CPUID, Devices: vm.opts.Devices}
	for _, r := range vm.regions {
		cfg.Regions = append(cfg.Regions, migration.RegionConfig{GPA: r.GPA, Size: uint64(len(r.Host))})
	}
	return cfg
}

// Memory implements migration.Source.
func (vm *FakeVM) Memory() []kvm.Region { return vm.regions }

// StartDirtyLog implements migration.Source: every page starts clean.
func (vm *FakeVM) StartDirtyLog() error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.logging = true
	for _, bm := range vm.dirty {
		clear(bm)
	}
	return nil
}

// DirtyBitmap implements migration.Source.
func (vm *FakeVM) DirtyBitmap(region int, bitmap []uint64) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.harvest++
	if n := vm.opts.FailDirtyBitmap; n > 0 && vm.harvest > n {
		return errors.New("fake vm: injected dirty bitmap failure")
	}
	if !vm.logging {
		return errors.New("fake vm: dirty logging is off")
	}
	if region < 0 || region >= len(vm.dirty) || len(bitmap) != len(vm.dirty[region]) {
		return fmt.Errorf("fake vm: bad dirty bitmap request for region %d (%d words)", region, len(bitmap))
	}
	copy(bitmap, vm.dirty[region])
	clear(vm.dirty[region])
	return nil
}

// StopDirtyLog implements migration.Source.
func (vm *FakeVM) StopDirtyLog() error {
	vm.mu.Lock()
	vm.logging = false
	vm.mu.Unlock()
	return nil
}

// DirtyLogging reports whether dirty logging is on.
func (vm *FakeVM) DirtyLogging() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.logging
}

// Pause implements migration.Source: it returns once every vCPU is parked.
func (vm *FakeVM) Pause(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		vm.runMu.Lock()
		vm.cond.Broadcast()
		vm.runMu.Unlock()
	})
	defer stop()
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	vm.paused.Store(true)
	for vm.parked < vm.alive {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("fake vm: pause: %w", err)
		}
		vm.cond.Wait()
	}
	vm.isPaused = true
	return nil
}

// Resume implements migration.Source and migration.Target. On a target the
// first Resume checks the whole guest memory against the vCPU cursors (the
// guest's self-check), records a hash of it (ResumeHash), then starts the
// vCPUs.
func (vm *FakeVM) Resume() error {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	if vm.mem == nil || vm.aborted {
		return errors.New("fake vm: resume: no VM")
	}
	if !vm.started {
		if vm.opts.FailResume != nil {
			return vm.opts.FailResume
		}
		if !vm.opts.NoResumeCheck {
			if err := vm.checkMemoryLocked(); err != nil {
				vm.setErr(err)
			}
			vm.resumeH = vm.hashLocked()
		}
		vm.paused.Store(false)
		vm.isPaused = false
		vm.startLocked()
		return nil
	}
	vm.paused.Store(false)
	vm.isPaused = false
	vm.cond.Broadcast()
	return nil
}

// Throttle implements migration.Source.
func (vm *FakeVM) Throttle(fraction float64) {
	fraction = max(0, min(fraction, 0.99))
	vm.throttle.Store(math.Float64bits(fraction))
	for {
		old := vm.maxThrottle.Load()
		if math.Float64frombits(old) >= fraction || vm.maxThrottle.CompareAndSwap(old, math.Float64bits(fraction)) {
			return
		}
	}
}

// CurrentThrottle and MaxThrottle report the throttle now and the highest
// ever set.
func (vm *FakeVM) CurrentThrottle() float64 { return math.Float64frombits(vm.throttle.Load()) }

// MaxThrottle reports the highest throttle ever set.
func (vm *FakeVM) MaxThrottle() float64 { return math.Float64frombits(vm.maxThrottle.Load()) }

const stateMagic = "FAKEVM\x00\x01"

// SaveState implements migration.Source; the VM must be paused.
func (vm *FakeVM) SaveState() ([]byte, error) {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	if !vm.isPaused {
		return nil, errors.New("fake vm: save state while running")
	}
	b := []byte(stateMagic)
	b = binary.LittleEndian.AppendUint64(b, vm.opts.Seed)
	b = binary.LittleEndian.AppendUint64(b, uint64(vm.opts.WorkingSetPages))
	b = binary.LittleEndian.AppendUint64(b, uint64(vm.opts.DirtyRate))
	b = binary.LittleEndian.AppendUint64(b, uint64(int64(vm.opts.FillPercent)))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(vm.cpus)))
	for _, c := range vm.cpus {
		b = binary.LittleEndian.AppendUint64(b, c.pass)
		b = binary.LittleEndian.AppendUint64(b, c.next)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(vm.devState)))
	return append(b, vm.devState...), nil
}

// Flush implements migration.Source (counts calls).
func (vm *FakeVM) Flush() error {
	vm.flushes.Add(1)
	return nil
}

// Prepare implements migration.Target.
func (vm *FakeVM) Prepare(cfg migration.Config) ([]kvm.Region, error) {
	if err := vm.checkConfig(cfg); err != nil {
		return nil, err
	}
	specs := make([]kvm.RegionSpec, len(cfg.Regions))
	for i, r := range cfg.Regions {
		specs[i] = kvm.RegionSpec{GPA: r.GPA, Size: r.Size}
	}
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	if vm.mem != nil {
		return nil, errors.New("fake vm: prepared twice")
	}
	if err := vm.allocate(specs); err != nil {
		return nil, err
	}
	vm.cpus = make([]cursor, cfg.VCPUs)
	return vm.regions, nil
}

// PrepareWithMemory implements migration.MemoryAdopter: the VM takes the
// regions (and unmaps them on Stop).
func (vm *FakeVM) PrepareWithMemory(cfg migration.Config, regions []kvm.Region) error {
	if err := vm.checkConfig(cfg); err != nil {
		return err
	}
	mem, err := kvm.NewMemoryFromRegions(regions)
	if err != nil {
		return err
	}
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	if vm.mem != nil {
		mem.Close()
		return errors.New("fake vm: prepared twice")
	}
	vm.cpus = make([]cursor, cfg.VCPUs)
	return vm.adopt(mem)
}

func (vm *FakeVM) checkConfig(cfg migration.Config) error {
	if len(vm.opts.CPUID) > 0 && len(cfg.CPUID) > 0 && !bytes.Equal(vm.opts.CPUID, cfg.CPUID) {
		return fmt.Errorf("fake vm: CPUID mismatch: guest was started with %q, this host offers %q", cfg.CPUID, vm.opts.CPUID)
	}
	if vm.opts.Devices != nil && fmt.Sprint(vm.opts.Devices) != fmt.Sprint(cfg.Devices) {
		return fmt.Errorf("fake vm: device set %v differs from %v", cfg.Devices, vm.opts.Devices)
	}
	return nil
}

// LoadState implements migration.Target.
func (vm *FakeVM) LoadState(state []byte) error {
	if vm.opts.FailLoadState != nil {
		return vm.opts.FailLoadState
	}
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	if vm.mem == nil || vm.started {
		return errors.New("fake vm: load state before prepare or after resume")
	}
	if len(state) < len(stateMagic)+36 || string(state[:len(stateMagic)]) != stateMagic {
		return errors.New("fake vm: state: bad magic")
	}
	b := state[len(stateMagic):]
	seed := binary.LittleEndian.Uint64(b)
	w := binary.LittleEndian.Uint64(b[8:])
	rate := binary.LittleEndian.Uint64(b[16:])
	fill := int64(binary.LittleEndian.Uint64(b[24:]))
	n := binary.LittleEndian.Uint32(b[32:])
	b = b[36:]
	if int(n) != len(vm.cpus) || uint64(len(b)) < uint64(n)*16+4 {
		return fmt.Errorf("fake vm: state: %d vCPUs, config has %d", n, len(vm.cpus))
	}
	if w == 0 || w*uint64(n) > vm.pages {
		return fmt.Errorf("fake vm: state: working set %d x %d does not fit", w, n)
	}
	cpus := make([]cursor, n)
	for i := range cpus {
		cpus[i] = cursor{pass: binary.LittleEndian.Uint64(b), next: binary.LittleEndian.Uint64(b[8:])}
		b = b[16:]
		if cpus[i].pass == 0 || cpus[i].next >= w {
			return fmt.Errorf("fake vm: state: vCPU %d cursor out of range", i)
		}
	}
	dl := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if uint64(dl) != uint64(len(b)) {
		return errors.New("fake vm: state: device state length mismatch")
	}
	if rate > 1<<30 {
		return fmt.Errorf("fake vm: state: dirty rate %d out of range", rate)
	}
	if fill < -1 || fill > 100 {
		return fmt.Errorf("fake vm: state: fill percent %d out of range", fill)
	}
	vm.opts.Seed, vm.opts.WorkingSetPages, vm.opts.DirtyRate, vm.opts.FillPercent = seed, int(w), int(rate), int(fill)
	vm.cpus = cpus
	vm.devState = append([]byte(nil), b...)
	vm.isPaused = true
	return nil
}

// Announce implements migration.Target (counts calls).
func (vm *FakeVM) Announce() error {
	vm.announces.Add(1)
	return nil
}

// Abort implements migration.Target: the VM stops and frees its memory.
func (vm *FakeVM) Abort() {
	vm.runMu.Lock()
	vm.aborted = true
	vm.runMu.Unlock()
	vm.Stop()
}

// Stop stops the vCPUs and frees the memory. Idempotent.
func (vm *FakeVM) Stop() {
	vm.stopped.Store(true)
	vm.runMu.Lock()
	vm.cond.Broadcast()
	vm.runMu.Unlock()
	vm.wg.Wait()
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.mem != nil {
		vm.mem.Close()
		vm.mem = nil
		vm.regions = nil
	}
}

// Status is a snapshot of a FakeVM's life cycle.
type Status struct {
	Started, Paused, Aborted, Stopped bool
	Writes                            uint64 // pages written by the guest
	Flushes, Announces                int64
}

// Running reports that the guest runs: started, not paused, not stopped.
func (s Status) Running() bool { return s.Started && !s.Paused && !s.Stopped && !s.Aborted }

// Status returns the VM's status.
func (vm *FakeVM) Status() Status {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	return Status{
		Started: vm.started, Paused: vm.isPaused || vm.paused.Load(), Aborted: vm.aborted, Stopped: vm.stopped.Load(),
		Writes: vm.writes.Load(), Flushes: vm.flushes.Load(), Announces: vm.announces.Load(),
	}
}

// WaitWrites waits until the guest has written n more pages, or ctx ends:
// proof that it runs.
func (vm *FakeVM) WaitWrites(ctx context.Context, n uint64) error {
	target := vm.writes.Load() + n
	for vm.writes.Load() < target {
		select {
		case <-ctx.Done():
			return fmt.Errorf("fake vm: guest wrote %d of %d pages: %w", n-(target-vm.writes.Load()), n, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// CheckMemory verifies all of RAM against the vCPU cursors and the seed.
// The VM must be paused (or not yet started).
func (vm *FakeVM) CheckMemory() error {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	return vm.checkMemoryLocked()
}

func (vm *FakeVM) checkMemoryLocked() error {
	if vm.mem == nil {
		return errors.New("fake vm: no memory")
	}
	w := uint64(vm.opts.WorkingSetPages)
	want := make([]byte, pageSize)
	for g := uint64(0); g < vm.pages; g++ {
		p := vm.page(g)
		if v := g / w; v < uint64(len(vm.cpus)) {
			c := vm.cpus[v]
			pass := c.pass
			if g%w >= c.next {
				pass--
			}
			if err := checkPage(p, vm.opts.Seed, g, pass); err != nil {
				return fmt.Errorf("fake vm: memory check: vcpu %d: %w", v, err)
			}
			continue
		}
		staticPage(want, vm.opts.Seed, g, vm.opts.FillPercent)
		if !bytes.Equal(p, want) {
			return fmt.Errorf("fake vm: memory check: static page %d differs", g)
		}
	}
	return nil
}

// MemoryHash hashes all of RAM; the VM should be paused.
func (vm *FakeVM) MemoryHash() [32]byte {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	return vm.hashLocked()
}

func (vm *FakeVM) hashLocked() [32]byte {
	h := sha256.New()
	for _, r := range vm.regions {
		h.Write(r.Host)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// ResumeHash is the memory hash a target took at its first Resume, before
// its vCPUs ran.
func (vm *FakeVM) ResumeHash() [32]byte {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	return vm.resumeH
}

// DeviceState returns the opaque device state (loaded or configured).
func (vm *FakeVM) DeviceState() []byte {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	return append([]byte(nil), vm.devState...)
}

// Cursors returns each vCPU's (pass, next) position; the VM should be
// paused.
func (vm *FakeVM) Cursors() [][2]uint64 {
	vm.runMu.Lock()
	defer vm.runMu.Unlock()
	out := make([][2]uint64, len(vm.cpus))
	for i, c := range vm.cpus {
		out[i] = [2]uint64{c.pass, c.next}
	}
	return out
}

var (
	_ migration.Source        = (*FakeVM)(nil)
	_ migration.Target        = (*FakeVM)(nil)
	_ migration.MemoryAdopter = (*FakeVM)(nil)
)
