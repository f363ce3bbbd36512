package migration_test

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// BenchmarkMigrateIdle migrates an idle fake guest (one vCPU writing 100
// pages/s, 10% of RAM holding data, the rest zero) over loopback TCP.
// MB/s is guest RAM per second of total migration time; downtime_ms is the
// source-measured downtime, wire_MB/s the bytes actually sent per second.
func BenchmarkMigrateIdle(b *testing.B) {
	for _, size := range []uint64{256 << 20, 1 << 30} {
		b.Run(sizeName(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			var downtime, tdown, total time.Duration
			var wire uint64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				src, err := migrationtest.NewSource(migrationtest.Options{
					Regions: []kvm.RegionSpec{{Size: size}}, VCPUs: 1, WorkingSetPages: 16, DirtyRate: 100, FillPercent: 10,
				})
				require.NoError(b, err)
				tgt := migrationtest.NewTarget(migrationtest.Options{NoResumeCheck: true})
				a, c := tcpPair(b)
				done := make(chan error, 1)
				b.StartTimer()
				go func() {
					_, err := migration.Receive(context.Background(), c, tgt, migration.ReceiveOptions{Logger: quiet()})
					c.Close()
					done <- err
				}()
				st, err := migration.Migrate(context.Background(), src, a, migration.Options{Logger: quiet()})
				require.NoError(b, err)
				require.NoError(b, <-done)
				b.StopTimer()
				a.Close()
				downtime += st.Downtime
				tdown += st.TargetDowntime
				total += st.Total
				wire += st.BytesSent
				src.Stop()
				tgt.Stop()
			}
			b.ReportMetric(float64(downtime.Microseconds())/1e3/float64(b.N), "downtime_ms")
			b.ReportMetric(float64(tdown.Microseconds())/1e3/float64(b.N), "target_downtime_ms")
			b.ReportMetric(float64(wire)/1e6/total.Seconds(), "wire_MB/s")
		})
	}
}

// BenchmarkRestore512MiB measures LoadSnapshot + Restore (lazy private
// mapping of the memory file) of a 512 MiB guest up to its resume.
func BenchmarkRestore512MiB(b *testing.B) {
	src, err := migrationtest.NewSource(migrationtest.Options{
		Regions: []kvm.RegionSpec{{Size: 512 << 20}}, VCPUs: 2, WorkingSetPages: 64, DirtyRate: 1000, FillPercent: 10,
	})
	require.NoError(b, err)
	dir := b.TempDir()
	_, err = migration.SaveSnapshot(context.Background(), src, dir, migration.SnapshotOptions{NoSync: true, LeavePaused: true, Logger: quiet()})
	require.NoError(b, err)
	src.Stop()
	var resume time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		snap, err := migration.LoadSnapshot(dir)
		require.NoError(b, err)
		tgt := migrationtest.NewTarget(migrationtest.Options{NoResumeCheck: true})
		st, err := migration.Restore(context.Background(), snap, tgt)
		require.NoError(b, err)
		require.True(b, st.Lazy)
		resume += time.Since(t0)
		b.StopTimer()
		tgt.Stop()
		b.StartTimer()
	}
	b.ReportMetric(float64(resume.Microseconds())/1e3/float64(b.N), "load+resume_ms")
}

// BenchmarkZeroPageScan measures IsZeroPage over resident zero memory.
func BenchmarkZeroPageScan(b *testing.B) {
	buf := make([]byte, 64<<20)
	for i := range buf {
		buf[i] = 0 // make it resident
	}
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		n := 0
		for p := 0; p < len(buf); p += kvm.PageSize {
			if migration.IsZeroPage(buf[p : p+kvm.PageSize]) {
				n++
			}
		}
		if n != len(buf)/kvm.PageSize {
			b.Fatal("miscounted")
		}
	}
}

func sizeName(n uint64) string {
	if n >= 1<<30 {
		return strconv.FormatUint(n>>30, 10) + "GiB"
	}
	return strconv.FormatUint(n>>20, 10) + "MiB"
}
