package isolation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/isolation/cgroup"
	"github.com/kvmkit/kvmkit/isolation/jail"
	"github.com/kvmkit/kvmkit/isolation/seccomp"
)

// TestMain doubles as the jailed VMM stand-in: under Launch it reports on
// itself, then does what KVMKIT_PROBE asks.
func TestMain(m *testing.M) {
	jailed, err := Child()
	if jailed {
		if err != nil {
			fmt.Println("child error:", err)
			os.Exit(3)
		}
		os.Exit(probe())
	}
	os.Exit(m.Run())
}

func probe() int {
	fmt.Println("hello from the jail") // the "first line" for the benchmark
	st, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(st), "\n") {
		for _, k := range []string{"Seccomp:", "NoNewPrivs:", "Uid:"} {
			if strings.HasPrefix(l, k) {
				fmt.Println(strings.Join(strings.Fields(l), " "))
			}
		}
	}
	switch os.Getenv("KVMKIT_PROBE") {
	case "socket":
		_, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		fmt.Println("socket:", err)
	case "alloc":
		var keep [][]byte
		for range 256 {
			b := make([]byte, 1<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			keep = append(keep, b)
		}
		fmt.Println("allocated", len(keep), "MiB")
	case "exit42":
		return 42
	}
	return 0
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: namespaces, cgroups and mounts")
	}
}

type launched struct {
	res    *Result
	err    error
	out    string
	cgdirs []string
}

func launch(t testing.TB, mode seccomp.Mode, probe string, limits cgroup.Limits) launched {
	t.Helper()
	base := t.TempDir()
	var out bytes.Buffer
	cfg := Config{
		Name:    fmt.Sprintf("kvmkit-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6),
		Jail:    jail.Config{Dir: filepath.Join(base, "jail"), UID: 65534, GID: 65534, Env: []string{"KVMKIT_PROBE=" + probe}},
		Limits:  limits,
		Seccomp: mode,
		Args:    []string{"-test.run=^$"},
		Stdout:  &out,
		Stderr:  &out,
	}
	res, err := Launch(context.Background(), cfg)
	l := launched{res: res, err: err, out: out.String()}
	// Nothing may be left behind.
	assert.NoDirExists(t, cfg.Jail.Dir)
	mounts, merr := jail.MountsUnder(base)
	require.NoError(t, merr)
	assert.Empty(t, mounts)
	sys, derr := cgroup.Detect(cgroup.Options{}, limits)
	require.NoError(t, derr)
	for _, d := range sys.V1 {
		assert.NoDirExists(t, filepath.Join(d, cfg.Name))
	}
	return l
}

func TestLaunchConfinedWithSeccomp(t *testing.T) {
	requireRoot(t)
	l := launch(t, seccomp.ModeErrno, "socket", cgroup.Limits{CPUQuota: 0.5, MemoryMax: 256 << 20, PidsMax: 128})
	require.NoError(t, l.err, l.out)
	assert.Equal(t, 0, l.res.ExitCode)
	assert.Contains(t, l.out, "Seccomp: 2")
	assert.Contains(t, l.out, "NoNewPrivs: 1")
	assert.Contains(t, l.out, "Uid: 65534 65534 65534 65534")
	assert.Contains(t, l.out, "socket: operation not permitted", "a forbidden system call is blocked")
}

func TestLaunchEnforceNamesSyscall(t *testing.T) {
	requireRoot(t)
	l := launch(t, seccomp.ModeEnforce, "socket", cgroup.Limits{})
	require.Error(t, l.err)
	assert.ErrorIs(t, l.err, seccomp.ErrViolation)
	assert.Contains(t, l.err.Error(), "socket")
	assert.Equal(t, 128+31, l.res.ExitCode)
	assert.NotContains(t, l.out, "socket:")
}

func TestLaunchExitCodePassesThrough(t *testing.T) {
	requireRoot(t)
	l := launch(t, seccomp.ModeEnforce, "exit42", cgroup.Limits{})
	require.NoError(t, l.err, l.out)
	assert.Equal(t, 42, l.res.ExitCode)
	assert.True(t, strings.HasPrefix(l.out, "hello from the jail\n"), l.out)
}

func TestLaunchMemoryLimitKills(t *testing.T) {
	requireRoot(t)
	l := launch(t, seccomp.ModeOff, "alloc", cgroup.Limits{MemoryMax: 48 << 20})
	require.Error(t, l.err)
	assert.ErrorIs(t, l.err, ErrMemoryLimit)
	assert.Contains(t, l.err.Error(), "memory limit 48M exceeded")
	assert.NotContains(t, l.out, "allocated")
}

func TestLaunchMemoryLimitBelowGuest(t *testing.T) {
	_, err := Launch(context.Background(), Config{
		Jail:        jail.Config{Dir: "/nonexistent/never-created"},
		Limits:      cgroup.Limits{MemoryMax: 64 << 20},
		GuestMemory: 128 << 20,
	})
	var me *MemoryLimitError
	require.ErrorAs(t, err, &me)
	assert.Equal(t, "isolation: memory limit 64M is below guest memory 128M plus 32M VMM overhead", err.Error())
	assert.NoDirExists(t, "/nonexistent/never-created")
}

func TestLaunchCancel(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Launch(ctx, Config{
		Jail: jail.Config{Dir: filepath.Join(t.TempDir(), "j"), UID: 1, GID: 1},
		Args: []string{"-test.run=^$"}, Stdout: io.Discard,
	})
	// The child may finish before the kill lands; either way no hang.
	if err != nil {
		assert.True(t, errors.Is(err, context.Canceled), "%v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"256M": 256 << 20, "1G": 1 << 30, "512k": 512 << 10, "4096": 4096, "2GiB": 2 << 30, "8MB": 8 << 20} {
		got, err := ParseSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "M", "-1M", "1.5G", "99999999999T"} {
		_, err := ParseSize(in)
		assert.ErrorIs(t, err, ErrBadFlag, in)
	}
	assert.Equal(t, "256M", FormatSize(256<<20))
	assert.Equal(t, "1000", FormatSize(1000))
}

func TestParseCPUQuota(t *testing.T) {
	for in, want := range map[string]float64{"50%": 0.5, "200%": 2, "0.25": 0.25} {
		got, err := ParseCPUQuota(in)
		require.NoError(t, err, in)
		assert.InDelta(t, want, got, 1e-9, in)
	}
	for _, in := range []string{"", "0%", "-5%", "abc", "NaN"} {
		_, err := ParseCPUQuota(in)
		assert.ErrorIs(t, err, ErrBadFlag, in)
	}
}

func TestConfigFromFlags(t *testing.T) {
	c, err := ConfigFromFlags(Flags{Jail: "/srv/jail", UID: 1000, GID: 1000, CPUQuota: "50%", MemLimit: "256M", Seccomp: "enforce", SELinux: "auto"})
	require.NoError(t, err)
	assert.Equal(t, "/srv/jail", c.Jail.Dir)
	assert.Equal(t, 1000, c.Jail.UID)
	assert.InDelta(t, 0.5, c.Limits.CPUQuota, 1e-9)
	assert.EqualValues(t, 256<<20, c.Limits.MemoryMax)
	assert.Equal(t, seccomp.ModeEnforce, c.Seccomp)
	_, err = ConfigFromFlags(Flags{Jail: "/x", Seccomp: "bogus"})
	assert.ErrorIs(t, err, seccomp.ErrBadMode)
	_, err = ConfigFromFlags(Flags{})
	assert.ErrorIs(t, err, ErrBadFlag)
}

func FuzzParseSize(f *testing.F) {
	f.Add("256M")
	f.Add("9223372036854775807")
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil {
			require.GreaterOrEqual(t, n, int64(0))
		}
		_, _ = ParseCPUQuota(s)
	})
}

// firstLine records when the first byte arrives.
type firstLine struct {
	mu  sync.Mutex
	at  time.Time
	buf bytes.Buffer // not embedded: its ReadFrom would bypass Write
}

func (f *firstLine) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.buf.String()
}

func (f *firstLine) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.at.IsZero() {
		f.at = time.Now()
	}
	return f.buf.Write(p)
}

// BenchmarkJailStartup measures ms from Launch to the jailed program's
// first line of output, with cgroup, jail and seccomp (enforce).
func BenchmarkJailStartup(b *testing.B) {
	requireRoot(b)
	var total time.Duration
	for i := 0; i < b.N; i++ {
		out := &firstLine{}
		t0 := time.Now()
		_, err := Launch(context.Background(), Config{
			Name:    fmt.Sprintf("kvmkit-bench-%d-%d", os.Getpid(), i),
			Jail:    jail.Config{Dir: filepath.Join(b.TempDir(), "jail"), UID: 65534, GID: 65534},
			Limits:  cgroup.Limits{MemoryMax: 256 << 20, CPUQuota: 1},
			Seccomp: seccomp.ModeEnforce,
			Args:    []string{"-test.run=^$"},
			Stdout:  out,
		})
		if err != nil {
			b.Fatal(err)
		}
		if out.at.IsZero() {
			b.Fatalf("no output from the jailed program: %q", out.String())
		}
		total += out.at.Sub(t0)
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/first-line")
}
