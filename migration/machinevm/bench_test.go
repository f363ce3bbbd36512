package machinevm_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/machinevm"
)

// benchHost is one machine of a migration benchmark and what its guest
// reported.
type benchHost struct {
	m      *machine.Machine
	serial *syncBuffer
	pass   atomic.Uint32 // dirty guest: last completed pass
}

// benchBuild is the BuildFunc of the benchmarks: it records every machine
// it makes in *hosts (the last one is the newest).
func benchBuild(mu *sync.Mutex, hosts *[]*benchHost) machinevm.BuildFunc {
	return func(cfg machine.Config, _ json.RawMessage) (*machine.Machine, error) {
		h := &benchHost{serial: &syncBuffer{}}
		cfg.Serial = h.serial
		m, err := machine.New(cfg)
		if err != nil {
			return nil, err
		}
		h.m = m
		err = m.PIO().Register(guests.ProgressPort, 1, kvm.DeviceFunc{WriteFunc: func(_ uint64, d []byte) {
			if len(d) == 4 {
				h.pass.Store(binary.LittleEndian.Uint32(d))
			}
		}})
		if err != nil {
			m.Close()
			return nil, err
		}
		mu.Lock()
		*hosts = append(*hosts, h)
		mu.Unlock()
		return m, nil
	}
}

// benchWait polls cond every millisecond for up to two minutes.
func benchWait(b *testing.B, what string, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatalf("%s: not within 2m", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// benchMigrate runs b.N live migrations of one guest over loopback TCP,
// host to host (each migration lands on a fresh machine, the previous one
// is closed), and reports the mean source-measured downtime, total time,
// rounds, MiB sent and zero pages per migration
// and the highest throttle. ns/op is the total migration time.
// ready, called on each new source before it is migrated, waits until the
// guest runs its workload.
func benchMigrate(b *testing.B, guest string, cfg machine.Config, p guests.Params, ready func(*testing.B, *benchHost)) {
	requireKVM(b)
	var mu sync.Mutex
	var hosts []*benchHost
	last := func() *benchHost {
		mu.Lock()
		defer mu.Unlock()
		return hosts[len(hosts)-1]
	}
	build := benchBuild(&mu, &hosts)
	m, err := build(cfg, nil)
	require.NoError(b, err)
	img, mode, err := guests.Get(guest)
	require.NoError(b, err)
	mm, err := machine.ParseMode(mode.String())
	require.NoError(b, err)
	require.NoError(b, m.LoadFlat(img, mm))
	require.NoError(b, p.WriteTo(m.Mem()))
	require.NoError(b, m.Start(context.Background()))
	cur := last()
	defer func() { cur.m.Close() }()

	var downtime, targetDown, sentTime, pauseT, finalT, stateT, resumeT, total time.Duration
	var rounds int
	var sent, zero uint64
	var throttle float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		ready(b, cur)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(b, err)
		recvErr := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				recvErr <- err
				return
			}
			defer c.Close()
			tgt := &machinevm.Target{Build: build}
			_, err = migration.Receive(context.Background(), c, tgt, migration.ReceiveOptions{})
			recvErr <- err
		}()
		conn, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(b, err)
		b.StartTimer()
		st, err := migration.Migrate(context.Background(), &machinevm.Source{M: cur.m}, conn, migration.Options{})
		b.StopTimer()
		conn.Close()
		require.NoError(b, err, "serial: %s", cur.serial.String())
		require.NoError(b, <-recvErr)
		ln.Close()
		downtime += st.Downtime
		targetDown += st.TargetDowntime
		sentTime += st.SentTime
		pauseT += st.PauseTime
		finalT += st.FinalPassTime
		stateT += st.SaveStateTime
		resumeT += st.ResumeTime
		total += st.Total
		rounds += st.Rounds
		sent += st.BytesSent
		zero += st.ZeroPages
		throttle = max(throttle, st.Throttle)
		cur.m.Stop(kvm.Result{Reason: kvm.StopMigrated})
		_, _ = cur.m.Wait()
		cur.m.Close()
		cur = last()
		b.StartTimer()
	}
	b.StopTimer()
	require.NotContains(b, cur.serial.String(), "LOST WRITE")
	n := float64(b.N)
	b.ReportMetric(float64(downtime)/n/1e6, "downtime_ms")
	b.ReportMetric(float64(targetDown)/n/1e6, "target_downtime_ms")
	b.ReportMetric(float64(sentTime)/n/1e6, "sent_ms")
	b.ReportMetric(float64(pauseT)/n/1e6, "pause_ms")
	b.ReportMetric(float64(finalT)/n/1e6, "final_pass_ms")
	b.ReportMetric(float64(stateT)/n/1e6, "save_state_ms")
	b.ReportMetric(float64(resumeT)/n/1e6, "target_resume_ms")
	b.ReportMetric(float64(total)/n/1e6, "total_ms")
	b.ReportMetric(float64(rounds)/n, "rounds")
	b.ReportMetric(float64(sent)/n/(1<<20), "sent_MiB")
	b.ReportMetric(float64(zero)/n, "zero_pages")
	b.ReportMetric(throttle, "max_throttle")
}

// BenchmarkMigrateIdle1GiB live-migrates the idle guest (one vCPU halted,
// 1 GiB of RAM of which almost all is zero) host to host. Compare with
// QEMU's migration of the same guest in bench/migrate.sh.
func BenchmarkMigrateIdle1GiB(b *testing.B) {
	first := true
	benchMigrate(b, guests.Idle, machine.Config{MemSize: 1 << 30}, guests.Params{}, func(b *testing.B, h *benchHost) {
		if first {
			benchWait(b, "idle guest prints its banner", func() bool { return strings.Contains(h.serial.String(), "idle") })
			first = false
		}
	})
}

// BenchmarkMigrateDirty live-migrates the self-checking dirtying guest (1
// GiB of RAM, one vCPU rewriting a 64 MiB range page by page without
// pause) host to host; the guest fails the benchmark if a write is lost.
// Auto-converge throttles the vCPU when the dirty rate outruns the link.
func BenchmarkMigrateDirty(b *testing.B) {
	benchMigrate(b, guests.Dirty, machine.Config{MemSize: 1 << 30}, guests.Params{DirtySize: 64 << 20}, func(b *testing.B, h *benchHost) {
		start := h.pass.Load()
		benchWait(b, "dirty guest completes two passes", func() bool { return h.pass.Load() >= start+2 })
	})
}

// BenchmarkRestore512MiB restores a snapshot of a running 512 MiB compute
// guest into a machine, b.N times: LoadSnapshot, then Restore (the lazy
// private mapping of the memory file, vCPU/VM/device state) up to the
// vCPUs running. "newVM" creates the VM, irqchip, PIT and vCPUs inside
// Restore; "pooled" takes them from a machine.Pool whose shell is ready
// before each restore starts (a standby host's case) and moves the mapping
// into the shell's memory slots. It reports the phases Restore measures.
func BenchmarkRestore512MiB(b *testing.B) {
	requireKVM(b)
	cfg := machine.Config{MemSize: 512 << 20}
	var mu sync.Mutex
	var hosts []*benchHost
	m, err := benchBuild(&mu, &hosts)(cfg, nil)
	require.NoError(b, err)
	defer m.Close()
	img, mode, err := guests.Get(guests.Compute)
	require.NoError(b, err)
	mm, _ := machine.ParseMode(mode.String())
	require.NoError(b, m.LoadFlat(img, mm))
	require.NoError(b, m.Start(context.Background()))
	time.Sleep(200 * time.Millisecond) // let it compute and dirty some memory
	dir := b.TempDir() + "/snap"
	_, err = migration.SaveSnapshot(context.Background(), &machinevm.Source{M: m}, dir, migration.SnapshotOptions{LeavePaused: true, NoSync: true})
	require.NoError(b, err)
	m.Stop(kvm.Result{Reason: kvm.StopCanceled})
	_, _ = m.Wait()

	for _, pooled := range []bool{false, true} {
		b.Run(map[bool]string{false: "newVM", true: "pooled"}[pooled], func(b *testing.B) {
			var base machine.Config
			var pool *machine.Pool
			if pooled {
				pool, err = machine.NewPool(cfg, machine.PoolOptions{Size: 1})
				require.NoError(b, err)
				defer pool.Close()
				base.Pool = pool
			}
			var prepare, load, resume, total time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if pool != nil {
					b.StopTimer()
					require.NoError(b, pool.Wait(context.Background(), 1))
					b.StartTimer()
				}
				t0 := time.Now()
				snap, err := migration.LoadSnapshot(dir)
				require.NoError(b, err)
				tgt := &machinevm.Target{Build: benchBuild(&mu, &hosts), Base: base}
				rs, err := migration.Restore(context.Background(), snap, tgt)
				require.NoError(b, err)
				require.True(b, rs.Lazy, "memory mapped lazily")
				total += time.Since(t0)
				prepare, load, resume = prepare+rs.Prepare, load+rs.Load, resume+rs.Resume
				b.StopTimer()
				mu.Lock()
				dst := hosts[len(hosts)-1]
				mu.Unlock()
				require.Equal(b, pooled, dst.m.FromShell())
				dst.m.Stop(kvm.Result{Reason: kvm.StopCanceled})
				_, _ = dst.m.Wait()
				require.NoError(b, dst.m.Close())
				b.StartTimer()
			}
			ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 / float64(b.N) }
			b.ReportMetric(ms(prepare), "prepare_ms")
			b.ReportMetric(ms(load), "load_ms")
			b.ReportMetric(ms(resume), "resume_ms")
			b.ReportMetric(ms(total), "loadsnapshot+restore_ms")
		})
	}
}
