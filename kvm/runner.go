package kvm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrStopped is returned by Pause and Resume after the run has ended.
var ErrStopped = errors.New("VM is not running")

// RunnerOptions configure a Runner.
type RunnerOptions struct {
	PIO    *Bus         // port I/O bus (required)
	MMIO   *Bus         // MMIO bus (required)
	Logger *slog.Logger // nil: slog.Default()
	// ThreadInit, if set, runs on each vCPU's locked OS thread before its
	// first KVM_RUN (for example to install a per-thread seccomp filter).
	// An error ends the run.
	ThreadInit func(vcpu int) error
}

// Runner runs a VM's vCPUs: one goroutine per vCPU, locked to its OS
// thread, issuing KVM_RUN in a loop and dispatching port I/O and MMIO
// exits straight from the kvm_run page to the buses (no allocation, no
// channel hop). It pauses and resumes all vCPUs, throttles them for
// migration, and ends the run on a stop request, a guest crash or context
// cancellation.
type Runner struct {
	vcpus []*VCPU
	pio   *Bus
	mmio  *Bus
	log   *slog.Logger
	init  func(vcpu int) error

	mu       sync.Mutex
	cond     *sync.Cond
	pauseReq bool
	parked   int // loops parked (paused, halted or finished)
	finished bool
	result   Result
	err      error
	started  bool

	park     atomic.Bool   // fast-path flag: a loop must come to park()
	exits    atomic.Uint64 // total exits handled, a progress counter
	throttle atomic.Uint64 // math.Float64bits of the throttle fraction
	done     chan struct{}
}

// NewRunner returns a Runner for vcpus on the given buses.
func NewRunner(vcpus []*VCPU, opts RunnerOptions) *Runner {
	r := &Runner{vcpus: vcpus, pio: opts.PIO, mmio: opts.MMIO, log: opts.Logger, init: opts.ThreadInit, done: make(chan struct{})}
	if r.log == nil {
		r.log = slog.Default()
	}
	if r.pio == nil {
		r.pio = NewBus()
	}
	if r.mmio == nil {
		r.mmio = NewBus()
	}
	r.cond = sync.NewCond(&r.mu)
	return r
}

// VCPUs returns the vCPUs.
func (r *Runner) VCPUs() []*VCPU { return r.vcpus }

// Exits returns the number of exits handled so far (a progress counter for
// watchdogs and statistics).
func (r *Runner) Exits() uint64 { return r.exits.Load() }

// Done is closed when the run has ended.
func (r *Runner) Done() <-chan struct{} { return r.done }

// Run runs every vCPU until the guest stops, crashes, Stop is called or
// ctx ends. It returns the Result on a clean stop; a *GuestCrash (wrapping
// ErrGuestCrash) on a crash; ctx.Err() with Reason StopCanceled when ctx
// ended. Run may be called once.
func (r *Runner) Run(ctx context.Context) (Result, error) {
	r.mu.Lock()
	if r.started {
		r.mu.Unlock()
		return Result{}, errors.New("runner: Run called twice")
	}
	r.started = true
	r.mu.Unlock()

	var wg sync.WaitGroup
	for i := range r.vcpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.loop(r.vcpus[i])
		}()
	}
	stopThrottle := make(chan struct{})
	go r.throttler(stopThrottle)
	go func() {
		select {
		case <-ctx.Done():
			r.finish(Result{Reason: StopCanceled}, ctx.Err())
		case <-r.done:
		}
	}()
	wg.Wait()
	close(stopThrottle)
	r.mu.Lock()
	res, err := r.result, r.err
	r.mu.Unlock()
	return res, err
}

// Stop ends the run with res (for example the exit port's code). The first
// Stop or crash wins; later ones are ignored.
func (r *Runner) Stop(res Result) { r.finish(res, nil) }

// Fail ends the run with err (for example a *GuestCrash from a device).
func (r *Runner) Fail(err error) { r.finish(Result{}, err) }

func (r *Runner) finish(res Result, err error) {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return
	}
	r.finished = true
	r.result, r.err = res, err
	r.park.Store(true)
	close(r.done)
	r.cond.Broadcast()
	r.mu.Unlock()
	r.kickAll()
}

func (r *Runner) kickAll() {
	for _, c := range r.vcpus {
		c.Kick()
	}
}

// Pause stops every vCPU outside KVM_RUN and returns once none runs (or
// ctx ends, in which case the pause request is withdrawn). While paused,
// vCPU and VM state may be saved or restored.
func (r *Runner) Pause(ctx context.Context) error {
	r.mu.Lock()
	if r.finished {
		r.mu.Unlock()
		return ErrStopped
	}
	r.pauseReq = true
	r.park.Store(true)
	r.mu.Unlock()
	r.kickAll()

	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.parked < len(r.vcpus) && !r.finished {
		if ctx.Err() != nil {
			r.pauseReq = false
			r.park.Store(false)
			r.cond.Broadcast()
			return ctx.Err()
		}
		if r.started {
			r.cond.Wait()
		} else {
			break // not running yet: nothing to wait for
		}
	}
	if r.finished {
		return ErrStopped
	}
	return nil
}

// Resume lets paused vCPUs run again.
func (r *Runner) Resume() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished {
		return ErrStopped
	}
	r.pauseReq = false
	r.park.Store(false)
	r.cond.Broadcast()
	return nil
}

// Paused reports whether a pause is in effect.
func (r *Runner) Paused() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pauseReq
}

// throttlePeriod is how long a throttled vCPU runs between forced sleeps.
const throttlePeriod = 10 * time.Millisecond

// Throttle keeps vCPUs out of the guest for fraction (0 to 0.99) of the
// time, for migration auto-converge. 0 turns throttling off.
func (r *Runner) Throttle(fraction float64) {
	fraction = math.Max(0, math.Min(fraction, 0.99))
	r.throttle.Store(math.Float64bits(fraction))
}

func (r *Runner) throttleFraction() float64 { return math.Float64frombits(r.throttle.Load()) }

// throttler kicks the vCPUs every throttlePeriod while throttling is on,
// so that even a guest that never exits is held back.
func (r *Runner) throttler(stop <-chan struct{}) {
	t := time.NewTicker(throttlePeriod)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if r.throttleFraction() > 0 {
				r.kickAll()
			}
		}
	}
}

// parkLoop blocks a vCPU loop while a pause is requested. It returns false
// when the run has finished and the loop must return.
func (r *Runner) parkLoop() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.parked++
	r.cond.Broadcast()
	for r.pauseReq && !r.finished {
		r.cond.Wait()
	}
	r.parked--
	return !r.finished
}

func (r *Runner) loop(c *VCPU) {
	runtime.LockOSThread()
	// The thread stays locked: the goroutine exits when the run ends and
	// the runtime then retires the thread, with any per-thread state
	// (seccomp filters, signal masks) it was given.
	c.BindThread()
	defer c.UnbindThread()
	defer func() {
		if p := recover(); p != nil {
			r.finish(Result{}, &GuestCrash{Kind: CrashRunError, VCPU: c.id, Detail: fmt.Sprintf("vCPU loop panic: %v", p)})
		}
		r.mu.Lock()
		r.parked++ // a finished loop never runs again
		r.cond.Broadcast()
		r.mu.Unlock()
	}()
	// pending is true after a port-I/O or MMIO exit: KVM finishes such an
	// instruction (stores an IN's data, advances RIP) only on the next
	// KVM_RUN, so before parking, a run with immediate_exit completes it
	// without executing anything else; saved state is then exact.
	pending := false
	if r.init != nil {
		if err := r.init(c.id); err != nil {
			r.finish(Result{}, fmt.Errorf("vCPU %d thread set-up: %w", c.id, err))
			return
		}
	}
	for {
		if r.park.Load() {
			if pending {
				c.SetImmediateExit(true)
				_ = c.Run() // returns EINTR once the operation is complete
				c.SetImmediateExit(false)
				pending = false
			}
			if !r.parkLoop() {
				return
			}
		}
		err := c.Run()
		pending = false
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				c.SetImmediateExit(false)
				if f := r.throttleFraction(); f > 0 {
					time.Sleep(time.Duration(float64(throttlePeriod) * f / (1 - f)))
				}
				continue
			}
			if errors.Is(err, unix.EAGAIN) {
				continue
			}
			r.finish(Result{}, r.crash(c, CrashRunError, ExitUnknown, "", err))
			return
		}
		r.exits.Add(1)
		if stop := r.handleExit(c); stop {
			return
		}
		reason := c.ExitReason()
		pending = reason == ExitIO || reason == ExitMMIO
	}
}

// handleExit dispatches one exit. It returns true when the loop must end.
func (r *Runner) handleExit(c *VCPU) bool {
	run := c.run
	reason := ExitReason(binary.LittleEndian.Uint32(run[runExitReason:]))
	switch reason {
	case ExitIO:
		r.handleIO(c)
	case ExitMMIO:
		addr := binary.LittleEndian.Uint64(run[runExitUnion:])
		n := binary.LittleEndian.Uint32(run[runExitUnion+16:])
		if n > 8 {
			n = 8
		}
		data := run[runExitUnion+8 : runExitUnion+8+int(n)]
		if run[runExitUnion+20] != 0 {
			r.mmio.Write(addr, data)
		} else {
			r.mmio.Read(addr, data)
		}
	case ExitHLT:
		// Without an in-kernel irqchip nothing can wake a halted vCPU:
		// its loop ends and counts as parked; the others run on.
		return true
	case ExitIntr, ExitIRQWindowOpen, ExitIOAPICEOI, ExitTPRAccess, ExitSetTPR:
		// Nothing to do: the next KVM_RUN continues.
	case ExitShutdown:
		r.finish(Result{}, r.crash(c, CrashTripleFault, reason, "", nil))
		return true
	case ExitFailEntry:
		hw := binary.LittleEndian.Uint64(run[runExitUnion:])
		r.finish(Result{}, r.crash(c, CrashFailEntry, reason, fmt.Sprintf("hardware entry failure reason %#x", hw), nil))
		return true
	case ExitInternalError:
		sub := binary.LittleEndian.Uint32(run[runExitUnion:])
		r.finish(Result{}, r.crash(c, CrashInternalError, reason, internalErrorDetail(sub), nil))
		return true
	case ExitSystemEvent:
		typ := binary.LittleEndian.Uint32(run[runExitUnion:])
		switch typ {
		case SystemEventShutdown:
			r.finish(Result{Reason: StopPowerOff}, nil)
		case SystemEventReset:
			r.finish(Result{Reason: StopReset}, nil)
		default:
			r.finish(Result{}, r.crash(c, CrashSystemEvent, reason, fmt.Sprintf("system event type %d", typ), nil))
		}
		return true
	default:
		r.finish(Result{}, r.crash(c, CrashUnhandledExit, reason, "exit reason "+reason.String(), nil))
		return true
	}
	return false
}

func (r *Runner) handleIO(c *VCPU) {
	run := c.run
	u := run[runExitUnion:]
	dirOut := u[0] == 1
	size := uint64(u[1])
	port := uint64(binary.LittleEndian.Uint16(u[2:]))
	count := uint64(binary.LittleEndian.Uint32(u[4:]))
	off := binary.LittleEndian.Uint64(u[8:])
	if size == 0 || size > 8 || off > uint64(len(run)) || count > (uint64(len(run))-off)/size {
		return // malformed: cannot happen with a sane kernel; ignore rather than panic
	}
	for i := uint64(0); i < count; i++ {
		data := run[off+i*size : off+(i+1)*size]
		if dirOut {
			r.pio.Write(port, data)
		} else {
			r.pio.Read(port, data)
		}
	}
}

func internalErrorDetail(sub uint32) string {
	switch sub {
	case 1:
		return "emulation failure (suberror 1)"
	case 2:
		return "simultaneous exceptions (suberror 2)"
	case 3:
		return "delivery event failure (suberror 3)"
	case 4:
		return "unexpected exit reason from hardware (suberror 4)"
	default:
		return fmt.Sprintf("suberror %d", sub)
	}
}

func (r *Runner) crash(c *VCPU, kind CrashKind, exit ExitReason, detail string, err error) *GuestCrash {
	gc := &GuestCrash{Kind: kind, VCPU: c.id, Exit: exit, Detail: detail, Err: err}
	if regs, e := c.Regs(); e == nil {
		gc.RIP = regs.RIP
	}
	r.log.Debug("guest crash", "vcpu", c.id, "kind", kind.String(), "rip", gc.RIP, "detail", detail)
	return gc
}

// ReserveProcs raises GOMAXPROCS to at least runtime.NumCPU()+vcpus, for a
// process that runs vcpus vCPU threads. A vCPU goroutine spends its life
// inside KVM_RUN, a system call during which Go keeps its P until the
// runtime's monitor takes it back (after 20 µs to 10 ms); with GOMAXPROCS
// equal to the CPU count a device goroutine woken by that vCPU (a virtio
// queue kick) can wait that long for a P, which adds milliseconds to every
// request on a host with few CPUs. It never lowers GOMAXPROCS and returns
// the value in effect. It changes a process-wide setting, so the
// application (not a library) decides to call it.
func ReserveProcs(vcpus int) int {
	want := runtime.NumCPU() + max(vcpus, 0)
	if cur := runtime.GOMAXPROCS(0); cur >= want {
		return cur
	}
	runtime.GOMAXPROCS(want)
	return want
}
