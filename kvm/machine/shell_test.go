package machine_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

// TestShellRunsGuests boots guests on machines built on shells: the shell's
// VM, memory and vCPUs are what the guest runs on.
func TestShellRunsGuests(t *testing.T) {
	requireKVM(t)
	cases := []struct {
		guest   string
		cpus    int
		irqchip bool
		params  *guests.Params
		want    string
	}{
		{guest: "hello64", want: "Hello from a kvmkit long-mode guest!\r\n"},
		{guest: "hello16", irqchip: true, want: "Hello from a kvmkit real-mode guest!\r\n"},
		{guest: "smp", cpus: 2, irqchip: true, want: "smp: 2 vCPUs up\r\n"},
		{guest: "dirty", params: &guests.Params{DirtySize: 4 << 20, DirtyPasses: 3}},
	}
	for _, c := range cases {
		t.Run(c.guest, func(t *testing.T) {
			var out syncBuffer
			cfg := machine.Config{CPUs: c.cpus, Serial: &out, NoIRQChip: !c.irqchip, MemSize: 64 << 20}
			sh, err := machine.NewShell(cfg)
			require.NoError(t, err)
			cfg.Shell = sh
			m := newGuest(t, c.guest, cfg, c.params)
			assert.True(t, m.FromShell())
			res, err := run(t, m)
			require.NoError(t, err, "serial: %q", out.String())
			assert.Equal(t, kvm.StopExitPort, res.Reason)
			assert.Equal(t, uint8(0), res.ExitCode, "serial: %q", out.String())
			assert.Contains(t, out.String(), c.want)
			assert.NoError(t, sh.Close(), "closing a shell a machine took does nothing")
		})
	}
}

func TestShellMisuse(t *testing.T) {
	requireKVM(t)
	cfg := machine.Config{MemSize: 16 << 20, NoIRQChip: true}
	cases := []struct {
		name  string
		shell machine.Config
		use   func(*machine.Shell)
		want  error
	}{
		{name: "other memory size", shell: machine.Config{MemSize: 32 << 20, NoIRQChip: true}, want: machine.ErrShellMismatch},
		{name: "other vCPU count", shell: machine.Config{MemSize: 16 << 20, CPUs: 2, NoIRQChip: true}, want: machine.ErrShellMismatch},
		{name: "irqchip", shell: machine.Config{MemSize: 16 << 20}, want: machine.ErrShellMismatch},
		{name: "closed", shell: cfg, use: func(sh *machine.Shell) { require.NoError(t, sh.Close()) }, want: machine.ErrShellUsed},
		{name: "taken", shell: cfg, use: func(sh *machine.Shell) {
			c := cfg
			c.Shell = sh
			m, err := machine.New(c)
			require.NoError(t, err)
			t.Cleanup(func() { m.Close() })
		}, want: machine.ErrShellUsed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sh, err := machine.NewShell(c.shell)
			require.NoError(t, err)
			if c.use != nil {
				c.use(sh)
			}
			mc := cfg
			mc.Shell = sh
			_, err = machine.New(mc)
			assert.ErrorIs(t, err, c.want)
			assert.NoError(t, sh.Close())
		})
	}
}

// TestShellRunsMovedMemory moves memory holding a guest into a shell, the
// way a restore from a snapshot does, and runs it.
func TestShellRunsMovedMemory(t *testing.T) {
	requireKVM(t)
	cfg := machine.Config{MemSize: 16 << 20, NoIRQChip: true}
	img, gm, err := guests.Get(guests.Exit42)
	require.NoError(t, err)
	// A machine that is never run lays the guest out in its memory; its
	// memory is then handed to a shell.
	layout, err := machine.New(cfg)
	require.NoError(t, err)
	mode, _ := machine.ParseMode(gm.String())
	require.NoError(t, layout.LoadFlat(img, mode))
	st, err := layout.SaveState()
	require.NoError(t, err)
	mem, err := kvm.NewMemory(machine.RAMLayout(cfg.MemSize), kvm.MemoryOptions{})
	require.NoError(t, err)
	for i, r := range layout.Mem().Regions() {
		copy(mem.Regions()[i].Host, r.Host)
	}
	require.NoError(t, layout.Close())

	sh, err := machine.NewShell(cfg)
	require.NoError(t, err)
	cfg.Shell, cfg.Memory = sh, mem
	m, err := machine.New(cfg)
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.RestoreState(st))
	res, err := run(t, m)
	require.NoError(t, err)
	assert.Equal(t, uint8(42), res.ExitCode)
}

func TestPool(t *testing.T) {
	requireKVM(t)
	cfg := machine.Config{MemSize: 32 << 20, NoIRQChip: true}
	p, err := machine.NewPool(cfg, machine.PoolOptions{Size: 2})
	require.NoError(t, err)
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, p.Wait(ctx, 2))
	assert.Equal(t, 2, p.Stats().Ready)

	img, gm, err := guests.Get(guests.Exit42)
	require.NoError(t, err)
	mode, _ := machine.ParseMode(gm.String())
	start := func(c machine.Config) *machine.Machine {
		c.Pool = p
		m, err := machine.New(c)
		require.NoError(t, err)
		t.Cleanup(func() { m.Close() })
		require.NoError(t, m.LoadFlat(img, mode))
		return m
	}
	var ms []*machine.Machine
	for range 3 {
		ms = append(ms, start(cfg))
	}
	other := cfg
	other.MemSize = 16 << 20
	ms = append(ms, start(other))
	for i, m := range ms {
		res, err := run(t, m)
		require.NoError(t, err)
		assert.Equal(t, uint8(42), res.ExitCode, "machine %d", i)
	}
	assert.True(t, ms[0].FromShell())
	assert.False(t, ms[3].FromShell(), "another shape builds its own VM")
	st := p.Stats()
	assert.GreaterOrEqual(t, st.Taken, 2)
	assert.Equal(t, 4, st.Taken+st.Misses)
	require.NoError(t, p.Wait(ctx, 2), "the pool refills")
	assert.Equal(t, st.Taken+2, p.Stats().Built)

	require.NoError(t, p.Close())
	assert.Nil(t, p.Get())
	assert.ErrorIs(t, p.Wait(ctx, 1), machine.ErrPoolClosed)
}

// TestPoolLimit: a pool builds no more than its Limit.
func TestPoolLimit(t *testing.T) {
	requireKVM(t)
	cfg := machine.Config{MemSize: 16 << 20, NoIRQChip: true}
	p, err := machine.NewPool(cfg, machine.PoolOptions{Size: 1, Limit: 1})
	require.NoError(t, err)
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, p.Wait(ctx, 1))
	cfg.Pool = p
	for _, fromShell := range []bool{true, false} {
		m, err := machine.New(cfg)
		require.NoError(t, err)
		assert.Equal(t, fromShell, m.FromShell())
		require.NoError(t, m.Close())
	}
	require.NoError(t, p.Wait(ctx, 1), "returns at once: nothing more will be built")
	st := p.Stats()
	assert.Equal(t, machine.PoolStats{Built: 1, Taken: 1, Misses: 1, BuildTime: st.BuildTime}, st)
}

// TestPoolReportsBuildFailures runs anywhere: the device does not exist.
func TestPoolReportsBuildFailures(t *testing.T) {
	p, err := machine.NewPool(machine.Config{Device: "/nonexistent/kvm", Logger: slog.New(slog.DiscardHandler)}, machine.PoolOptions{Size: 1})
	require.NoError(t, err)
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = p.Wait(ctx, 1)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "/nonexistent/kvm")
	assert.GreaterOrEqual(t, p.Stats().Failed, 1)
	assert.Nil(t, p.Get())

	_, err = machine.NewPool(machine.Config{}, machine.PoolOptions{})
	assert.Error(t, err)
}
