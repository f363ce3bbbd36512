package migration_test

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

// connPair returns the two ends of a connection: source side, target side.
type connPair func(t testing.TB) (net.Conn, net.Conn)

func pipePair(t testing.TB) (net.Conn, net.Conn) {
	a, b := net.Pipe()
	return a, b
}

func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	src, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	r := <-ch
	require.NoError(t, r.err)
	return src, r.c
}

type outcome struct {
	src, tgt       *migrationtest.FakeVM
	stats          migration.Stats
	rstats         migration.ReceiveStats
	srcErr, tgtErr error
}

// migrate runs one fake-to-fake migration. wrapSrc/wrapTgt may wrap the
// connection ends (fault injection).
func migrate(t testing.TB, pair connPair, so, to migrationtest.Options, opts migration.Options,
	wrapSrc, wrapTgt func(net.Conn) net.Conn) outcome {
	t.Helper()
	src, err := migrationtest.NewSource(so)
	require.NoError(t, err)
	tgt := migrationtest.NewTarget(to)
	t.Cleanup(src.Stop)
	t.Cleanup(tgt.Stop)
	a, b := pair(t)
	if wrapSrc != nil {
		a = wrapSrc(a)
	}
	if wrapTgt != nil {
		b = wrapTgt(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out outcome
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer b.Close()
		out.rstats, out.tgtErr = migration.Receive(ctx, b, tgt, migration.ReceiveOptions{IdleTimeout: 10 * time.Second, ConfirmTimeout: time.Second})
	}()
	// Let the guest run a little before migrating.
	require.NoError(t, src.WaitWrites(ctx, 100))
	out.stats, out.srcErr = migration.Migrate(ctx, src, a, opts)
	a.Close()
	<-done
	out.src, out.tgt = src, tgt
	return out
}

// requireMigrated checks everything a successful migration promises.
func requireMigrated(t testing.TB, o outcome) {
	t.Helper()
	require.NoError(t, o.srcErr)
	require.NoError(t, o.tgtErr)
	ss, ts := o.src.Status(), o.tgt.Status()
	assert.True(t, ss.Paused, "source stays paused")
	assert.False(t, o.src.DirtyLogging(), "source dirty log stopped")
	assert.True(t, ts.Running(), "target runs")
	assert.Equal(t, int64(1), ss.Flushes, "disks flushed once")
	assert.Equal(t, int64(1), ts.Announces, "target announced")
	// Memory at switch-over: the paused source's RAM equals the target's
	// RAM at its resume, before its vCPUs ran.
	assert.Equal(t, o.src.MemoryHash(), o.tgt.ResumeHash(), "target memory == source memory at switch-over")
	require.NoError(t, o.src.CheckMemory())
	assert.Equal(t, o.src.DeviceState(), o.tgt.DeviceState())
	// The target guest keeps running and checking its pages.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, o.tgt.WaitWrites(ctx, 500))
	require.NoError(t, o.tgt.Err(), "target guest self-check")
	require.NoError(t, o.src.Err(), "source guest self-check")

	s, r := o.stats, o.rstats
	total := s.MemoryBytes / kvm.PageSize
	assert.GreaterOrEqual(t, s.PagesSent+s.ZeroPages+s.HolePages, total, "at least every page once")
	assert.Greater(t, s.ZeroPages+s.HolePages, uint64(0), "zero pages sent as markers or skipped as holes")
	assert.Equal(t, s.PagesSent, r.PagesReceived)
	assert.Equal(t, s.ZeroPages, r.ZeroPages)
	assert.Equal(t, s.Rounds, r.Rounds)
	assert.GreaterOrEqual(t, s.Rounds, 2, "full pass and final pass at least")
	assert.Len(t, s.PerRound, s.Rounds)
	assert.True(t, s.PerRound[len(s.PerRound)-1].Final)
	assert.Greater(t, s.Downtime, time.Duration(0))
	assert.LessOrEqual(t, s.TargetDowntime, s.Downtime, "target's part of the downtime is inside the source's")
	assert.LessOrEqual(t, s.ResumeTime, s.TargetDowntime)
	assert.GreaterOrEqual(t, s.Total, s.Downtime)
	if s.Throttle == 0 {
		// A third of the fake's RAM is zero: without throttling, little
		// more than its data crosses the wire.
		assert.Less(t, s.BytesSent, 2*s.MemoryBytes)
	}
	assert.Equal(t, s.BytesSent, r.BytesReceived, "every byte sent was read")
	assert.True(t, r.Confirmed)
	assert.Greater(t, s.StateBytes, 0)
}

func TestMigrate(t *testing.T) {
	tests := []struct {
		name string
		pair connPair
		so   migrationtest.Options
		opts migration.Options
		n    int
	}{
		{"pipe", pipePair, migrationtest.Options{DirtyRate: 20000, DeviceState: []byte("uart:0x3f8")}, migration.Options{}, 10},
		{"tcp", tcpPair, migrationtest.Options{DirtyRate: 20000, DeviceState: []byte("virtio-net")}, migration.Options{}, 10},
		{"tcp-unlimited-dirty", tcpPair, migrationtest.Options{WorkingSetPages: 32}, migration.Options{}, 3},
		{"two-regions-small-batches", pipePair, migrationtest.Options{
			Regions: []kvm.RegionSpec{{GPA: 0, Size: 4 << 20}, {GPA: 1 << 32, Size: 8 << 20}}, WorkingSetPages: 600, DirtyRate: 50000,
		}, migration.Options{BatchPages: 7}, 3},
		{"memfd-holes-skipped", pipePair, migrationtest.Options{Memfd: true, FillPercent: 10, DirtyRate: 20000}, migration.Options{}, 3},
		{"one-vcpu-bandwidth-limit", tcpPair, migrationtest.Options{VCPUs: 1, DirtyRate: 2000}, migration.Options{MaxBandwidth: 200 << 20}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i := 0; i < tt.n; i++ {
				o := migrate(t, tt.pair, tt.so, migrationtest.Options{}, tt.opts, nil, nil)
				requireMigrated(t, o)
				if tt.so.Memfd {
					// 90% of the static pages were never written: holes.
					assert.Greater(t, o.stats.HolePages, o.stats.MemoryBytes/kvm.PageSize/2, "memfd holes skipped")
				} else {
					assert.Zero(t, o.stats.HolePages, "anonymous memory has no holes to skip")
				}
				o.src.Stop()
				o.tgt.Stop()
			}
		})
	}
}

func TestMigrateProgress(t *testing.T) {
	var ps []migration.Progress
	o := migrate(t, pipePair, migrationtest.Options{DirtyRate: 10000}, migrationtest.Options{},
		migration.Options{Progress: func(p migration.Progress) { ps = append(ps, p) }}, nil, nil)
	requireMigrated(t, o)
	require.NotEmpty(t, ps)
	assert.Equal(t, migration.PhaseDone, ps[len(ps)-1].Phase)
	for i := 1; i < len(ps); i++ {
		assert.GreaterOrEqual(t, ps[i].BytesSent, ps[i-1].BytesSent, "bytes only grow")
		assert.GreaterOrEqual(t, ps[i].Elapsed, ps[i-1].Elapsed)
	}
	assert.Equal(t, o.stats.MemoryBytes/kvm.PageSize, ps[0].TotalPages)
}

func TestMigrateCPUIDMismatch(t *testing.T) {
	o := migrate(t, pipePair,
		migrationtest.Options{CPUID: []byte("avx512")}, migrationtest.Options{CPUID: []byte("sse4")},
		migration.Options{}, nil, nil)
	requireSourceKept(t, o, migration.PhaseHandshake)
	var re *migration.RemoteError
	require.ErrorAs(t, o.srcErr, &re)
	assert.Contains(t, re.Msg, "CPUID mismatch")
}

func TestMigrateTargetFailures(t *testing.T) {
	tests := []struct {
		name  string
		to    migrationtest.Options
		phase migration.Phase
		msg   string
	}{
		{"load-state", migrationtest.Options{FailLoadState: errors.New("bad lapic")}, migration.PhaseAck, "bad lapic"},
		{"resume", migrationtest.Options{FailResume: errors.New("vcpu run failed")}, migration.PhaseAck, "vcpu run failed"},
		{"devices", migrationtest.Options{Devices: []string{"virtio-blk"}}, migration.PhaseHandshake, "device set"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := gcPercent()
			o := migrate(t, tcpPair, migrationtest.Options{DirtyRate: 5000}, tt.to, migration.Options{}, nil, nil)
			requireSourceKept(t, o, tt.phase)
			assert.ErrorContains(t, o.srcErr, tt.msg)
			assert.Equal(t, before, gcPercent(), "a failed switch-over gives the collector back")
		})
	}
}

func TestMigrateSourceDirtyLogFailure(t *testing.T) {
	o := migrate(t, pipePair, migrationtest.Options{DirtyRate: 5000, FailDirtyBitmap: 1}, migrationtest.Options{}, migration.Options{}, nil, nil)
	requireSourceKept(t, o, "")
	assert.ErrorContains(t, o.srcErr, "injected dirty bitmap failure")
	var re *migration.RemoteError
	require.ErrorAs(t, o.tgtErr, &re, "the target learns why")
	assert.Contains(t, re.Msg, "injected")
}

func TestMigrateCancel(t *testing.T) {
	for _, after := range []time.Duration{0, time.Millisecond, 5 * time.Millisecond, 20 * time.Millisecond} {
		src, err := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 64 << 20}}})
		require.NoError(t, err)
		tgt := migrationtest.NewTarget(migrationtest.Options{})
		a, b := tcpPair(t)
		go func() {
			defer b.Close()
			_, _ = migration.Receive(context.Background(), b, tgt, migration.ReceiveOptions{})
		}()
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(after, cancel)
		_, err = migration.Migrate(ctx, src, a, migration.Options{MaxBandwidth: 100 << 20})
		a.Close()
		require.ErrorIs(t, err, context.Canceled)
		requireRunning(t, src)
		src.Stop()
		tgt.Stop()
	}
}

// requireSourceKept checks the failure contract: the source runs the guest,
// unthrottled and without dirty logging, the target aborted.
func requireSourceKept(t testing.TB, o outcome, phase migration.Phase) {
	t.Helper()
	require.Error(t, o.srcErr)
	require.Error(t, o.tgtErr)
	var pe *migration.PhaseError
	require.ErrorAs(t, o.srcErr, &pe)
	if phase != "" {
		assert.Equal(t, phase, pe.Phase, "%v", o.srcErr)
	}
	requireRunning(t, o.src)
	ts := o.tgt.Status()
	assert.False(t, ts.Running(), "target must not run")
	if ts.Started {
		assert.True(t, ts.Aborted)
	}
}

func requireRunning(t testing.TB, src *migrationtest.FakeVM) {
	t.Helper()
	ss := src.Status()
	assert.True(t, ss.Running(), "source runs: %+v", ss)
	assert.False(t, src.DirtyLogging(), "dirty log stopped")
	assert.Zero(t, src.CurrentThrottle(), "throttle released")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, src.WaitWrites(ctx, 200), "source guest makes progress")
	require.NoError(t, src.Err(), "source guest self-check")
}

var _ io.ReadWriter = net.Conn(nil)
