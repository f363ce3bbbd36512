package devices

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// WatchdogConfig configures a Watchdog.
type WatchdogConfig struct {
	// Timeout is how long without progress counts as a stall. Required.
	Timeout time.Duration
	// Progress returns a counter that grows while the guest makes progress
	// (e.g. VM exits or console bytes). Nil means the Watchdog's own
	// counter, bumped by Kick.
	Progress func() uint64
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Interval is how often Run checks; 0 means Timeout/4.
	Interval time.Duration
	// Ticks, if set, drives Run instead of a real ticker; each value is
	// used as the current time. Tests send fake times on it.
	Ticks <-chan time.Time
	// OnStall is called once per stall (from Check or Run), without locks
	// held. Progress re-arms it.
	OnStall func(*StallError)
}

// StallError reports a stall. It wraps ErrStalled.
type StallError struct {
	Progress uint64        // the counter value that stopped changing
	Since    time.Time     // when it last changed
	Idle     time.Duration // how long it has not changed
}

// Error implements error.
func (e *StallError) Error() string {
	return fmt.Sprintf("guest made no progress for %v (counter stuck at %d since %s)",
		e.Idle, e.Progress, e.Since.Format(time.RFC3339Nano))
}

// Unwrap returns ErrStalled.
func (e *StallError) Unwrap() error { return ErrStalled }

// Watchdog reports when a progress counter stops changing for longer than
// a timeout: a hung guest. Drive it with Run, or call Check with the
// current time from an existing loop. It is safe for concurrent use.
type Watchdog struct {
	cfg     WatchdogConfig
	counter atomic.Uint64

	mu      sync.Mutex
	armed   bool // a first observation was made
	last    uint64
	changed time.Time
	fired   bool
}

// NewWatchdog returns a Watchdog; the timeout runs from the first Check.
func NewWatchdog(cfg WatchdogConfig) (*Watchdog, error) {
	if cfg.Timeout <= 0 {
		return nil, &ConfigError{Device: "Watchdog", Field: "Timeout", Reason: "must be positive"}
	}
	if cfg.Interval < 0 {
		return nil, &ConfigError{Device: "Watchdog", Field: "Interval", Reason: "is negative"}
	}
	if cfg.Interval == 0 {
		cfg.Interval = max(cfg.Timeout/4, time.Millisecond)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	w := &Watchdog{cfg: cfg}
	if cfg.Progress == nil {
		w.cfg.Progress = w.counter.Load
	}
	return w, nil
}

// Kick records progress on the Watchdog's own counter. Cheap enough for
// every VM exit.
func (w *Watchdog) Kick() { w.counter.Add(1) }

// KickWriter returns an io.Writer that passes writes to next (nil: nowhere)
// and counts each non-empty one as progress, e.g. between a UART and its
// sink so that console output keeps the watchdog quiet. It only counts
// toward the Watchdog's own counter (when Progress is nil).
func (w *Watchdog) KickWriter(next io.Writer) io.Writer {
	return kickWriter{w: w, next: next}
}

type kickWriter struct {
	w    *Watchdog
	next io.Writer
}

func (k kickWriter) Write(p []byte) (int, error) {
	if len(p) > 0 {
		k.w.Kick()
	}
	if k.next == nil {
		return len(p), nil
	}
	return k.next.Write(p)
}

// Check samples the progress counter at time now and returns a stall if it
// has not changed for the timeout. OnStall is called the first time a given
// stall is seen; later Checks of the same stall return it without calling
// OnStall again.
func (w *Watchdog) Check(now time.Time) *StallError {
	p := w.cfg.Progress()
	w.mu.Lock()
	if !w.armed || p != w.last {
		w.armed = true
		w.last = p
		w.changed = now
		w.fired = false
		w.mu.Unlock()
		return nil
	}
	idle := now.Sub(w.changed)
	if idle < w.cfg.Timeout {
		w.mu.Unlock()
		return nil
	}
	st := &StallError{Progress: p, Since: w.changed, Idle: idle}
	first := !w.fired
	w.fired = true
	w.mu.Unlock()
	if first && w.cfg.OnStall != nil {
		w.cfg.OnStall(st)
	}
	return st
}

// Run checks every Interval (or on each value from Ticks) until a stall,
// which it returns as a *StallError, until ctx is done (ctx.Err()), or
// until Ticks is closed (nil).
func (w *Watchdog) Run(ctx context.Context) error {
	ticks := w.cfg.Ticks
	useNow := ticks == nil
	if ticks == nil {
		t := time.NewTicker(w.cfg.Interval)
		defer t.Stop()
		ticks = t.C
	}
	if useNow {
		w.Check(w.cfg.Now())
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case now, ok := <-ticks:
			if !ok {
				return nil
			}
			if useNow {
				now = w.cfg.Now()
			}
			if st := w.Check(now); st != nil {
				return st
			}
		}
	}
}
