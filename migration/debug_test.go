package migration_test

import (
	"testing"
	"time"

	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

func TestDebugTiming(t *testing.T) {
	t0 := time.Now()
	o := migrate(t, tcpPair, migrationtest.Options{DirtyRate: 20000}, migrationtest.Options{}, migration.Options{}, nil, nil)
	t.Logf("migrate %v", time.Since(t0))
	t.Logf("%+v pause=%v est=%v", o.stats.Summary(), o.stats.PauseTime, o.stats.EstimatedDowntime)
	for _, r := range o.stats.PerRound {
		t.Logf("%+v", r)
	}
	t1 := time.Now()
	requireMigrated(t, o)
	t.Logf("check %v", time.Since(t1))
}
