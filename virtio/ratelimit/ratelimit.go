// Package ratelimit throttles I/O with two token buckets, one counting bytes
// and one counting operations, so that virtio block and network devices can
// enforce a bandwidth and an IOPS cap at the same time.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// ErrDeadline is returned by Wait when the context's deadline falls before
// the requested tokens would become available, so waiting would be useless.
var ErrDeadline = errors.New("ratelimit: tokens not available before the context deadline")

// ErrNegative is returned when a request asks for a negative number of bytes.
var ErrNegative = errors.New("ratelimit: negative byte count")

// Clock supplies the current time and timers; tests inject a ManualClock.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// After returns a channel that receives once d has elapsed.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the Clock backed by package time.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// After returns time.After(d).
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// bucket is one token bucket. Tokens may go negative: a request larger than
// the available tokens is admitted immediately as debt and the caller sleeps
// until the debt is repaid, so requests larger than the burst still pass.
type bucket struct {
	rate   float64 // tokens per second; 0 means unlimited
	burst  float64 // capacity
	tokens float64
	last   time.Time
}

func newBucket(rate, burst int64, now time.Time) bucket {
	if rate <= 0 {
		return bucket{}
	}
	if burst <= 0 {
		burst = rate
	}
	return bucket{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: now}
}

func (b *bucket) unlimited() bool { return b.rate == 0 }

func (b *bucket) refill(now time.Time) {
	if b.unlimited() {
		return
	}
	if dt := now.Sub(b.last); dt > 0 {
		b.tokens = math.Min(b.burst, b.tokens+dt.Seconds()*b.rate)
		b.last = now
	}
}

// take removes n tokens and returns how long the caller must wait for the
// bucket to be out of debt.
func (b *bucket) take(n float64) time.Duration {
	if b.unlimited() || n == 0 {
		return 0
	}
	b.tokens -= n
	if b.tokens >= 0 {
		return 0
	}
	ns := math.Ceil(-b.tokens / b.rate * float64(time.Second))
	if ns >= math.MaxInt64 {
		return time.Duration(math.MaxInt64) // debt beyond ~292 years
	}
	return time.Duration(ns)
}

// canTake reports whether n tokens are available now. A request larger than
// the burst is allowed only when the bucket is full.
func (b *bucket) canTake(n float64) bool {
	if b.unlimited() {
		return true
	}
	return b.tokens >= math.Min(n, b.burst)
}

func (b *bucket) refund(n float64) {
	if b.unlimited() {
		return
	}
	b.tokens = math.Min(b.burst, b.tokens+n)
}

// Limiter caps bytes per second and operations per second. The zero rate for
// either dimension means unlimited. It is safe for concurrent use.
type Limiter struct {
	clock Clock
	mu    sync.Mutex
	bytes bucket
	ops   bucket
}

// Options tunes a Limiter beyond its rates.
type Options struct {
	// Clock defaults to SystemClock.
	Clock Clock
}

// New returns a limiter allowing bytesPerSec bytes per second with bursts of
// up to burst bytes and opsPerSec operations per second with bursts of up to
// opsBurst operations. A zero (or negative) rate disables that dimension; a
// zero burst defaults to one second's worth of the rate.
func New(bytesPerSec, burst, opsPerSec, opsBurst int64) *Limiter {
	return NewWithOptions(bytesPerSec, burst, opsPerSec, opsBurst, Options{})
}

// NewWithOptions is New with an injectable clock.
func NewWithOptions(bytesPerSec, burst, opsPerSec, opsBurst int64, opts Options) *Limiter {
	c := opts.Clock
	if c == nil {
		c = SystemClock{}
	}
	now := c.Now()
	return &Limiter{
		clock: c,
		bytes: newBucket(bytesPerSec, burst, now),
		ops:   newBucket(opsPerSec, opsBurst, now),
	}
}

// Unlimited reports whether the limiter never delays anything.
func (l *Limiter) Unlimited() bool {
	return l == nil || (l.bytes.unlimited() && l.ops.unlimited())
}

// Allow reports whether one operation of n bytes may proceed now, and if so
// consumes its tokens. It never blocks. A nil Limiter allows everything.
func (l *Limiter) Allow(n int) bool {
	if n < 0 {
		return false
	}
	if l.Unlimited() {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clock.Now()
	l.bytes.refill(now)
	l.ops.refill(now)
	if !l.bytes.canTake(float64(n)) || !l.ops.canTake(1) {
		return false
	}
	l.bytes.take(float64(n))
	l.ops.take(1)
	return true
}

// Reserve consumes the tokens for one operation of n bytes and returns how
// long the caller must wait before performing it. It never blocks.
func (l *Limiter) Reserve(n int) (time.Duration, error) {
	if n < 0 {
		return 0, fmt.Errorf("%w: %d", ErrNegative, n)
	}
	if l.Unlimited() {
		return 0, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clock.Now()
	l.bytes.refill(now)
	l.ops.refill(now)
	return max(l.bytes.take(float64(n)), l.ops.take(1)), nil
}

// Wait blocks until one operation of n bytes may proceed or ctx ends. When
// ctx ends first the reserved tokens are returned and ctx.Err() is reported.
// If ctx has a deadline that falls before the tokens become available, Wait
// returns ErrDeadline immediately without consuming anything.
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if n < 0 {
		return fmt.Errorf("%w: %d", ErrNegative, n)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if l.Unlimited() {
		return nil
	}
	l.mu.Lock()
	now := l.clock.Now()
	l.bytes.refill(now)
	l.ops.refill(now)
	d := max(l.bytes.take(float64(n)), l.ops.take(1))
	if dl, ok := ctx.Deadline(); ok && d > 0 && now.Add(d).After(dl) {
		l.bytes.refund(float64(n))
		l.ops.refund(1)
		l.mu.Unlock()
		return fmt.Errorf("%w: %d bytes need %v", ErrDeadline, n, d)
	}
	l.mu.Unlock()
	if d == 0 {
		return nil
	}
	select {
	case <-l.clock.After(d):
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		l.bytes.refund(float64(n))
		l.ops.refund(1)
		l.mu.Unlock()
		return ctx.Err()
	}
}

// Tokens returns the currently available byte and operation tokens (after
// refilling to the clock's current time); negative values are debt. Unlimited
// dimensions report +Inf.
func (l *Limiter) Tokens() (bytes, ops float64) {
	if l == nil {
		return math.Inf(1), math.Inf(1)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clock.Now()
	l.bytes.refill(now)
	l.ops.refill(now)
	bytes, ops = l.bytes.tokens, l.ops.tokens
	if l.bytes.unlimited() {
		bytes = math.Inf(1)
	}
	if l.ops.unlimited() {
		ops = math.Inf(1)
	}
	return bytes, ops
}
