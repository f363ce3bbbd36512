package migrationtest

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
)

func TestFakePauseResume(t *testing.T) {
	vm, err := NewSource(Options{Regions: []kvm.RegionSpec{{Size: 1 << 20}}, DirtyRate: 10000})
	require.NoError(t, err)
	defer vm.Stop()
	ctx := context.Background()
	require.NoError(t, vm.WaitWrites(ctx, 50))
	require.NoError(t, vm.Pause(ctx))
	w := vm.Status().Writes
	time.Sleep(20 * time.Millisecond)
	assert.Equal(t, w, vm.Status().Writes, "no write while paused")
	require.NoError(t, vm.CheckMemory())
	require.NoError(t, vm.Resume())
	require.NoError(t, vm.WaitWrites(ctx, 50))
	require.NoError(t, vm.Err())
}

func TestFakeDirtyLog(t *testing.T) {
	vm, err := NewSource(Options{Regions: []kvm.RegionSpec{{Size: 1 << 20}}, WorkingSetPages: 10, DirtyRate: 10000})
	require.NoError(t, err)
	defer vm.Stop()
	bm := make([]uint64, migration.BitmapWords(1<<20))
	assert.Error(t, vm.DirtyBitmap(0, bm), "logging off")
	require.NoError(t, vm.StartDirtyLog())
	require.NoError(t, vm.WaitWrites(context.Background(), 100))
	require.NoError(t, vm.DirtyBitmap(0, bm))
	assert.Equal(t, uint64(0xfffff), bm[0], "both working sets (pages 0..19) dirty, nothing else")
	for _, w := range bm[1:] {
		assert.Zero(t, w)
	}
	require.NoError(t, vm.Pause(context.Background()))
	require.NoError(t, vm.DirtyBitmap(0, bm))
	require.NoError(t, vm.DirtyBitmap(0, bm))
	assert.Zero(t, bm[0], "harvest clears")
	require.NoError(t, vm.Resume())
}

func TestFakeDetectsLostPage(t *testing.T) {
	vm, err := NewSource(Options{Regions: []kvm.RegionSpec{{Size: 1 << 20}}, VCPUs: 1, WorkingSetPages: 8, DirtyRate: 10000})
	require.NoError(t, err)
	defer vm.Stop()
	require.NoError(t, vm.Pause(context.Background()))
	// A stale page (an older pass), as a migration that lost a dirty page
	// would leave it.
	fillPage(vm.page(3), vm.opts.Seed, 3, 1000)
	assert.ErrorContains(t, vm.CheckMemory(), "page 3")
	require.NoError(t, vm.Resume())
	require.Eventually(t, func() bool { return vm.Err() != nil }, 5*time.Second, time.Millisecond, "the guest notices")
}
