package migration_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

// A guest rewriting 2 MiB as fast as it can, over a 4 MiB/s link with a
// 1 ms budget, never converges without throttling.
var hotVM = migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 4 << 20}}, WorkingSetPages: 256, FillPercent: -1}

func TestNonConvergenceGiveUp(t *testing.T) {
	o := migrate(t, tcpPair, hotVM, migrationtest.Options{}, migration.Options{
		MaxBandwidth: 4 << 20, DowntimeBudget: time.Millisecond, MaxRounds: 2, Policy: migration.GiveUp, NoAutoConverge: true,
	}, nil, nil)
	requireSourceKept(t, o, migration.PhaseIterate)
	assert.ErrorIs(t, o.srcErr, migration.ErrNotConverging)
	var re *migration.RemoteError
	require.ErrorAs(t, o.tgtErr, &re, "the target is told")
	assert.Contains(t, re.Msg, "does not converge")
	assert.Zero(t, o.src.MaxThrottle(), "auto-converge was off")
	assert.Equal(t, 3, o.stats.Rounds, "full pass and MaxRounds dirty rounds")
}

func TestNonConvergenceByteCap(t *testing.T) {
	o := migrate(t, tcpPair, hotVM, migrationtest.Options{}, migration.Options{
		MaxBandwidth: 8 << 20, DowntimeBudget: time.Millisecond, MaxBytesFactor: 1, Policy: migration.GiveUp, NoAutoConverge: true,
	}, nil, nil)
	requireSourceKept(t, o, migration.PhaseIterate)
	assert.ErrorIs(t, o.srcErr, migration.ErrNotConverging)
	assert.GreaterOrEqual(t, o.stats.BytesSent, o.stats.MemoryBytes, "gave up at the byte cap")
}

func TestAutoConverge(t *testing.T) {
	// 2 vCPUs dirtying 40k pages/s (160 MB/s) against 16 MiB/s: only the
	// throttle brings the dirty set within a 20 ms budget.
	so := migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 4 << 20}}, WorkingSetPages: 256, DirtyRate: 20000}
	o := migrate(t, tcpPair, so, migrationtest.Options{}, migration.Options{
		MaxBandwidth: 16 << 20, DowntimeBudget: 20 * time.Millisecond, MaxRounds: 4, ThrottleStep: 0.2,
	}, nil, nil)
	requireMigrated(t, o)
	assert.Greater(t, o.stats.Throttle, 0.0, "auto-converge kicked in")
	assert.Equal(t, o.stats.Throttle, o.src.MaxThrottle())
	assert.True(t, o.stats.Converged)
	var sawThrottled bool
	var bytes uint64
	var d time.Duration
	for _, r := range o.stats.PerRound {
		sawThrottled = sawThrottled || r.Throttle > 0
		if r.Round > 0 && !r.Final {
			assert.Greater(t, r.DirtyRate, 0.0, "round %d dirty rate measured", r.Round)
		}
		assert.Greater(t, r.Bandwidth, 0.0)
		bytes += r.Bytes
		d += r.Duration
	}
	assert.True(t, sawThrottled)
	assert.Less(t, float64(bytes)/d.Seconds(), 1.1*16*(1<<20), "the bandwidth cap holds")
	t.Logf("rounds %d, max throttle %.2f, downtime %v (estimated %v)", o.stats.Rounds, o.stats.Throttle, o.stats.Downtime, o.stats.EstimatedDowntime)
}
