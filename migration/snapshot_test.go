package migration_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

func hashRegions(rs []kvm.Region) [32]byte {
	h := sha256.New()
	for _, r := range rs {
		h.Write(r.Host)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// eagerTarget hides the fake's MemoryAdopter: Restore must copy.
type eagerTarget struct{ migration.Target }

// saveAndHash takes a snapshot with the VM left paused, records its memory
// hash and state, and resumes it.
func saveAndHash(t *testing.T, src *migrationtest.FakeVM, save func(migration.SnapshotOptions) (migration.SnapshotInfo, error),
	opts migration.SnapshotOptions) (migration.SnapshotInfo, [32]byte, []byte) {
	t.Helper()
	opts.LeavePaused = true
	opts.NoSync = true
	info, err := save(opts)
	require.NoError(t, err)
	require.True(t, src.Status().Paused, "left paused")
	h := src.MemoryHash()
	state, err := src.SaveState()
	require.NoError(t, err)
	require.NoError(t, src.Resume())
	return info, h, state
}

func TestSnapshotRoundTrip(t *testing.T) {
	for _, lazy := range []bool{true, false} {
		t.Run(map[bool]string{true: "lazy", false: "eager"}[lazy], func(t *testing.T) {
			ctx := context.Background()
			src, err := migrationtest.NewSource(migrationtest.Options{
				Regions:   []kvm.RegionSpec{{GPA: 0, Size: 8 << 20}, {GPA: 1 << 32, Size: 4 << 20}},
				DirtyRate: 20000, DeviceState: []byte("rtc+uart"),
			})
			require.NoError(t, err)
			defer src.Stop()
			require.NoError(t, src.WaitWrites(ctx, 200))
			dir := t.TempDir()
			info, h, state := saveAndHash(t, src, func(o migration.SnapshotOptions) (migration.SnapshotInfo, error) {
				return migration.SaveSnapshot(ctx, src, dir, o)
			}, migration.SnapshotOptions{})
			assert.Equal(t, migration.FullSnapshot, info.Kind)
			assert.Equal(t, uint64(12<<20), info.MemorySize)
			assert.Equal(t, int64(1), src.Status().Flushes, "disks flushed")
			requireRunning(t, src)

			snap, err := migration.LoadSnapshot(dir)
			require.NoError(t, err)
			assert.Equal(t, info.ID, snap.Info.ID)
			assert.Equal(t, state, snap.State)
			assert.Equal(t, src.Config(), snap.Config)
			require.NoError(t, snap.VerifyMemory())

			tgt := migrationtest.NewTarget(migrationtest.Options{})
			defer tgt.Stop()
			var target migration.Target = tgt
			if !lazy {
				target = eagerTarget{tgt}
			}
			st, err := migration.Restore(ctx, snap, target)
			require.NoError(t, err)
			assert.Equal(t, lazy, st.Lazy)
			assert.Equal(t, h, tgt.ResumeHash(), "restored memory == memory at save")
			assert.Equal(t, []byte("rtc+uart"), tgt.DeviceState())
			require.NoError(t, tgt.WaitWrites(ctx, 500))
			require.NoError(t, tgt.Err(), "restored guest self-check")
			// The private mapping never writes back: the snapshot is intact.
			require.NoError(t, snap.VerifyMemory())
		})
	}
}

func TestSnapshotDiffChain(t *testing.T) {
	ctx := context.Background()
	src, err := migrationtest.NewSource(migrationtest.Options{
		Regions: []kvm.RegionSpec{{GPA: 0, Size: 4 << 20}, {GPA: 8 << 20, Size: 4 << 20}}, WorkingSetPages: 700, DirtyRate: 20000,
	})
	require.NoError(t, err)
	defer src.Stop()
	base, d1, d2 := t.TempDir(), t.TempDir(), t.TempDir()
	bi, _, _ := saveAndHash(t, src, func(o migration.SnapshotOptions) (migration.SnapshotInfo, error) {
		return migration.SaveSnapshot(ctx, src, base, o)
	}, migration.SnapshotOptions{TrackDirty: true})
	require.NoError(t, src.WaitWrites(ctx, 300))
	i1, _, _ := saveAndHash(t, src, func(o migration.SnapshotOptions) (migration.SnapshotInfo, error) {
		return migration.SaveDiffSnapshot(ctx, src, d1, base, o)
	}, migration.SnapshotOptions{})
	require.NoError(t, src.WaitWrites(ctx, 300))
	i2, h2, state2 := saveAndHash(t, src, func(o migration.SnapshotOptions) (migration.SnapshotInfo, error) {
		return migration.SaveDiffSnapshot(ctx, src, d2, d1, o)
	}, migration.SnapshotOptions{})

	assert.Equal(t, migration.DiffSnapshot, i1.Kind)
	assert.Equal(t, bi.ID, i1.Parent)
	assert.Equal(t, i1.ID, i2.Parent)
	assert.Greater(t, i1.Pages, uint64(0))
	assert.LessOrEqual(t, i1.Pages, uint64(2*700), "only working-set pages are dirty")
	assert.Equal(t, i2.Pages*kvm.PageSize, i2.MemorySize)

	snap, err := migration.LoadSnapshotChain(base, d1, d2)
	require.NoError(t, err)
	require.NoError(t, snap.VerifyMemory())
	assert.Equal(t, state2, snap.State)
	regions, err := snap.MapMemory()
	require.NoError(t, err)
	assert.Equal(t, h2, hashRegions(regions), "base + diffs == memory at the last diff")
	mem, err := kvm.NewMemoryFromRegions(regions)
	require.NoError(t, err)
	require.NoError(t, mem.Close())

	// And a restored guest runs and checks itself.
	tgt := migrationtest.NewTarget(migrationtest.Options{})
	defer tgt.Stop()
	_, err = migration.Restore(ctx, snap, tgt)
	require.NoError(t, err)
	assert.Equal(t, h2, tgt.ResumeHash())
	require.NoError(t, tgt.WaitWrites(ctx, 500))
	require.NoError(t, tgt.Err())

	t.Run("bad chains", func(t *testing.T) {
		alone, err := migration.LoadSnapshot(d1)
		require.NoError(t, err)
		_, err = alone.MapMemory()
		assert.ErrorIs(t, err, migration.ErrNeedsBase)
		_, err = migration.LoadSnapshotChain(base, d2)
		assert.ErrorContains(t, err, "does not apply")
		_, err = migration.LoadSnapshotChain(d1, d2)
		assert.ErrorContains(t, err, "starts with a full snapshot")
		_, err = migration.LoadSnapshotChain()
		assert.Error(t, err)
	})
}

func TestSnapshotRejectsCorruption(t *testing.T) {
	ctx := context.Background()
	src, err := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 2 << 20}}, DirtyRate: 1000})
	require.NoError(t, err)
	defer src.Stop()
	dir := t.TempDir()
	_, err = migration.SaveSnapshot(ctx, src, dir, migration.SnapshotOptions{NoSync: true})
	require.NoError(t, err)
	requireRunning(t, src)
	_, err = migration.SaveSnapshot(ctx, src, dir, migration.SnapshotOptions{NoSync: true})
	require.ErrorIs(t, err, fs.ErrExist, "never overwrites a snapshot")

	good, err := os.ReadFile(filepath.Join(dir, migration.StateFile))
	require.NoError(t, err)
	mem, err := os.ReadFile(filepath.Join(dir, migration.MemoryFile))
	require.NoError(t, err)

	variant := func(t *testing.T, state, memory []byte) error {
		d := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(d, migration.StateFile), state, 0o600))
		require.NoError(t, os.WriteFile(filepath.Join(d, migration.MemoryFile), memory, 0o600))
		s, err := migration.LoadSnapshot(d)
		if err == nil {
			err = s.VerifyMemory()
		}
		return err
	}
	require.NoError(t, variant(t, good, mem), "the copy itself is fine")

	t.Run("every byte of the state file", func(t *testing.T) {
		for off := 0; off < len(good); off++ {
			bad := append([]byte(nil), good...)
			bad[off] ^= 0x40
			err := variant(t, bad, mem)
			require.Error(t, err, "flip at %d undetected", off)
			if off >= 20 {
				var ce *migration.ChecksumError
				require.ErrorAs(t, err, &ce, "flip at %d: %v", off, err)
			}
		}
	})
	t.Run("truncated state", func(t *testing.T) {
		for _, n := range []int{0, 5, 20, 31, len(good) / 2, len(good) - 1} {
			assert.Error(t, variant(t, good[:n], mem), "truncated to %d", n)
		}
	})
	t.Run("trailing data", func(t *testing.T) {
		assert.ErrorContains(t, variant(t, append(append([]byte(nil), good...), good[20:40]...), mem), "after Complete")
	})
	t.Run("foreign version", func(t *testing.T) {
		bad := append([]byte(nil), good...)
		bad[8] = 99
		// A genuine foreign header has a valid checksum.
		crc := crc32.Checksum(bad[:16], crc32.MakeTable(crc32.Castagnoli))
		bad[16], bad[17], bad[18], bad[19] = byte(crc), byte(crc>>8), byte(crc>>16), byte(crc>>24)
		err := variant(t, bad, mem)
		var ve *migration.VersionError
		require.ErrorAs(t, err, &ve)
		assert.Equal(t, uint32(99), ve.Got)
		assert.ErrorContains(t, err, "version 99 is not supported")
	})
	t.Run("not a snapshot", func(t *testing.T) {
		assert.ErrorIs(t, variant(t, []byte("hello, this is not a snapshot at all"), mem), migration.ErrBadMagic)
		_, err := migration.LoadSnapshot(t.TempDir())
		assert.ErrorIs(t, err, fs.ErrNotExist)
	})
	t.Run("memory file size", func(t *testing.T) {
		assert.ErrorContains(t, variant(t, good, mem[:len(mem)-kvm.PageSize]), "memory file is")
		assert.ErrorContains(t, variant(t, good, append(append([]byte(nil), mem...), 0)), "memory file is")
	})
	t.Run("memory contents", func(t *testing.T) {
		bad := append([]byte(nil), mem...)
		bad[len(bad)/2] ^= 1
		var ce *migration.ChecksumError
		assert.ErrorAs(t, variant(t, good, bad), &ce)
	})
}

func TestSnapshotFailureResumes(t *testing.T) {
	src, err := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 2 << 20}}, DirtyRate: 1000})
	require.NoError(t, err)
	defer src.Stop()
	// A diff without dirty logging fails after pausing: the VM resumes.
	base := t.TempDir()
	_, err = migration.SaveSnapshot(context.Background(), src, base, migration.SnapshotOptions{NoSync: true})
	require.NoError(t, err)
	_, err = migration.SaveDiffSnapshot(context.Background(), src, t.TempDir(), base, migration.SnapshotOptions{NoSync: true, LeavePaused: true})
	var pe *migration.PhaseError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, migration.PhaseSave, pe.Phase)
	requireRunning(t, src)
	// A cancelled context fails the pause (nothing written).
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = migration.SaveSnapshot(ctx, src, t.TempDir(), migration.SnapshotOptions{NoSync: true})
	require.True(t, errors.Is(err, context.Canceled), "%v", err)
	requireRunning(t, src)
}
