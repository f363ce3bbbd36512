package machinevm_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/machinevm"
)

func requireKVM(t testing.TB) {
	t.Helper()
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
}

// vmHost is one "host": a machine plus what its guest reported.
type vmHost struct {
	m      *machine.Machine
	serial *syncBuffer
	pass   atomic.Uint32 // last value the guest wrote to the progress port
	vals   *valueLog     // compute's data port
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type valueLog struct {
	mu   sync.Mutex
	vals []uint32
}

func (v *valueLog) add(x uint32) {
	v.mu.Lock()
	v.vals = append(v.vals, x)
	v.mu.Unlock()
}

func (v *valueLog) get() []uint32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]uint32(nil), v.vals...)
}

// build is the BuildFunc of the tests: a machine with devices on the
// progress and data ports, recorded in hosts.
func build(hosts *[]*vmHost) machinevm.BuildFunc {
	return func(cfg machine.Config, _ json.RawMessage) (*machine.Machine, error) {
		h := &vmHost{serial: &syncBuffer{}, vals: &valueLog{}}
		cfg.Serial = h.serial
		m, err := machine.New(cfg)
		if err != nil {
			return nil, err
		}
		h.m = m
		err = errors.Join(
			m.PIO().Register(guests.ProgressPort, 1, kvm.DeviceFunc{WriteFunc: func(_ uint64, d []byte) {
				if len(d) == 4 {
					h.pass.Store(binary.LittleEndian.Uint32(d))
				}
			}}),
			m.PIO().Register(guests.DataPort, 1, kvm.DeviceFunc{WriteFunc: func(_ uint64, d []byte) {
				if len(d) == 4 {
					h.vals.add(binary.LittleEndian.Uint32(d))
				}
			}}),
		)
		if err != nil {
			m.Close()
			return nil, err
		}
		*hosts = append(*hosts, h)
		return m, nil
	}
}

// startGuest builds the first host and starts guest name on it.
func startGuest(t *testing.T, name string, cfg machine.Config, p guests.Params, hosts *[]*vmHost) *vmHost {
	t.Helper()
	m, err := build(hosts)(cfg, nil)
	require.NoError(t, err)
	img, mode, err := guests.Get(name)
	require.NoError(t, err)
	mm, _ := machine.ParseMode(mode.String())
	require.NoError(t, m.LoadFlat(img, mm))
	require.NoError(t, p.WriteTo(m.Mem()))
	require.NoError(t, m.Start(context.Background()))
	h := (*hosts)[len(*hosts)-1]
	t.Cleanup(func() { m.Close() })
	return h
}

// waitFor polls cond for up to 60 s on h's machine. It fails at once,
// with the run's result, when the machine's run ends, and on a timeout
// reports where the vCPUs are, so a stuck guest is told from a slow one.
func waitFor(t *testing.T, h *vmHost, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	r := h.m.Runner()
	for !cond() {
		select {
		case <-r.Done():
			res, err := h.m.Wait()
			t.Fatalf("%s: the run ended first: result %+v, err %v; serial: %q", what, res, err, h.serial.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 60s; exits %d, paused %v, %s; serial: %q",
				what, r.Exits(), r.Paused(), vcpuWhere(h.m), h.serial.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// vcpuWhere pauses m and reads each vCPU's RIP for a stall report.
func vcpuWhere(m *machine.Machine) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.Pause(ctx); err != nil {
		return fmt.Sprintf("pause for the report failed: %v", err)
	}
	defer func() { _ = m.Resume() }()
	var b strings.Builder
	for i, c := range m.VCPUs() {
		regs, err := c.Regs()
		if err != nil {
			fmt.Fprintf(&b, "vCPU %d: %v; ", i, err)
			continue
		}
		fmt.Fprintf(&b, "vCPU %d: rip %#x rsp %#x rflags %#x; ", i, regs.RIP, regs.RSP, regs.RFLAGS)
	}
	return b.String()
}

// migrateOnce moves src to a new host over loopback TCP.
func migrateOnce(t *testing.T, src *vmHost, hosts *[]*vmHost, opts migration.Options) (migration.Stats, *vmHost, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	tgt := &machinevm.Target{Build: build(hosts), Base: machine.Config{}}
	var recvErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			recvErr = err
			return
		}
		defer c.Close()
		_, recvErr = migration.Receive(context.Background(), c, tgt, migration.ReceiveOptions{})
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	st, err := migration.Migrate(context.Background(), &machinevm.Source{M: src.m}, conn, opts)
	conn.Close()
	wg.Wait()
	if err != nil {
		return st, nil, err
	}
	require.NoError(t, recvErr)
	src.m.Stop(kvm.Result{Reason: kvm.StopMigrated})
	_, _ = src.m.Wait()
	dst := (*hosts)[len(*hosts)-1]
	t.Cleanup(func() { dst.m.Close() })
	return st, dst, nil
}

// envInt reads a positive integer from the environment, or def.
func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	require.NoError(t, err, name)
	require.Positive(t, n, name)
	return n
}

// TestLiveMigrateDirtyGuest migrates the self-checking dirtying guest from
// host to host while it runs. The guest checks on every pass that each page
// still holds what it wrote on the previous pass; a lost write makes it
// print LOST WRITE and exit 1. After the last hop it must keep passing.
// KVMKIT_MIGRATE_HOPS (default 3) and KVMKIT_MIGRATE_DIRTY_MIB (default
// 16) scale it up: bench/migrate-hops.sh runs 100 hops of 64 MiB and
// checks every downtime in the "hop" lines this test logs.
func TestLiveMigrateDirtyGuest(t *testing.T) {
	requireKVM(t)
	hops := envInt(t, "KVMKIT_MIGRATE_HOPS", 3)
	dirty := uint64(envInt(t, "KVMKIT_MIGRATE_DIRTY_MIB", 16)) << 20
	for _, cpus := range []int{1, 2} {
		var hosts []*vmHost
		cur := startGuest(t, guests.Dirty, machine.Config{MemSize: dirty + 48<<20, CPUs: cpus},
			guests.Params{DirtySize: dirty}, &hosts)
		for hop := range hops {
			start := cur.pass.Load()
			waitFor(t, cur, "guest makes progress", func() bool { return cur.pass.Load() >= start+2 })
			st, next, err := migrateOnce(t, cur, &hosts, migration.Options{})
			require.NoError(t, err, "hop %d (cpus=%d), serial: %s", hop, cpus, cur.serial.String())
			t.Logf("cpus=%d hop %d at pass %d: downtime %v (target side %v), total %v, rounds %d, pages %d, zero pages %d, hole pages %d, bytes %d, throttle %.2f",
				cpus, hop, cur.pass.Load(), st.Downtime, st.TargetDowntime, st.Total, st.Rounds, st.PagesSent, st.ZeroPages, st.HolePages, st.BytesSent, st.Throttle)
			assert.NotContains(t, next.serial.String(), "LOST WRITE", "hop %d", hop)
			require.NoError(t, cur.m.Close(), "closing the source of hop %d", hop)
			cur = next
		}
		start := cur.pass.Load()
		waitFor(t, cur, "guest keeps passing its check after the last hop", func() bool { return cur.pass.Load() >= start+3 })
		assert.NotContains(t, cur.serial.String(), "LOST WRITE")
		cur.m.Stop(kvm.Result{Reason: kvm.StopCanceled})
		res, err := cur.m.Wait()
		require.NoError(t, err, "serial: %s", cur.serial.String())
		assert.Equal(t, kvm.StopCanceled, res.Reason, "the guest ran until stopped (it exits on a lost write)")
		require.NoError(t, cur.m.Close())
	}
}

// failingConn fails every write after n bytes, like a dropped connection.
type failingConn struct {
	net.Conn
	left atomic.Int64
}

func (c *failingConn) Write(p []byte) (int, error) {
	if c.left.Add(-int64(len(p))) < 0 {
		c.Conn.Close()
		return 0, errors.New("injected connection drop")
	}
	return c.Conn.Write(p)
}

// TestMigrationFailureKeepsSourceRunning drops the connection at several
// points: each time the source keeps running the guest, which still passes
// its own check at the end.
func TestMigrationFailureKeepsSourceRunning(t *testing.T) {
	requireKVM(t)
	var hosts []*vmHost
	src := startGuest(t, guests.Dirty, machine.Config{MemSize: 64 << 20},
		guests.Params{DirtySize: 8 << 20, DirtyPasses: 0}, &hosts)
	for _, after := range []int64{100, 64 << 10, 4 << 20, 12 << 20} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			tgt := &machinevm.Target{Build: build(&hosts)}
			_, _ = migration.Receive(context.Background(), c, tgt, migration.ReceiveOptions{IdleTimeout: 5 * time.Second})
		}()
		raw, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		fc := &failingConn{Conn: raw}
		fc.left.Store(after)
		_, err = migration.Migrate(context.Background(), &machinevm.Source{M: src.m}, fc, migration.Options{})
		require.Error(t, err, "drop after %d bytes", after)
		raw.Close()
		ln.Close()
		p := src.pass.Load()
		waitFor(t, src, "source still runs the guest", func() bool { return src.pass.Load() >= p+2 })
		assert.NotContains(t, src.serial.String(), "LOST WRITE")
	}
	src.m.Stop(kvm.Result{Reason: kvm.StopCanceled})
	_, err := src.m.Wait()
	require.NoError(t, err)
}

// TestSnapshotRestoreCompute snapshots the compute guest to a directory,
// restores it (lazily mapped memory) into a new VM and into a pooled shell
// (the mapping moved into its memory slots), and checks the sequence goes on.
func TestSnapshotRestoreCompute(t *testing.T) {
	requireKVM(t)
	cfg := machine.Config{MemSize: 32 << 20}
	for _, pooled := range []bool{false, true} {
		t.Run(map[bool]string{false: "new VM", true: "pooled shell"}[pooled], func(t *testing.T) {
			var hosts []*vmHost
			src := startGuest(t, guests.Compute, cfg, guests.Params{}, &hosts)
			var base machine.Config
			if pooled {
				p, err := machine.NewPool(cfg, machine.PoolOptions{Size: 1})
				require.NoError(t, err)
				t.Cleanup(func() { p.Close() })
				require.NoError(t, p.Wait(context.Background(), 1))
				base.Pool = p
			}
			waitFor(t, src, "compute runs", func() bool { return len(src.vals.get()) >= 200 })
			dir := t.TempDir() + "/snap"
			_, err := migration.SaveSnapshot(context.Background(), &machinevm.Source{M: src.m}, dir, migration.SnapshotOptions{LeavePaused: true, NoSync: true})
			require.NoError(t, err)
			seen := len(src.vals.get())
			src.m.Stop(kvm.Result{Reason: kvm.StopCanceled})
			_, _ = src.m.Wait()

			snap, err := migration.LoadSnapshot(dir)
			require.NoError(t, err)
			tgt := &machinevm.Target{Build: build(&hosts), Base: base}
			rs, err := migration.Restore(context.Background(), snap, tgt)
			require.NoError(t, err)
			t.Logf("restore: lazy=%v prepare %v load %v resume %v total %v", rs.Lazy, rs.Prepare, rs.Load, rs.Resume, rs.Total)
			dst := hosts[len(hosts)-1]
			t.Cleanup(func() { dst.m.Close() })
			assert.True(t, rs.Lazy)
			assert.Equal(t, pooled, dst.m.FromShell())
			waitFor(t, dst, "restored compute runs", func() bool { return len(dst.vals.get()) >= 100 })
			dst.m.Stop(kvm.Result{Reason: kvm.StopCanceled})
			_, _ = dst.m.Wait()

			want := guests.ComputeSequence(seen + 100)
			assert.Equal(t, want[:seen], src.vals.get()[:seen])
			assert.Equal(t, want[seen:seen+100], dst.vals.get()[:100], "restored guest continues the sequence")
		})
	}
}

func TestCPUIDCodec(t *testing.T) {
	in := []kvm.CPUIDEntry{{Function: 1, Index: 0, EAX: 2, EBX: 3, ECX: 4, EDX: 5}, {Function: 7, Index: 1, Flags: 1, EBX: 0xffffffff}}
	out, err := machinevm.DecodeCPUID(machinevm.EncodeCPUID(in))
	require.NoError(t, err)
	assert.Equal(t, in, out)
	_, err = machinevm.DecodeCPUID(make([]byte, 27))
	assert.Error(t, err)
}

func FuzzDecodeCPUID(f *testing.F) {
	f.Add(machinevm.EncodeCPUID([]kvm.CPUIDEntry{{Function: 1}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if e, err := machinevm.DecodeCPUID(b); err == nil {
			assert.True(t, bytes.Equal(b, machinevm.EncodeCPUID(e)), "round trip of %x", b)
		}
	})
}
