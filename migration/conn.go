package migration

import (
	"context"
	"io"
	"time"
)

// meter counts the bytes written through it and, with a rate, paces them to
// at most rate bytes per second (a virtual-clock limiter with a small burst
// allowance). Pacing sleeps are interrupted by ctx.
type meter struct {
	w    io.Writer
	ctx  context.Context
	rate float64 // bytes per second, 0 = unlimited
	n    uint64
	next time.Time // when the bytes written so far are "paid for"
}

// meterChunk bounds how much is written between pacing decisions.
const meterChunk = 256 << 10

// meterBurst is the credit a limited writer may accumulate while idle.
const meterBurst = 5 * time.Millisecond

func (m *meter) Write(p []byte) (int, error) {
	if m.rate <= 0 {
		n, err := m.w.Write(p)
		m.n += uint64(n)
		return n, err
	}
	done := 0
	for done < len(p) {
		c := len(p) - done
		if c > meterChunk {
			c = meterChunk
		}
		now := time.Now()
		if floor := now.Add(-meterBurst); m.next.Before(floor) {
			m.next = floor
		}
		m.next = m.next.Add(time.Duration(float64(c) / m.rate * float64(time.Second)))
		if d := m.next.Sub(now); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-m.ctx.Done():
				t.Stop()
				return done, context.Cause(m.ctx)
			}
		}
		n, err := m.w.Write(p[done : done+c])
		m.n += uint64(n)
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// deadliner is the part of net.Conn used to interrupt blocked I/O.
type deadliner interface {
	SetDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// interruptOnDone makes blocked reads and writes on conn fail once ctx is
// done: through a past deadline for a net.Conn, by closing any other
// io.Closer. It returns a function that disarms it (and reports whether it
// had not fired). A conn that is neither cannot be interrupted.
func interruptOnDone(ctx context.Context, conn any) func() bool {
	return context.AfterFunc(ctx, func() {
		switch c := conn.(type) {
		case deadliner:
			_ = c.SetDeadline(time.Unix(1, 0))
		case io.Closer:
			_ = c.Close()
		}
	})
}

// bestEffortWriteDeadline bounds a last write (an Error record) on a
// connection that may no longer be read by the peer.
func bestEffortWriteDeadline(conn any, d time.Duration) {
	if c, ok := conn.(deadliner); ok {
		_ = c.SetWriteDeadline(time.Now().Add(d))
	}
}
