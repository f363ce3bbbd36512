package migration_test

import (
	"context"
	"net"
	"runtime/debug"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

// gcPercent reads the collector's setting without changing it.
func gcPercent() int {
	v := debug.SetGCPercent(-1)
	debug.SetGCPercent(v)
	return v
}

// gcProbeSource records the collector's setting when the state is saved
// (inside the downtime).
type gcProbeSource struct {
	*migrationtest.FakeVM
	atSave int
}

func (s *gcProbeSource) SaveState() ([]byte, error) {
	s.atSave = gcPercent()
	return s.FakeVM.SaveState()
}

// gcProbeTarget records it when the target loads the state.
type gcProbeTarget struct {
	*migrationtest.FakeVM
	atLoad int
}

func (t *gcProbeTarget) LoadState(b []byte) error {
	t.atLoad = gcPercent()
	return t.FakeVM.LoadState(b)
}

// TestMigrateHoldsGCInDowntime: no collection cycle may start while the
// guest is paused (unless KeepGC), and the setting is restored after.
func TestMigrateHoldsGCInDowntime(t *testing.T) {
	orig := debug.SetGCPercent(123)
	defer debug.SetGCPercent(orig)
	for _, keep := range []bool{false, true} {
		fake, err := migrationtest.NewSource(migrationtest.Options{DirtyRate: 20000})
		require.NoError(t, err)
		src := &gcProbeSource{FakeVM: fake}
		tgt := &gcProbeTarget{FakeVM: migrationtest.NewTarget(migrationtest.Options{})}
		a, b := net.Pipe()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		var rerr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer b.Close()
			_, rerr = migration.Receive(ctx, b, tgt, migration.ReceiveOptions{KeepGC: keep, ConfirmTimeout: time.Second})
		}()
		require.NoError(t, src.WaitWrites(ctx, 100))
		_, err = migration.Migrate(ctx, src, a, migration.Options{KeepGC: keep})
		a.Close()
		<-done
		cancel()
		require.NoError(t, err)
		require.NoError(t, rerr)
		want := -1
		if keep {
			want = 123
		}
		assert.Equal(t, want, src.atSave, "source, KeepGC=%v", keep)
		assert.Equal(t, want, tgt.atLoad, "target, KeepGC=%v", keep)
		assert.Equal(t, 123, gcPercent(), "restored afterwards")
		fake.Stop()
		tgt.Stop()
	}
}
