package machine

import (
	"context"
	"errors"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/devices"
)

// ErrNotRunning is returned by Pause and Resume when the machine is not
// running.
var ErrNotRunning = errors.New("machine is not running")

// Start starts the vCPUs in the background. Wait returns how the run ended.
func (m *Machine) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errors.New("machine: closed")
	}
	if m.runner != nil {
		return errors.New("machine: already started")
	}
	r := kvm.NewRunner(m.vcpus, kvm.RunnerOptions{PIO: m.pio, MMIO: m.mmio, Logger: m.log, ThreadInit: m.cfg.VCPUThreadInit})
	m.runner = r
	m.runDone = make(chan struct{})
	done := m.runDone
	if m.cfg.Watchdog > 0 {
		if err := m.startWatchdog(ctx, r); err != nil {
			m.runner = nil
			return err
		}
	}
	go func() {
		res, err := r.Run(ctx)
		if err != nil && m.console != nil {
			var gc *kvm.GuestCrash
			if errors.As(err, &gc) && gc.Console == nil {
				gc.Console = m.console.Lines()
			}
		}
		if m.uart != nil {
			_ = m.uart.Flush()
		}
		if m.console != nil {
			m.console.EndLine()
		}
		m.mu.Lock()
		m.result, m.runErr = res, err
		m.mu.Unlock()
		close(done)
	}()
	return nil
}

// Wait blocks until the run started by Start ends, and returns its result
// (see kvm.Runner.Run).
func (m *Machine) Wait() (kvm.Result, error) {
	m.mu.Lock()
	done := m.runDone
	m.mu.Unlock()
	if done == nil {
		return kvm.Result{}, ErrNotRunning
	}
	<-done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.result, m.runErr
}

// Run starts the machine and waits for it: the guest's exit-port code,
// power-off or reset come back as a Result; a crash as a *kvm.GuestCrash;
// a canceled ctx as ctx.Err().
func (m *Machine) Run(ctx context.Context) (kvm.Result, error) {
	if err := m.Start(ctx); err != nil {
		return kvm.Result{}, err
	}
	return m.Wait()
}

// Runner returns the run loop, or nil before Start.
func (m *Machine) Runner() *kvm.Runner {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.runner
}

// Pauser is a device that can stop touching guest memory (a virtio
// transport with I/O threads). Machine.Pause pauses such state devices
// after the vCPUs; Resume resumes them before the vCPUs.
type Pauser interface {
	Pause()
	Resume()
}

// Pause stops all vCPUs outside the guest (see kvm.Runner.Pause), then
// pauses devices, so that nothing writes guest memory until Resume.
func (m *Machine) Pause(ctx context.Context) error {
	r := m.Runner()
	if r == nil {
		return ErrNotRunning
	}
	if err := r.Pause(ctx); err != nil {
		return err
	}
	for _, p := range m.pausers() {
		p.Pause()
	}
	return nil
}

// Resume restarts devices, then vCPUs, after Pause.
func (m *Machine) Resume() error {
	r := m.Runner()
	if r == nil {
		return ErrNotRunning
	}
	for _, p := range m.pausers() {
		p.Resume()
	}
	return r.Resume()
}

func (m *Machine) pausers() []Pauser {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Pauser
	for _, d := range m.stateDevs {
		if p, ok := d.(Pauser); ok {
			out = append(out, p)
		}
	}
	return out
}

// Stop ends the run as if the guest had stopped with res.
func (m *Machine) Stop(res kvm.Result) { m.stop(res) }

// Throttle holds vCPUs out of the guest for a fraction of the time.
func (m *Machine) Throttle(fraction float64) {
	if r := m.Runner(); r != nil {
		r.Throttle(fraction)
	}
}

func (m *Machine) stop(res kvm.Result) {
	if r := m.Runner(); r != nil {
		r.Stop(res)
	}
}

func (m *Machine) fail(err error) {
	if r := m.Runner(); r != nil {
		r.Fail(err)
	}
}

// startWatchdog ends the run with a CrashWatchdog crash when neither VM
// exits nor console bytes advance for cfg.Watchdog; a pause counts as
// progress.
func (m *Machine) startWatchdog(ctx context.Context, r *kvm.Runner) error {
	var pausedTicks uint64
	w, err := devices.NewWatchdog(devices.WatchdogConfig{
		Timeout: m.cfg.Watchdog,
		Progress: func() uint64 {
			if r.Paused() {
				pausedTicks++
			}
			return r.Exits() + m.uart.Stats().TxBytes + pausedTicks
		},
		OnStall: func(e *devices.StallError) {
			m.fail(&kvm.GuestCrash{Kind: kvm.CrashWatchdog, VCPU: -1, Err: e})
		},
	})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(ctx)
	go func() {
		<-r.Done()
		cancel()
	}()
	go func() { _ = w.Run(wctx) }()
	return nil
}
