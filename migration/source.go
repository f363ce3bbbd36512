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

// Policy says what [Migrate] does once MaxRounds or MaxBytesFactor is
// reached without converging.
type Policy int

const (
	// KeepThrottling keeps iterating, raising the vCPU throttle by
	// ThrottleStep every round up to MaxThrottle, until the estimate fits
	// the downtime budget or ctx ends (then the source keeps running).
	KeepThrottling Policy = iota
	// GiveUp stops the migration with ErrNotConverging; the source keeps
	// running (unthrottled) and the target aborts.
	GiveUp
)

func (p Policy) String() string {
	switch p {
	case KeepThrottling:
		return "keep-throttling"
	case GiveUp:
		return "give-up"
	}
	return fmt.Sprintf("Policy(%d)", int(p))
}

// Options tune [Migrate]. The zero value is usable: every zero field takes
// the default given in its comment.
type Options struct {
	// DowntimeBudget is the switch-over target: the source pauses when the
	// remaining dirty memory can be sent within it at the measured
	// bandwidth. Default 50 ms.
	DowntimeBudget time.Duration
	// MaxBandwidth caps the bytes per second written; 0 is unlimited.
	MaxBandwidth int64
	// MaxRounds caps the dirty rounds before Policy applies. Default 30.
	MaxRounds int
	// MaxBytesFactor caps the bytes sent, as a multiple of guest RAM,
	// before Policy applies. Default 3.
	MaxBytesFactor float64
	// Policy applies when a cap is reached. Default KeepThrottling.
	Policy Policy
	// NoAutoConverge disables vCPU throttling. Otherwise, from the second
	// dirty round on, a round whose dirty rate exceeds half the bandwidth
	// raises the throttle (ThrottleStart, then +ThrottleStep each such
	// round, at most MaxThrottle); so does every round past a cap under
	// KeepThrottling.
	NoAutoConverge bool
	// ThrottleStart, ThrottleStep and MaxThrottle shape auto-converge.
	// Defaults 0.2, 0.1 and 0.99.
	ThrottleStart, ThrottleStep, MaxThrottle float64
	// HandshakeTimeout bounds the wait for the target's Ready. Default 30 s.
	HandshakeTimeout time.Duration
	// AckTimeout bounds the wait for each RoundAck and, source paused,
	// from Complete to the target's Ack; past it the source resumes.
	// Default 10 s.
	AckTimeout time.Duration
	// BatchPages is the number of pages per Pages record, at most
	// MaxBatchPages (the default).
	BatchPages int
	// Progress, if set, is called from Migrate's goroutine after each pass
	// and every 64 MiB of the full pass. It must return quickly.
	Progress func(Progress)
	// KeepGC leaves the Go garbage collector alone. By default no new
	// collection cycle starts from the pause to the target's Ack (or the
	// source's resume), so that none lands in the downtime: with few CPUs a
	// cycle there competes with the last pages and the state save. The
	// setting is process-wide (debug.SetGCPercent); concurrent migrations
	// in one process share the hold and the last one restores it.
	KeepGC bool
	// Logger receives a line per phase; default slog.Default().
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.DowntimeBudget <= 0 {
		o.DowntimeBudget = 50 * time.Millisecond
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 30
	}
	if o.MaxBytesFactor <= 0 {
		o.MaxBytesFactor = 3
	}
	if o.ThrottleStart <= 0 {
		o.ThrottleStart = 0.2
	}
	if o.ThrottleStep <= 0 {
		o.ThrottleStep = 0.1
	}
	if o.MaxThrottle <= 0 || o.MaxThrottle > 0.99 {
		o.MaxThrottle = 0.99
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 30 * time.Second
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 10 * time.Second
	}
	if o.BatchPages <= 0 || o.BatchPages > MaxBatchPages {
		o.BatchPages = MaxBatchPages
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// ioBufferSize is the write buffer between the record encoder and the
// connection.
const ioBufferSize = 1 << 20

// progressEvery is how often the full pass reports progress.
const progressEvery = 64 << 20

// Migrate live-migrates src to the target at the other end of conn (a
// net.Conn: it must allow a concurrent Read and Write, and is interrupted
// through deadlines when ctx ends), which runs [Receive]. See the package
// documentation for the protocol.
//
// On success the target runs the guest: src is left paused with dirty
// logging stopped and must be destroyed, not resumed. On any failure before
// the target's Ack (ctx cancelled, timeout, connection lost, target error,
// GiveUp) src is unthrottled and resumed, still owns the guest, and the error
// is a *PhaseError naming the phase. Migrate does not close conn.
func Migrate(ctx context.Context, src Source, conn io.ReadWriter, opts Options) (Stats, error) {
	m := &migrator{src: src, conn: conn, opts: opts.withDefaults(), start: time.Now()}
	m.log = m.opts.Logger.With("component", "migration-source")
	return m.run(ctx)
}

type reply struct {
	t       RecordType
	payload []byte
}

type migrator struct {
	src   Source
	conn  io.ReadWriter
	opts  Options
	log   *slog.Logger
	start time.Time
	phase Phase
	stats Stats

	meter   *meter
	bw      *bufio.Writer
	rw      *recordWriter
	batch   *pageBatcher
	regions []kvm.Region
	dirty   [][]uint64 // pages to send next
	harvest [][]uint64 // scratch for DirtyBitmap

	replies    chan reply
	readerDone chan struct{}

	cancel     context.CancelCauseFunc
	dirtyLogOn bool
	paused     bool
	writeErr   bool // a write failed: the stream may end mid-record
	throttle   float64
	lastDirty  uint64
}

func (m *migrator) run(parent context.Context) (Stats, error) {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	m.cancel = cancel
	disarm := interruptOnDone(ctx, m.conn)
	defer disarm()

	m.phase = PhaseHandshake
	cfg := m.src.Config()
	m.regions = m.src.Memory()
	if err := cfg.Validate(); err != nil {
		return m.fail(ctx, err)
	}
	if err := sameLayout(cfg.Regions, layoutOf(m.regions)); err != nil {
		return m.fail(ctx, fmt.Errorf("source memory does not match its config: %w", err))
	}
	m.stats.MemoryBytes = cfg.MemorySize()
	m.meter = &meter{w: m.conn, ctx: ctx, rate: float64(m.opts.MaxBandwidth)}
	m.bw = bufio.NewWriterSize(m.meter, ioBufferSize)
	m.rw = &recordWriter{w: m.bw}
	m.batch = newPageBatcher(m.rw, m.opts.BatchPages)
	m.dirty = make([][]uint64, len(m.regions))
	m.harvest = make([][]uint64, len(m.regions))
	for i, r := range m.regions {
		m.dirty[i] = make([]uint64, BitmapWords(uint64(len(r.Host))))
		m.harvest[i] = make([]uint64, len(m.dirty[i]))
	}
	m.replies = make(chan reply, 4)
	m.readerDone = make(chan struct{})
	go m.readReplies(ctx, cancel)

	if err := m.handshake(ctx, &cfg); err != nil {
		return m.fail(ctx, err)
	}
	m.log.Info("handshake done", "memory_bytes", m.stats.MemoryBytes, "vcpus", cfg.VCPUs)

	m.phase = PhaseFullPass
	if err := m.fullPass(ctx); err != nil {
		return m.fail(ctx, err)
	}

	m.phase = PhaseIterate
	if err := m.iterate(ctx); err != nil {
		return m.fail(ctx, err)
	}

	m.phase = PhaseSwitchover
	if err := m.switchover(ctx); err != nil {
		return m.fail(ctx, err)
	}
	m.phase = PhaseDone
	m.stats.Total = time.Since(m.start)
	m.report(0, 0)
	m.log.Info("migrated", "downtime", m.stats.Downtime, "target_downtime", m.stats.TargetDowntime,
		"total", m.stats.Total, "rounds", m.stats.Rounds, "bytes", m.stats.BytesSent)
	return m.stats, nil
}

// readReplies reads the target's stream: header, Ready, then Ack or Error.
func (m *migrator) readReplies(ctx context.Context, cancel context.CancelCauseFunc) {
	defer close(m.readerDone)
	if err := readHeader(m.conn, kindTarget); err != nil {
		cancel(fmt.Errorf("target reply stream: %w", err))
		return
	}
	rr := &recordReader{r: m.conn, off: headerSize}
	for {
		t, p, err := rr.next()
		if err != nil {
			if ctx.Err() == nil {
				cancel(fmt.Errorf("reading from target: %w", err))
			}
			return
		}
		switch t {
		case RecReady, RecRoundAck:
			m.replies <- reply{t: t, payload: append([]byte(nil), p...)}
		case RecAck:
			m.replies <- reply{t: t, payload: append([]byte(nil), p...)}
			return
		case RecError:
			cancel(&RemoteError{Msg: string(p)})
			return
		default:
			cancel(&ProtocolError{Record: t, Offset: rr.off, Msg: "unexpected from target"})
			return
		}
	}
}

// await waits for the target's next reply, which must be of type want.
func (m *migrator) await(ctx context.Context, want RecordType, timeout time.Duration) ([]byte, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-m.replies:
		if r.t != want {
			return nil, &ProtocolError{Record: r.t, Msg: fmt.Sprintf("target sent %v, expected %v", r.t, want)}
		}
		return r.payload, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-t.C:
		return nil, fmt.Errorf("no %v from the target within %v", want, timeout)
	}
}

// write writes a record, remembering a failure (the stream may then end
// mid-record, so no Error record may follow).
func (m *migrator) write(t RecordType, parts ...[]byte) error {
	if err := m.rw.write(t, parts...); err != nil {
		m.writeErr = true
		return err
	}
	return nil
}

func (m *migrator) flush() error {
	if err := m.bw.Flush(); err != nil {
		m.writeErr = true
		return err
	}
	return nil
}

func (m *migrator) handshake(ctx context.Context, cfg *Config) error {
	b, err := cfg.MarshalBinary()
	if err != nil {
		return err
	}
	if err := writeHeader(m.bw, kindSource); err != nil {
		m.writeErr = true
		return err
	}
	if err := m.write(RecConfig, b); err != nil {
		return err
	}
	if err := m.flush(); err != nil {
		return err
	}
	_, err = m.await(ctx, RecReady, m.opts.HandshakeTimeout)
	return err
}

// pass sends the pages in m.dirty (all pages when all is set) followed by a
// RoundEnd, and records the round.
func (m *migrator) pass(ctx context.Context, round int, all, final bool, dirtyRate float64) error {
	t0 := time.Now()
	b0, p0, z0 := m.meter.n, m.batch.pages, m.batch.zero
	var sinceReport uint64
	check := func() error {
		if err := ctx.Err(); err != nil {
			return context.Cause(ctx)
		}
		if all {
			sinceReport += 64 * pageSize
			if sinceReport >= progressEvery {
				sinceReport = 0
				m.report(round, 0)
			}
		}
		return nil
	}
	for i, r := range m.regions {
		var bm []uint64
		if !all {
			bm = m.dirty[i]
		}
		// A failed write leaves bufio's error sticky, so no Error record
		// can follow a half-written record.
		if err := m.batch.sendRegionPages(r, bm, check); err != nil {
			return err
		}
		if bm != nil {
			clear(bm)
		}
	}
	if err := m.batch.flush(); err != nil {
		return err
	}
	var rn [8]byte
	binary.LittleEndian.PutUint64(rn[:], uint64(round))
	if err := m.write(RecRoundEnd, rn[:]); err != nil {
		return err
	}
	if err := m.flush(); err != nil {
		return err
	}
	if !final {
		ack, err := m.await(ctx, RecRoundAck, m.opts.AckTimeout)
		if err != nil {
			return err
		}
		if len(ack) != 8 || binary.LittleEndian.Uint64(ack) != uint64(round) {
			return &ProtocolError{Record: RecRoundAck, Msg: fmt.Sprintf("target acknowledged %x, expected round %d", ack, round)}
		}
	}
	d := time.Since(t0)
	rs := RoundStats{
		Round: round, Final: final,
		Pages: m.batch.pages - p0, ZeroPages: m.batch.zero - z0, Bytes: m.meter.n - b0,
		Duration: d, DirtyRate: dirtyRate, Throttle: m.throttle,
	}
	if d > 0 {
		rs.Bandwidth = float64(rs.Bytes) / d.Seconds()
	}
	m.stats.PerRound = append(m.stats.PerRound, rs)
	m.stats.Rounds = len(m.stats.PerRound)
	m.stats.PagesSent, m.stats.ZeroPages, m.stats.HolePages, m.stats.BytesSent = m.batch.pages, m.batch.zero, m.batch.holes, m.meter.n
	return nil
}

func (m *migrator) fullPass(ctx context.Context) error {
	// Tracking starts before the first page is read, so every write made
	// while the full pass runs is caught by round 1.
	if err := m.src.StartDirtyLog(); err != nil {
		return fmt.Errorf("start dirty log: %w", err)
	}
	m.dirtyLogOn = true
	return m.pass(ctx, 0, true, false, 0)
}

// harvestDirty collects the dirty bitmaps and ors them into m.dirty,
// returning the number of pages now pending.
func (m *migrator) harvestDirty() (uint64, error) {
	var n uint64
	for i := range m.regions {
		clear(m.harvest[i])
		if err := m.src.DirtyBitmap(i, m.harvest[i]); err != nil {
			return 0, fmt.Errorf("dirty bitmap of region %d: %w", i, err)
		}
		orBitmap(m.dirty[i], m.harvest[i])
		n += countBits(m.dirty[i])
	}
	return n, nil
}

// bandwidth estimates bytes per second from the last three passes.
func (m *migrator) bandwidth() float64 {
	var b uint64
	var d time.Duration
	rs := m.stats.PerRound
	for i := len(rs) - 1; i >= 0 && i >= len(rs)-3; i-- {
		b += rs[i].Bytes
		d += rs[i].Duration
	}
	if d <= 0 || b == 0 {
		return 0
	}
	return float64(b) / d.Seconds()
}

// estimate predicts the time to send n pages at bandwidth bw (bytes/s),
// counting every page as a full one.
func estimate(n uint64, bw float64) time.Duration {
	if n == 0 {
		return 0
	}
	if bw <= 0 {
		return time.Duration(1<<63 - 1)
	}
	return time.Duration(float64(n*(8+pageSize)) / bw * float64(time.Second))
}

func (m *migrator) raiseThrottle() {
	if m.opts.NoAutoConverge {
		return
	}
	next := m.opts.ThrottleStart
	if m.throttle > 0 {
		next = m.throttle + m.opts.ThrottleStep
	}
	if next > m.opts.MaxThrottle {
		next = m.opts.MaxThrottle
	}
	if next != m.throttle {
		m.throttle = next
		m.src.Throttle(next)
		if next > m.stats.Throttle {
			m.stats.Throttle = next
		}
		m.log.Info("auto-converge: throttling vCPUs", "fraction", next)
	}
}

func (m *migrator) iterate(ctx context.Context) error {
	for round := 1; ; round++ {
		if err := ctx.Err(); err != nil {
			return context.Cause(ctx)
		}
		n, err := m.harvestDirty()
		if err != nil {
			return err
		}
		m.lastDirty = n
		prev := m.stats.PerRound[len(m.stats.PerRound)-1]
		var rate float64
		if prev.Duration > 0 {
			rate = float64(n) / prev.Duration.Seconds()
		}
		bw := m.bandwidth()
		est := estimate(n, bw)
		m.report(round, rate)
		if est <= m.opts.DowntimeBudget {
			m.stats.Converged = true
			m.stats.EstimatedDowntime = est
			return nil
		}
		capped := round > m.opts.MaxRounds || float64(m.meter.n) >= m.opts.MaxBytesFactor*float64(m.stats.MemoryBytes)
		switch {
		case capped && m.opts.Policy == GiveUp:
			return fmt.Errorf("%w: after %d rounds and %d bytes, %d pages dirty (%.0f pages/s) at %.1f MB/s: %v to send, budget %v",
				ErrNotConverging, round-1, m.meter.n, n, rate, bw/1e6, est, m.opts.DowntimeBudget)
		case capped:
			m.raiseThrottle()
		case round >= 2 && rate*(8+pageSize) > bw/2:
			m.raiseThrottle()
		}
		if err := m.pass(ctx, round, false, false, rate); err != nil {
			return err
		}
	}
}

func (m *migrator) switchover(ctx context.Context) error {
	round := len(m.stats.PerRound)
	if !m.opts.KeepGC {
		gcHolds.hold()
		defer gcHolds.release()
	}
	tPause := time.Now()
	m.paused = true // a failed Pause may have stopped some vCPUs: resume them
	if err := m.src.Pause(ctx); err != nil {
		return fmt.Errorf("pause source: %w", err)
	}
	m.stats.PauseTime = time.Since(tPause)
	if err := m.write(RecPaused); err != nil {
		return err
	}
	if err := m.flush(); err != nil {
		return err
	}
	tFinal := time.Now()
	n, err := m.harvestDirty()
	if err != nil {
		return err
	}
	before := m.batch.pages + m.batch.zero
	if err := m.pass(ctx, round, false, true, 0); err != nil {
		return err
	}
	m.stats.FinalPages = m.batch.pages + m.batch.zero - before
	if m.stats.FinalPages != n {
		return fmt.Errorf("final pass sent %d pages, %d were dirty", m.stats.FinalPages, n)
	}
	tState := time.Now()
	m.stats.FinalPassTime = tState.Sub(tFinal)
	if err := m.src.Flush(); err != nil {
		return fmt.Errorf("flush disks: %w", err)
	}
	state, err := m.src.SaveState()
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	m.stats.SaveStateTime = time.Since(tState)
	if len(state) > MaxStateSize {
		return fmt.Errorf("VM state of %d bytes above the limit of %d", len(state), MaxStateSize)
	}
	m.stats.StateBytes = len(state)
	if err := m.write(RecState, state); err != nil {
		return err
	}
	if err := m.write(RecComplete); err != nil {
		return err
	}
	if err := m.flush(); err != nil {
		return err
	}
	m.stats.BytesSent = m.meter.n

	m.phase = PhaseAck
	tSent := time.Now()
	m.stats.SentTime = tSent.Sub(tPause)
	ack, err := m.await(ctx, RecAck, m.opts.AckTimeout)
	m.log.Debug("switch-over", "sent_after", tSent.Sub(tPause), "ack_after", time.Since(tSent))
	if err != nil {
		return err
	}
	// The target runs the guest from here on: nothing may resume the source.
	m.stats.Downtime = time.Since(tPause)
	a, err := decodeAck(ack)
	if err != nil {
		m.log.Warn("target ack malformed (migration done anyway)", "err", err)
	}
	m.stats.TargetDowntime, m.stats.ResumeTime = a.downtime, a.resume
	if a.pages != 0 && a.pages != m.batch.pages+m.batch.zero {
		m.log.Warn("target applied a different number of pages", "target", a.pages, "sent", m.batch.pages+m.batch.zero)
	}
	if err := m.write(RecDone); err == nil {
		err = m.flush()
		if err != nil {
			m.log.Warn("could not confirm the ack to the target", "err", err)
		}
	}
	m.stats.BytesSent = m.meter.n
	m.src.Throttle(0)
	if err := m.src.StopDirtyLog(); err != nil {
		m.log.Warn("stop dirty log", "err", err)
	}
	m.dirtyLogOn = false
	return nil
}

type ackInfo struct {
	downtime, resume time.Duration
	pages            uint64
}

func encodeAck(a ackInfo) []byte {
	e := enc{}
	e.u64(uint64(a.downtime))
	e.u64(uint64(a.resume))
	e.u64(a.pages)
	return e.b
}

func decodeAck(b []byte) (ackInfo, error) {
	d := dec{b: b, ctx: "ack"}
	a := ackInfo{downtime: time.Duration(d.u64("downtime")), resume: time.Duration(d.u64("resume")), pages: d.u64("pages")}
	return a, d.end()
}

func (m *migrator) report(round int, rate float64) {
	if m.opts.Progress == nil {
		return
	}
	m.opts.Progress(Progress{
		Phase: m.phase, Round: round, Elapsed: time.Since(m.start),
		BytesSent: m.meter.n + uint64(m.bw.Buffered()), PagesSent: m.batch.pages + m.batch.zero,
		TotalPages: m.stats.MemoryBytes / pageSize, DirtyPages: m.lastDirty,
		DirtyRate: rate, Bandwidth: m.bandwidth(), Throttle: m.throttle,
	})
}

// fail gives the guest back to the source, tells the target if the stream
// allows it, and wraps err with the phase.
func (m *migrator) fail(ctx context.Context, err error) (Stats, error) {
	m.src.Throttle(0)
	if m.paused {
		if rerr := m.src.Resume(); rerr != nil {
			err = errors.Join(err, fmt.Errorf("resume source: %w", rerr))
		}
		m.paused = false
	}
	if m.dirtyLogOn {
		if serr := m.src.StopDirtyLog(); serr != nil {
			m.log.Warn("stop dirty log", "err", serr)
		}
		m.dirtyLogOn = false
	}
	err = m.explain(ctx, err)
	var re *RemoteError
	if m.rw != nil && !m.writeErr && !errors.As(context.Cause(ctx), &re) {
		bestEffortWriteDeadline(m.conn, time.Second)
		if m.rw.write(RecError, errorPayload("source", err)) == nil {
			_ = m.bw.Flush()
		}
	}
	if m.meter != nil {
		m.stats.BytesSent = m.meter.n
	}
	m.stats.Total = time.Since(m.start)
	if m.opts.Progress != nil && m.meter != nil {
		m.report(len(m.stats.PerRound), 0)
	}
	m.log.Warn("migration failed, source keeps running", "phase", m.phase, "err", err)
	// Interrupt the reply reader (through the connection's deadline) so
	// that no goroutine outlives Migrate.
	if m.cancel != nil && m.readerDone != nil {
		m.cancel(err)
		select {
		case <-m.readerDone:
		case <-time.After(time.Second):
		}
	}
	return m.stats, &PhaseError{Phase: m.phase, Err: err}
}

// errorPayload is the payload of an Error record: who failed and why,
// truncated to MaxErrorMessage.
func errorPayload(side string, err error) []byte {
	msg := side + ": " + err.Error()
	if len(msg) > MaxErrorMessage {
		msg = msg[:MaxErrorMessage]
	}
	return []byte(msg)
}

// explain prefers the target's own account of a failure (an Error record
// that made our writes fail) and the caller's cancellation over the I/O
// error they caused.
func (m *migrator) explain(ctx context.Context, err error) error {
	var re *RemoteError
	if errors.As(err, &re) || errors.Is(err, ErrNotConverging) {
		return err
	}
	if m.readerDone != nil && ctx.Err() == nil {
		// The target may have sent an Error just before the connection
		// broke: give the reader a moment to deliver it.
		select {
		case <-m.readerDone:
		case <-time.After(250 * time.Millisecond):
		}
	}
	cause := context.Cause(ctx)
	if errors.As(cause, &re) {
		if errors.Is(err, cause) {
			return err
		}
		return fmt.Errorf("%w (local: %v)", cause, err)
	}
	if cause != nil && !errors.Is(err, cause) {
		return fmt.Errorf("%w (%v)", cause, err)
	}
	return err
}
