package machine

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Pool keeps shells of one shape built ahead of need, so that a machine of
// that shape (Config.Pool) starts without creating a VM: a guest boots, or
// a snapshot is restored, in the time its devices and state take. One
// goroutine builds shells until Size are ready, and another each time one
// is taken (up to Limit), at the lowest CPU priority; a build that fails
// is retried after a growing pause (at most 5 s) and counted in Stats. A
// pool is a standby's tool: a host that restarts failed guests from their
// checkpoints, a migration target, a test lab starting many guests of a
// few shapes.
type Pool struct {
	cfg   Config
	shape shape
	opts  PoolOptions
	log   *slog.Logger

	mu      sync.Mutex
	ready   []*Shell
	changed chan struct{} // closed (and replaced) whenever ready, stats or closed change
	wake    chan struct{} // a shell was taken
	closed  bool
	stats   PoolStats
	done    chan struct{}
}

// PoolStats counts a pool's work.
type PoolStats struct {
	// Ready is the number of shells ready now.
	Ready int
	// Built and Taken count shells built and shells machines took.
	Built, Taken int
	// Misses counts machines that found no ready shell of their shape and
	// created their VM themselves.
	Misses int
	// Failed counts builds that failed; LastErr is the newest failure.
	Failed  int
	LastErr error
	// BuildTime is the time spent building shells, in total.
	BuildTime time.Duration
}

// PoolOptions size a Pool.
type PoolOptions struct {
	// Size is the number of shells kept ready (at least 1).
	Size int
	// Limit, if positive, caps the shells built in all: a program that
	// knows how many VMs it will start (a migration target or a standby
	// restore: 1; a test run: its cases) builds no spare nobody takes.
	Limit int
}

// maxRetryPause caps the pause between failed builds.
const maxRetryPause = 5 * time.Second

// NewPool starts keeping opts.Size shells of cfg's shape ready (see
// NewShell for the fields that count). Close stops it.
func NewPool(cfg Config, opts PoolOptions) (*Pool, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if opts.Size < 1 {
		return nil, errors.New("machine: pool size must be at least 1")
	}
	cfg.Memory, cfg.Shell, cfg.Pool = nil, nil, nil
	p := &Pool{
		cfg: cfg, shape: shapeOf(cfg), opts: opts, log: cfg.Logger,
		changed: make(chan struct{}), wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	go p.fill()
	return p, nil
}

// exhaustedLocked reports that the pool has built its Limit; p.mu is held.
func (p *Pool) exhaustedLocked() bool {
	return p.opts.Limit > 0 && p.stats.Built >= p.opts.Limit
}

// notifyLocked wakes everyone waiting for a change; p.mu is held.
func (p *Pool) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *Pool) fill() {
	defer close(p.done)
	pause := 100 * time.Millisecond
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return
		}
		need := len(p.ready) < p.opts.Size && !p.exhaustedLocked()
		p.mu.Unlock()
		if !need {
			<-p.wake
			continue
		}
		t0 := time.Now()
		sh, err := p.build()
		p.mu.Lock()
		p.stats.BuildTime += time.Since(t0)
		switch {
		case p.closed:
			if sh != nil {
				_ = sh.Close()
			}
		case err != nil:
			p.stats.Failed++
			p.stats.LastErr = err
		default:
			p.stats.Built++
			p.ready = append(p.ready, sh)
			pause = 100 * time.Millisecond
		}
		p.notifyLocked()
		p.mu.Unlock()
		if err != nil {
			p.log.Warn("machine pool: building a shell failed", "shape", p.shape.String(), "err", err, "retry_in", pause)
			select {
			case <-time.After(pause):
			case <-p.wake:
			}
			pause = min(2*pause, maxRetryPause)
		}
	}
}

// build makes one shell on a thread of the lowest CPU priority (nice 19),
// so that refilling the pool does not slow the machine that just took a
// shell, nor any other. The thread ends with the goroutine.
func (p *Pool) build() (*Shell, error) {
	type result struct {
		sh  *Shell
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the reniced thread exits with this goroutine
		// instead of going back to the scheduler.
		runtime.LockOSThread()
		_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
		sh, err := NewShell(p.cfg)
		ch <- result{sh, err}
	}()
	r := <-ch
	return r.sh, r.err
}

// Get takes a ready shell, or returns nil when none is ready. The pool
// builds a replacement until it reaches its Limit.
func (p *Pool) Get() *Shell {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.ready) == 0 {
		return nil
	}
	sh := p.ready[len(p.ready)-1]
	p.ready = p.ready[:len(p.ready)-1]
	p.stats.Taken++
	p.notifyLocked()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return sh
}

// get is New's way in: a ready shell when cfg has the pool's shape.
func (p *Pool) get(cfg Config) *Shell {
	var sh *Shell
	if shapeOf(cfg) == p.shape {
		sh = p.Get()
	}
	if sh == nil {
		p.mu.Lock()
		p.stats.Misses++
		p.mu.Unlock()
	}
	return sh
}

// Wait blocks until n shells are ready (n is capped at the pool's size),
// the context ends, the pool closes, or a build fails (its error). A
// pool that has built its Limit returns at once.
func (p *Pool) Wait(ctx context.Context, n int) error {
	n = min(n, p.opts.Size)
	p.mu.Lock()
	failed := p.stats.Failed
	for {
		switch {
		case p.closed:
			p.mu.Unlock()
			return ErrPoolClosed
		case len(p.ready) >= n:
			p.mu.Unlock()
			return nil
		case p.exhaustedLocked():
			// Nothing more will be built.
			p.mu.Unlock()
			return nil
		case p.stats.Failed > failed:
			err := p.stats.LastErr
			p.mu.Unlock()
			return err
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		p.mu.Lock()
	}
}

// ErrPoolClosed is returned by Wait on a closed pool.
var ErrPoolClosed = errors.New("machine: pool closed")

// Stats returns the pool's counters.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.stats
	st.Ready = len(p.ready)
	return st
}

// Close stops building, waits for a build under way and releases the
// ready shells. Machines built on shells from the pool are not affected.
// Closing a nil pool does nothing.
func (p *Pool) Close() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	ready := p.ready
	p.ready = nil
	p.notifyLocked()
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	<-p.done
	var errs []error
	for _, sh := range ready {
		errs = append(errs, sh.Close())
	}
	return errors.Join(errs...)
}
