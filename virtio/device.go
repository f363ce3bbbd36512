package virtio

import (
	"context"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// Device is a virtio device as seen by a transport. The transport owns the
// feature negotiation, status and queue configuration; the device supplies
// its identity, configuration space and request processing.
type Device interface {
	// Type returns the virtio device ID.
	Type() DeviceType
	// Features returns the device-specific feature bits offered. The
	// transport adds TransportFeatures.
	Features() uint64
	// QueueMaxSizes returns one entry per queue: its maximum size.
	QueueMaxSizes() []uint16
	// ReadConfig reads the device configuration space at off.
	ReadConfig(off uint64, data []byte)
	// WriteConfig writes the device configuration space at off.
	WriteConfig(off uint64, data []byte)
	// Activate starts the device when the driver sets DRIVER_OK (or when a
	// running device is restored). It must not block.
	Activate(a Activation) error
	// QueueNotify tells the device the driver made buffers available on
	// queue i. It is called on a vCPU thread or an ioeventfd goroutine and
	// must not block: it wakes the queue's worker.
	QueueNotify(i int)
	// Reset stops the device's workers and returns it to its initial state.
	Reset()
	// Pause waits for in-flight requests to finish and stops processing
	// until Resume, so queue and device state can be saved consistently.
	Pause()
	// Resume restarts processing after Pause.
	Resume()
	// SaveState encodes the device-specific state (not the queues).
	SaveState() ([]byte, error)
	// RestoreState loads state from SaveState into a device that has not
	// been activated yet.
	RestoreState(b []byte) error
}

// Interrupt is how a device reaches the driver through its transport.
type Interrupt interface {
	// SignalUsed raises the used-buffer interrupt for queue i.
	SignalUsed(i int)
	// SignalConfig raises the configuration-change interrupt.
	SignalConfig()
	// NeedsReset puts the device in DEVICE_NEEDS_RESET because of err
	// (usually a *QueueError) and tells the driver.
	NeedsReset(err error)
}

// Activation is what a device gets when the driver starts it.
type Activation struct {
	Mem kvm.GuestMemory
	// Features are the negotiated feature bits.
	Features uint64
	// Queues has one entry per queue of QueueMaxSizes: an activated queue,
	// or nil if the driver did not enable it.
	Queues    []*Queue
	Interrupt Interrupt
}

// Worker runs a queue handler on its own goroutine: Kick wakes it, the
// handler runs until it has drained its queue. Handlers run with the worker
// paused lock held, so Pause returns only once no handler is running.
type Worker struct {
	kick   chan struct{}
	mu     sync.Mutex
	paused bool
	cancel context.CancelFunc
	done   chan struct{}
}

// StartWorker starts a goroutine that calls fn after each Kick until Stop.
// fn gets a context cancelled by Stop.
func StartWorker(fn func(ctx context.Context)) *Worker {
	ctx, cancel := context.WithCancel(context.Background())
	w := &Worker{kick: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-w.kick:
			}
			w.mu.Lock()
			if !w.paused {
				fn(ctx)
			}
			w.mu.Unlock()
		}
	}()
	return w
}

// Kick wakes the worker. It never blocks.
func (w *Worker) Kick() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Pause waits for a running handler to return and keeps new ones from
// starting until Resume.
func (w *Worker) Pause() {
	w.mu.Lock()
	w.paused = true
	w.mu.Unlock()
}

// Resume lets handlers run again and kicks the worker once.
func (w *Worker) Resume() {
	w.mu.Lock()
	w.paused = false
	w.mu.Unlock()
	w.Kick()
}

// Stop cancels the worker and waits for its goroutine to exit.
func (w *Worker) Stop() {
	w.cancel()
	<-w.done
}

// Workers is a set of queue workers, one per queue index (nil entries for
// queues without a worker).
type Workers []*Worker

// Kick wakes worker i if it exists.
func (ws Workers) Kick(i int) {
	if i >= 0 && i < len(ws) && ws[i] != nil {
		ws[i].Kick()
	}
}

// Pause pauses every worker.
func (ws Workers) Pause() {
	for _, w := range ws {
		if w != nil {
			w.Pause()
		}
	}
}

// Resume resumes every worker.
func (ws Workers) Resume() {
	for _, w := range ws {
		if w != nil {
			w.Resume()
		}
	}
}

// Stop stops every worker.
func (ws Workers) Stop() {
	for _, w := range ws {
		if w != nil {
			w.Stop()
		}
	}
}

// Runner holds a device's running workers and implements the lifecycle
// methods of Device on them. Devices embed it: QueueNotify kicks worker i,
// Reset stops all workers, Pause and Resume pause and resume them.
type Runner struct {
	mu sync.Mutex
	ws Workers
}

// Start records the workers of a newly activated device, stopping any
// previous ones.
func (r *Runner) Start(ws Workers) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ws.Stop()
	r.ws = ws
}

func (r *Runner) workers() Workers {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ws
}

// QueueNotify wakes the worker of queue i.
func (r *Runner) QueueNotify(i int) { r.workers().Kick(i) }

// Reset stops all workers.
func (r *Runner) Reset() { r.Start(nil) }

// Pause pauses all workers.
func (r *Runner) Pause() { r.workers().Pause() }

// Resume resumes all workers.
func (r *Runner) Resume() { r.workers().Resume() }
