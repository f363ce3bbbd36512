package migration

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
)

// ReceiveOptions tune [Receive]. Zero fields take the defaults given.
type ReceiveOptions struct {
	// MaxMemory caps the guest RAM a source may ask for. Default 1 TiB.
	MaxMemory uint64
	// IdleTimeout bounds the wait for each record from the source (the
	// source sends at least a RoundEnd per pass). Default 60 s.
	IdleTimeout time.Duration
	// ConfirmTimeout bounds the wait for the source's Done after the Ack.
	// Default 2 s.
	ConfirmTimeout time.Duration
	// KeepGC leaves the Go garbage collector alone. By default no new
	// collection cycle starts from the source's Paused to the Ack, so that
	// none lands in the downtime (the setting is process-wide; see
	// Options.KeepGC).
	KeepGC bool
	// Logger receives a line per phase; default slog.Default().
	Logger *slog.Logger
}

func (o ReceiveOptions) withDefaults() ReceiveOptions {
	if o.MaxMemory == 0 {
		o.MaxMemory = 1 << 40
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 60 * time.Second
	}
	if o.ConfirmTimeout <= 0 {
		o.ConfirmTimeout = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Receive is the target side of [Migrate]: it reads the source's stream from
// conn, builds the VM through tgt, resumes it and acknowledges.
//
// On success the target runs the guest (Stats.Confirmed says whether the
// source confirmed receiving the Ack). On failure tgt.Abort has been called
// (if Prepare was), the source was told why when the stream allowed it, and
// the error is a *PhaseError. Receive does not close conn; close it when
// Receive returns so that a source blocked writing notices.
func Receive(ctx context.Context, conn io.ReadWriter, tgt Target, opts ReceiveOptions) (ReceiveStats, error) {
	o := opts.withDefaults()
	r := &receiver{conn: conn, tgt: tgt, opts: o, log: o.Logger.With("component", "migration-target"), start: time.Now()}
	return r.run(ctx)
}

type countingReader struct {
	r io.Reader
	n uint64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += uint64(n)
	return n, err
}

type receiver struct {
	conn  io.ReadWriter
	tgt   Target
	opts  ReceiveOptions
	log   *slog.Logger
	start time.Time
	phase Phase
	stats ReceiveStats

	in       *countingReader
	rr       *recordReader
	bw       *bufio.Writer
	rw       *recordWriter
	prepared bool
	writeErr bool
	gcHeld   bool // this receiver holds the collector (gcHolds)
}

// holdGC keeps the collector off for the switch-over (unless KeepGC).
// debug.SetGCPercent(-1) first waits for a collection already marking to
// finish; the target's heap is small (guest memory is mapped, not Go
// heap), so that wait is short.
func (r *receiver) holdGC() {
	if !r.opts.KeepGC && !r.gcHeld {
		gcHolds.hold()
		r.gcHeld = true
	}
}

// releaseGC gives the collector back; it is idempotent.
func (r *receiver) releaseGC() {
	if r.gcHeld {
		r.gcHeld = false
		gcHolds.release()
	}
}

// next reads the next record within IdleTimeout (or d if set).
func (r *receiver) next(ctx context.Context, d time.Duration) (RecordType, []byte, error) {
	if c, ok := r.conn.(interface{ SetReadDeadline(time.Time) error }); ok {
		_ = c.SetReadDeadline(time.Now().Add(d))
		// interruptOnDone may have set a past deadline just before: check
		// after arming ours so that a cancellation is never lost.
		if ctx.Err() != nil {
			return 0, nil, context.Cause(ctx)
		}
	}
	t, p, err := r.rr.next()
	if err != nil {
		if ctx.Err() != nil {
			return t, nil, fmt.Errorf("%w (%v)", context.Cause(ctx), err)
		}
		if errors.Is(err, io.EOF) {
			return t, nil, fmt.Errorf("source closed the stream: %w", io.ErrUnexpectedEOF)
		}
		return t, nil, err
	}
	if t == RecError {
		return t, nil, &RemoteError{Msg: string(p)}
	}
	return t, p, nil
}

func (r *receiver) send(t RecordType, parts ...[]byte) error {
	if err := r.rw.write(t, parts...); err != nil {
		r.writeErr = true
		return err
	}
	if err := r.bw.Flush(); err != nil {
		r.writeErr = true
		return err
	}
	return nil
}

func (r *receiver) run(parent context.Context) (ReceiveStats, error) {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	disarm := interruptOnDone(ctx, r.conn)
	defer disarm()

	r.phase = PhaseHandshake
	r.bw = bufio.NewWriterSize(r.conn, 64<<10)
	r.rw = &recordWriter{w: r.bw}
	r.in = &countingReader{r: r.conn}
	br := bufio.NewReaderSize(r.in, ioBufferSize)
	r.rr = &recordReader{r: br, off: headerSize}
	if err := writeHeader(r.bw, kindTarget); err != nil {
		r.writeErr = true
		return r.fail(ctx, err)
	}
	if err := r.bw.Flush(); err != nil {
		r.writeErr = true
		return r.fail(ctx, err)
	}
	if err := readHeader(br, kindSource); err != nil {
		return r.fail(ctx, err)
	}
	regions, err := r.handshake(ctx)
	if err != nil {
		return r.fail(ctx, err)
	}

	r.phase = PhaseMemory
	var (
		state   []byte
		tPaused time.Time
		last    RecordType
	)
	defer r.releaseGC()
	for {
		off := r.rr.off
		t, p, err := r.next(ctx, r.opts.IdleTimeout)
		if err != nil {
			return r.fail(ctx, err)
		}
		bad := func(msg string) (ReceiveStats, error) {
			return r.fail(ctx, &ProtocolError{Record: t, Offset: off, Msg: msg})
		}
		switch t {
		case RecPages:
			if state != nil {
				return bad("pages after the state")
			}
			d, z, err := applyPages(p, regions, r.stats.Rounds == 0)
			r.stats.PagesReceived += d
			r.stats.ZeroPages += z
			if err != nil {
				return bad(err.Error())
			}
		case RecRoundEnd:
			if len(p) != 8 {
				return bad("round number is not 8 bytes")
			}
			if n := binary.LittleEndian.Uint64(p); n != uint64(r.stats.Rounds) {
				return bad(fmt.Sprintf("round %d, expected %d", n, r.stats.Rounds))
			}
			r.stats.Rounds++
			if tPaused.IsZero() {
				if err := r.send(RecRoundAck, p); err != nil {
					return r.fail(ctx, err)
				}
			}
		case RecPaused:
			if !tPaused.IsZero() {
				return bad("source paused twice")
			}
			tPaused = time.Now()
			r.holdGC()
		case RecState:
			if state != nil || tPaused.IsZero() {
				return bad("state must come once, after Paused")
			}
			state = append(make([]byte, 0, len(p)), p...)
			r.stats.StateBytes = len(state)
		case RecComplete:
			if state == nil || last != RecState {
				return bad("Complete must follow the State")
			}
			return r.complete(ctx, state, tPaused)
		default:
			return bad("unexpected from the source")
		}
		last = t
	}
}

func (r *receiver) handshake(ctx context.Context) ([]kvm.Region, error) {
	off := r.rr.off
	t, p, err := r.next(ctx, r.opts.IdleTimeout)
	if err != nil {
		return nil, err
	}
	if t != RecConfig {
		return nil, &ProtocolError{Record: t, Offset: off, Msg: "expected Config first"}
	}
	var cfg Config
	if err := cfg.UnmarshalBinary(p); err != nil {
		return nil, err
	}
	if cfg.MemorySize() > r.opts.MaxMemory {
		return nil, &LimitError{What: "guest memory", Got: cfg.MemorySize(), Max: r.opts.MaxMemory}
	}
	r.prepared = true
	regions, err := r.tgt.Prepare(cfg)
	if err != nil {
		return nil, fmt.Errorf("prepare target VM: %w", err)
	}
	if err := sameLayout(cfg.Regions, layoutOf(regions)); err != nil {
		return nil, fmt.Errorf("target memory does not match the config: %w", err)
	}
	if err := r.send(RecReady); err != nil {
		return nil, err
	}
	r.log.Info("prepared", "memory_bytes", cfg.MemorySize(), "vcpus", cfg.VCPUs)
	return regions, nil
}

func (r *receiver) complete(ctx context.Context, state []byte, tPaused time.Time) (ReceiveStats, error) {
	r.phase = PhaseLoad
	t0 := time.Now()
	if tPaused.IsZero() {
		tPaused = t0
	}
	if err := r.tgt.LoadState(state); err != nil {
		return r.fail(ctx, fmt.Errorf("load state: %w", err))
	}
	r.phase = PhaseResume
	if err := r.tgt.Resume(); err != nil {
		return r.fail(ctx, fmt.Errorf("resume: %w", err))
	}
	now := time.Now()
	r.stats.ResumeTime = now.Sub(t0)
	r.stats.Downtime = now.Sub(tPaused)
	ack := encodeAck(ackInfo{downtime: r.stats.Downtime, resume: r.stats.ResumeTime, pages: r.stats.PagesReceived + r.stats.ZeroPages})
	if err := r.send(RecAck, ack); err != nil {
		// The source will not see the Ack and will resume: the guest must
		// not run here too.
		return r.fail(ctx, fmt.Errorf("send ack: %w", err))
	}
	r.releaseGC() // the downtime is over here; the source's Done may take a while
	r.stats.Total = time.Since(r.start)
	r.stats.BytesReceived = r.in.n
	if err := r.tgt.Announce(); err != nil {
		r.stats.AnnounceErr = err
		r.log.Warn("announce failed", "err", err)
	}
	if t, _, err := r.next(ctx, r.opts.ConfirmTimeout); err == nil && t == RecDone {
		r.stats.Confirmed = true
	} else {
		r.log.Warn("source did not confirm the ack; make sure it is not running the guest too", "record", t, "err", err)
	}
	r.stats.BytesReceived = r.in.n
	r.log.Info("migrated in", "downtime", r.stats.Downtime, "resume", r.stats.ResumeTime, "rounds", r.stats.Rounds)
	return r.stats, nil
}

func (r *receiver) fail(ctx context.Context, err error) (ReceiveStats, error) {
	if r.prepared {
		r.tgt.Abort()
	}
	var re *RemoteError
	if !r.writeErr && !errors.As(err, &re) {
		bestEffortWriteDeadline(r.conn, time.Second)
		if r.rw.write(RecError, errorPayload("target", err)) == nil {
			_ = r.bw.Flush()
		}
	}
	if r.in != nil {
		r.stats.BytesReceived = r.in.n
	}
	r.stats.Total = time.Since(r.start)
	r.log.Warn("receive failed, target aborted", "phase", r.phase, "err", err)
	return r.stats, &PhaseError{Phase: r.phase, Err: err}
}
