package cgroup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const childEnv = "KVMKIT_CGROUP_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "alloc" {
		// Touch 64 MiB page by page; a 16 MiB limit must stop us.
		const total = 64 << 20
		var keep [][]byte
		for n := 0; n < total; n += 1 << 20 {
			b := make([]byte, 1<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			keep = append(keep, b)
		}
		fmt.Println("allocated", len(keep), "MiB")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fakeHost builds a fake mount table, /proc/self/cgroup and cgroup
// directories under a temporary prefix.
func fakeHost(t *testing.T, v2Controllers string) Options {
	t.Helper()
	root := t.TempDir()
	mountinfo := `25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
30 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
31 1 0:28 / /mnt/with\040space rw - ext4 /dev/vda rw
`
	self := "4:memory:/outer/me\n3:pids:/\n2:blkio:/\n1:cpu:/\n0::/svc\n"
	require.NoError(t, os.WriteFile(filepath.Join(root, "mountinfo"), []byte(mountinfo), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(root, "cgroup"), []byte(self), 0o644))
	for _, d := range []string{"sys/fs/cgroup/cpu", "sys/fs/cgroup/memory/outer/me", "sys/fs/cgroup/pids", "sys/fs/cgroup/blkio", "sys/fs/cgroup/unified/svc"} {
		require.NoError(t, os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(root, "sys/fs/cgroup/unified/svc/cgroup.controllers"), []byte(v2Controllers+"\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(root, "sys/fs/cgroup/unified/svc/cgroup.subtree_control"), nil, 0o644))
	return Options{Mountinfo: filepath.Join(root, "mountinfo"), SelfCgroup: filepath.Join(root, "cgroup"), Prefix: root}
}

// precreate makes the control files a real kernel would create in dir.
func precreate(t *testing.T, dir string, files ...string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	for _, f := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), nil, 0o644))
	}
}

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return string(b)
}

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name        string
		controllers string
		limits      Limits
		want        Version
	}{
		{"empty v2 falls back to v1", "", Limits{}, V1},
		{"hugetlb-only v2 falls back to v1", "hugetlb", Limits{MemoryMax: 1 << 20}, V1},
		{"v2 with everything", "cpu io memory pids", Limits{IO: []IOLimit{{Major: 8}}}, V2},
		{"v2 missing io when io is needed", "cpu memory pids", Limits{IOWeight: 100}, V1},
		{"v2 without io when io is not needed", "cpu memory pids", Limits{}, V2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := fakeHost(t, tc.controllers)
			sys, err := Detect(o, tc.limits)
			require.NoError(t, err)
			assert.Equal(t, tc.want, sys.Version)
			assert.Equal(t, filepath.Join(o.Prefix, "sys/fs/cgroup/memory/outer/me"), sys.V1["memory"])
			assert.Equal(t, filepath.Join(o.Prefix, "sys/fs/cgroup/unified/svc"), sys.Unified)
		})
	}
}

func TestDetectMissing(t *testing.T) {
	o := fakeHost(t, "")
	require.NoError(t, os.WriteFile(o.Mountinfo, []byte("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), 0o644))
	_, err := Detect(o, Limits{})
	require.ErrorIs(t, err, ErrUnavailable)
	assert.Contains(t, err.Error(), "memory")
}

func TestNewV2WritesFiles(t *testing.T) {
	o := fakeHost(t, "cpu io memory pids")
	sys, err := Detect(o, Limits{IO: []IOLimit{{Major: 8, Minor: 0, ReadBPS: 1000, WriteIOPS: 50}}})
	require.NoError(t, err)
	dir := filepath.Join(sys.Unified, "vm1")
	// A real kernel creates the control files on mkdir; the fake cannot, so
	// New fails on the first missing file and must clean up.
	_, err = sys.New("vm1", Limits{CPUQuota: 0.5})
	var fe *FileError
	require.ErrorAs(t, err, &fe)
	assert.NoDirExists(t, dir)
	assert.Equal(t, "+cpu +memory +pids", read(t, filepath.Join(sys.Unified, "cgroup.subtree_control")))
}

func TestNewV1WritesFiles(t *testing.T) {
	o := fakeHost(t, "")
	l := Limits{CPUQuota: 0.5, CPUWeight: 100, MemoryMax: 256 << 20, PidsMax: 64, IOWeight: 500,
		IO: []IOLimit{{Major: 253, Minor: 1, WriteBPS: 1 << 20}}}
	sys, err := Detect(o, l)
	require.NoError(t, err)
	require.Equal(t, V1, sys.Version)
	precreate(t, filepath.Join(sys.V1["cpu"], "vm"), "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares", "cgroup.procs")
	precreate(t, filepath.Join(sys.V1["memory"], "vm"), "memory.limit_in_bytes", "cgroup.procs")
	precreate(t, filepath.Join(sys.V1["pids"], "vm"), "pids.max", "cgroup.procs")
	precreate(t, filepath.Join(sys.V1["blkio"], "vm"), "blkio.weight", "blkio.throttle.write_bps_device", "cgroup.procs")
	cg := &Cgroup{version: V1, name: "vm", dirs: map[string]string{}}
	for _, c := range []string{"cpu", "memory", "pids", "blkio"} {
		cg.dirs[c] = filepath.Join(sys.V1[c], "vm")
	}
	// The fake kernel cannot create control files on mkdir, so write the
	// limits into pre-made directories.
	require.NoError(t, writeLimitsV1(cg, l))
	assert.Equal(t, "100000", read(t, filepath.Join(cg.dirs["cpu"], "cpu.cfs_period_us")))
	assert.Equal(t, "50000", read(t, filepath.Join(cg.dirs["cpu"], "cpu.cfs_quota_us")))
	assert.Equal(t, "2597", read(t, filepath.Join(cg.dirs["cpu"], "cpu.shares")))
	assert.Equal(t, "268435456", read(t, filepath.Join(cg.dirs["memory"], "memory.limit_in_bytes")))
	assert.NoFileExists(t, filepath.Join(cg.dirs["memory"], "memory.memsw.limit_in_bytes"))
	assert.Equal(t, "64", read(t, filepath.Join(cg.dirs["pids"], "pids.max")))
	assert.Equal(t, "50", read(t, filepath.Join(cg.dirs["blkio"], "blkio.weight")))
	assert.Equal(t, "253:1 1048576", read(t, filepath.Join(cg.dirs["blkio"], "blkio.throttle.write_bps_device")))
	require.NoError(t, cg.AddProcess(42))
	assert.Equal(t, "42", read(t, filepath.Join(cg.dirs["pids"], "cgroup.procs")))
}

func TestValidate(t *testing.T) {
	for _, l := range []Limits{
		{CPUQuota: -1}, {CPUQuota: 0.001}, {CPUPeriod: time.Hour}, {CPUWeight: 20000},
		{MemoryMax: -5}, {PidsMax: -1}, {IOWeight: 10001},
	} {
		var le *LimitError
		assert.ErrorAs(t, l.Validate(), &le, "%+v", l)
	}
	assert.NoError(t, Limits{CPUQuota: 2, MemoryMax: 1}.Validate())
	_, err := (&System{Version: V1}).New("a/b", Limits{})
	assert.ErrorIs(t, err, ErrBadName)
}

func TestSharesFromWeight(t *testing.T) {
	assert.EqualValues(t, 2, SharesFromWeight(1))
	assert.EqualValues(t, 262144, SharesFromWeight(10000))
	assert.EqualValues(t, 1024, SharesFromWeight(0))
}

func TestParseMountinfoUnescape(t *testing.T) {
	ms, err := parseMountinfo(strings.NewReader("31 1 0:28 / /mnt/a\\040b rw - cgroup cgroup rw,cpu\nbad line\n"))
	require.NoError(t, err)
	require.Len(t, ms, 1)
	assert.Equal(t, "/mnt/a b", ms[0].point)
}

func FuzzParseMountinfo(f *testing.F) {
	f.Add("26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")
	f.Add("30 25 0:27 /x /a\\04 rw - cgroup2 cgroup2 rw\n")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := parseMountinfo(strings.NewReader(s))
		if err == nil {
			for _, m := range ms {
				require.Contains(t, []string{"cgroup", "cgroup2"}, m.fstype)
			}
		}
		_, _ = parseSelfCgroup(strings.NewReader(s))
	})
}

func realSystem(t *testing.T, l Limits) *System {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	sys, err := Detect(Options{}, l)
	if err != nil {
		t.Skipf("no usable cgroups: %v", err)
	}
	return sys
}

func TestRealGroupLifecycle(t *testing.T) {
	l := Limits{CPUQuota: 0.5, MemoryMax: 64 << 20, PidsMax: 32}
	sys := realSystem(t, l)
	t.Logf("host uses cgroup %s (v2 controllers: %q)", sys.Version, sys.V2Controllers)
	name := fmt.Sprintf("kvmkit-test-%d", os.Getpid())
	cg, err := sys.New(name, l)
	require.NoError(t, err)
	dirs := cg.Dirs()
	t.Cleanup(func() { _ = cg.Remove(context.Background()) })

	cmd := exec.Command("sleep", "30")
	require.NoError(t, cmd.Start())
	require.NoError(t, cg.AddProcess(cmd.Process.Pid))
	pids, err := cg.Procs()
	require.NoError(t, err)
	assert.Contains(t, pids, cmd.Process.Pid)
	member := read(t, fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	assert.Contains(t, member, "/"+name)
	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, cg.Remove(ctx))
	for _, d := range dirs {
		assert.NoDirExists(t, d)
	}
}

func TestRealMemoryLimitKills(t *testing.T) {
	l := Limits{MemoryMax: 16 << 20}
	sys := realSystem(t, l)
	cg, err := sys.New(fmt.Sprintf("kvmkit-oom-%d", os.Getpid()), l)
	require.NoError(t, err)
	t.Cleanup(func() { _ = cg.Remove(context.Background()) })

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=alloc", "GOGC=off")
	// The child allocates only after its runtime has started, by which
	// time it is in the group.
	require.NoError(t, cmd.Start())
	require.NoError(t, cg.AddProcess(cmd.Process.Pid))
	err = cmd.Wait()
	require.Error(t, err, "64 MiB must not fit in a 16 MiB group")
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	assert.Equal(t, syscall.SIGKILL, ws.Signal())
	n, err := cg.OOMKills()
	require.NoError(t, err)
	assert.Positive(t, n)
}
