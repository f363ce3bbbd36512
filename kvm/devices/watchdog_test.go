package devices

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWatchdogCheck(t *testing.T) {
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	type step struct {
		at    int  // seconds after t0
		kick  bool // progress before the check
		stall bool // Check reports a stall
		fired int  // OnStall calls so far
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"progress keeps it quiet", []step{{0, false, false, 0}, {4, true, false, 0}, {8, true, false, 0}, {12, true, false, 0}}},
		{"stall after timeout", []step{{0, false, false, 0}, {4, false, false, 0}, {5, false, true, 1}}},
		{"reported once per stall", []step{{0, false, false, 0}, {5, false, true, 1}, {9, false, true, 1}}},
		{"progress re-arms", []step{{0, false, false, 0}, {5, false, true, 1}, {6, true, false, 1}, {10, false, false, 1}, {11, false, true, 2}}},
		{"timeout runs from first check", []step{{100, false, false, 0}, {104, false, false, 0}, {105, false, true, 1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var fired []*StallError
			w, err := NewWatchdog(WatchdogConfig{Timeout: 5 * time.Second, OnStall: func(s *StallError) { fired = append(fired, s) }})
			require.NoError(t, err)
			for i, s := range tc.steps {
				if s.kick {
					w.Kick()
				}
				st := w.Check(at(s.at))
				assert.Equal(t, s.stall, st != nil, "step %d", i)
				assert.Len(t, fired, s.fired, "step %d", i)
				if st != nil {
					assert.ErrorIs(t, st, ErrStalled)
					assert.GreaterOrEqual(t, st.Idle, 5*time.Second)
				}
			}
		})
	}
}

func TestWatchdogRunWithFakeTicks(t *testing.T) {
	var counter uint64
	ticks := make(chan time.Time)
	w, err := NewWatchdog(WatchdogConfig{
		Timeout:  time.Minute,
		Progress: func() uint64 { return counter },
		Ticks:    ticks,
	})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- w.Run(context.Background()) }()
	t0 := time.Unix(1000, 0)
	ticks <- t0
	ticks <- t0.Add(59 * time.Second)
	ticks <- t0.Add(61 * time.Second)
	err = <-done
	var st *StallError
	require.ErrorAs(t, err, &st)
	assert.Equal(t, 61*time.Second, st.Idle)
	assert.Equal(t, t0, st.Since)
	assert.Contains(t, err.Error(), "no progress for 1m1s")
}

func TestWatchdogRunStops(t *testing.T) {
	ticks := make(chan time.Time)
	w, err := NewWatchdog(WatchdogConfig{Timeout: time.Second, Ticks: ticks})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, w.Run(ctx), context.Canceled)

	close(ticks)
	assert.NoError(t, w.Run(context.Background()), "closed ticks end Run")

	// Real ticker path: cancellation still wins.
	w2, err := NewWatchdog(WatchdogConfig{Timeout: time.Hour})
	require.NoError(t, err)
	ctx2, cancel2 := context.WithCancel(context.Background())
	cancel2()
	assert.True(t, errors.Is(w2.Run(ctx2), context.Canceled))
}

func TestWatchdogConfigErrors(t *testing.T) {
	for _, cfg := range []WatchdogConfig{{}, {Timeout: -1}, {Timeout: time.Second, Interval: -1}} {
		_, err := NewWatchdog(cfg)
		var ce *ConfigError
		assert.ErrorAs(t, err, &ce)
	}
}

func TestWatchdogKickWriter(t *testing.T) {
	w, err := NewWatchdog(WatchdogConfig{Timeout: time.Second})
	require.NoError(t, err)
	var sink syncBuffer
	kw := w.KickWriter(&sink)
	t0 := time.Unix(0, 0)
	assert.Nil(t, w.Check(t0))
	n, err := kw.Write([]byte("boot\n"))
	require.NoError(t, err)
	assert.Equal(t, 5, n)
	assert.Nil(t, w.Check(t0.Add(2*time.Second)), "console output is progress")
	assert.NotNil(t, w.Check(t0.Add(3*time.Second)))
	assert.Equal(t, "boot\n", sink.String())
	n, err = w.KickWriter(nil).Write([]byte("x"))
	assert.Equal(t, 1, n)
	assert.NoError(t, err)
}
