package ratelimit

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var epoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

func TestAllowTokenMath(t *testing.T) {
	tests := []struct {
		name                     string
		bps, burst, ops, opBurst int64
		steps                    []struct {
			advance time.Duration
			n       int
			want    bool
		}
	}{
		{
			name: "bytes burst then refill",
			bps:  1000, burst: 500,
			steps: []struct {
				advance time.Duration
				n       int
				want    bool
			}{
				{0, 500, true},
				{0, 1, false},
				{100 * time.Millisecond, 100, true}, // refilled 100
				{0, 1, false},
				{10 * time.Second, 500, true}, // capped at burst
				{0, 1, false},
			},
		},
		{
			name: "ops only",
			ops:  10, opBurst: 2,
			steps: []struct {
				advance time.Duration
				n       int
				want    bool
			}{
				{0, 1 << 20, true},
				{0, 1 << 20, true},
				{0, 0, false},
				{100 * time.Millisecond, 0, true},
				{0, 0, false},
			},
		},
		{
			name: "larger than burst needs full bucket",
			bps:  100, burst: 100,
			steps: []struct {
				advance time.Duration
				n       int
				want    bool
			}{
				{0, 300, true}, // full bucket: admitted as debt (-200)
				{time.Second, 1, false},
				{2 * time.Second, 1, true},
			},
		},
		{
			name: "zero burst defaults to rate",
			bps:  1000,
			steps: []struct {
				advance time.Duration
				n       int
				want    bool
			}{
				{0, 1000, true},
				{0, 1, false},
			},
		},
		{
			name: "unlimited",
			steps: []struct {
				advance time.Duration
				n       int
				want    bool
			}{
				{0, math.MaxInt32, true},
				{0, math.MaxInt32, true},
				{0, -1, false},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := NewManualClock(epoch)
			l := NewWithOptions(tc.bps, tc.burst, tc.ops, tc.opBurst, Options{Clock: clk})
			for i, s := range tc.steps {
				clk.Advance(s.advance)
				assert.Equal(t, s.want, l.Allow(s.n), "step %d", i)
			}
		})
	}
}

func TestReserveDurations(t *testing.T) {
	clk := NewManualClock(epoch)
	l := NewWithOptions(1000, 1000, 100, 100, Options{Clock: clk})
	d, err := l.Reserve(1000)
	require.NoError(t, err)
	assert.Zero(t, d)
	d, err = l.Reserve(500)
	require.NoError(t, err)
	assert.Equal(t, 500*time.Millisecond, d)
	d, err = l.Reserve(500)
	require.NoError(t, err)
	assert.Equal(t, time.Second, d)
	b, o := l.Tokens()
	assert.InDelta(t, -1000, b, 1e-9)
	assert.InDelta(t, 97, o, 1e-9)
	clk.Advance(time.Second)
	b, _ = l.Tokens()
	assert.InDelta(t, 0, b, 1e-9)
	_, err = l.Reserve(-1)
	require.ErrorIs(t, err, ErrNegative)
}

func TestHugeDebtDoesNotOverflow(t *testing.T) {
	clk := NewManualClock(epoch)
	l := NewWithOptions(1, 1, 0, 0, Options{Clock: clk})
	d, err := l.Reserve(math.MaxInt)
	require.NoError(t, err)
	assert.Equal(t, time.Duration(math.MaxInt64), d)
}

func TestOpsDominate(t *testing.T) {
	clk := NewManualClock(epoch)
	l := NewWithOptions(1<<30, 0, 2, 1, Options{Clock: clk})
	d, err := l.Reserve(1)
	require.NoError(t, err)
	assert.Zero(t, d)
	d, err = l.Reserve(1)
	require.NoError(t, err)
	assert.Equal(t, 500*time.Millisecond, d)
}

func TestWaitBlocksUntilClockAdvances(t *testing.T) {
	clk := NewManualClock(epoch)
	l := NewWithOptions(100, 100, 0, 0, Options{Clock: clk})
	require.NoError(t, l.Wait(context.Background(), 100))

	done := make(chan error, 1)
	go func() { done <- l.Wait(context.Background(), 50) }()
	require.Eventually(t, func() bool { return clk.Waiters() == 1 }, 5*time.Second, time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Wait returned early: %v", err)
	default:
	}
	clk.Advance(499 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Wait returned before its tokens were due: %v", err)
	default:
	}
	clk.Advance(time.Millisecond)
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after the clock advanced")
	}
}

func TestWaitCancelRefunds(t *testing.T) {
	clk := NewManualClock(epoch)
	l := NewWithOptions(100, 100, 0, 0, Options{Clock: clk})
	require.NoError(t, l.Wait(context.Background(), 100))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Wait(ctx, 80) }()
	require.Eventually(t, func() bool { return clk.Waiters() == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("Wait ignored cancellation")
	}
	b, _ := l.Tokens()
	assert.InDelta(t, 0, b, 1e-9, "the 80 reserved tokens are refunded")
}

func TestWaitDeadlineBeforeTokens(t *testing.T) {
	start := time.Now().Add(time.Hour) // clock ahead of real time
	clk := NewManualClock(start)
	l := NewWithOptions(100, 100, 0, 0, Options{Clock: clk})
	ctx, cancel := context.WithDeadline(context.Background(), start.Add(time.Second))
	defer cancel()
	require.NoError(t, l.Wait(ctx, 100))
	err := l.Wait(ctx, 1000)
	require.ErrorIs(t, err, ErrDeadline)
	b, _ := l.Tokens()
	assert.InDelta(t, 0, b, 1e-9, "nothing consumed on ErrDeadline")
}

func TestNilAndUnlimited(t *testing.T) {
	var l *Limiter
	assert.True(t, l.Unlimited())
	assert.True(t, l.Allow(10))
	require.NoError(t, l.Wait(context.Background(), 10))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, New(0, 0, 0, 0).Wait(ctx, 1), context.Canceled)
}

func ExampleLimiter() {
	clk := NewManualClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	// 1 MiB/s with a 64 KiB burst, 1000 IOPS with a burst of 10.
	l := NewWithOptions(1<<20, 64<<10, 1000, 10, Options{Clock: clk})
	fmt.Println(l.Allow(64 << 10))
	fmt.Println(l.Allow(1))
	d, _ := l.Reserve(1 << 20)
	fmt.Println(d)
	// Output:
	// true
	// false
	// 1s
}

func BenchmarkAllowUnlimited(b *testing.B) {
	l := New(0, 0, 0, 0)
	for b.Loop() {
		l.Allow(1500)
	}
}

func BenchmarkAllowLimited(b *testing.B) {
	l := New(1<<40, 1<<40, 1<<40, 1<<40)
	for b.Loop() {
		l.Allow(1500)
	}
}
