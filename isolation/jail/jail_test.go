package jail

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const probeEnv = "KVMKIT_JAIL_TEST_PROBE"

// probe is what the jailed helper reports about itself.
type probe struct {
	Status      map[string]string
	NS          map[string]string
	Hostname    string
	HostFileErr string
	DevNull     string
	Image       string
	ImageWrite  string
	RootEntries []string
	FDs         []string
}

func TestMain(m *testing.M) {
	if Enter() {
		os.Exit(runProbe())
	}
	os.Exit(m.Run())
}

func runProbe() int {
	var p probe
	p.Status = map[string]string{}
	st, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(st), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok {
			p.Status[k] = strings.TrimSpace(v)
		}
	}
	p.NS = map[string]string{}
	for _, ns := range []string{"mnt", "pid", "net", "ipc", "uts", "user"} {
		l, err := os.Readlink("/proc/self/ns/" + ns)
		if err != nil {
			l = "error: " + err.Error()
		}
		p.NS[ns] = l
	}
	p.Hostname, _ = os.Hostname()
	if _, err := os.ReadFile(os.Getenv("HOST_FILE")); err != nil {
		p.HostFileErr = err.Error()
	}
	if f, err := os.OpenFile("/dev/null", os.O_WRONLY, 0); err != nil {
		p.DevNull = err.Error()
	} else {
		p.DevNull = "ok"
		f.Close()
	}
	if b, err := os.ReadFile("/images/disk.img"); err == nil {
		p.Image = string(b)
	} else {
		p.Image = err.Error()
	}
	if err := os.WriteFile("/images/disk.img", []byte("x"), 0); err != nil {
		p.ImageWrite = err.Error()
	}
	ents, _ := os.ReadDir("/")
	for _, e := range ents {
		p.RootEntries = append(p.RootEntries, e.Name())
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, e := range fds {
		// Pipes beyond stdio can only have been inherited.
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.HasPrefix(l, "pipe:") && e.Name() > "2" {
			p.FDs = append(p.FDs, e.Name())
		}
	}
	_ = json.NewEncoder(os.Stdout).Encode(&p)
	if code := os.Getenv("EXIT_CODE"); code != "" {
		var n int
		fmt.Sscan(code, &n)
		return n
	}
	return 0
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: namespaces, mounts and mknod")
	}
}

func hostNS(t *testing.T) map[string]string {
	out := map[string]string{}
	for _, ns := range []string{"mnt", "pid", "net", "ipc", "uts", "user"} {
		l, err := os.Readlink("/proc/self/ns/" + ns)
		require.NoError(t, err)
		out[ns] = l
	}
	return out
}

func runJailed(t *testing.T, cfg Config, env ...string) (probe, *Cmd, error) {
	t.Helper()
	c, err := Command(cfg, []string{"-test.run=^$"})
	require.NoError(t, err)
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	c.Env = append(os.Environ(), env...)
	require.NoError(t, c.Start())
	if err := c.Release(); err != nil {
		require.NoError(t, c.Cleanup())
		return probe{}, c, err
	}
	werr := c.Wait()
	require.NoError(t, c.Cleanup(), "cleanup")
	var p probe
	require.NoError(t, json.Unmarshal(out.Bytes(), &p), "stdout %q stderr %q", out.String(), errb.String())
	return p, c, werr
}

func TestJailConfinesProcess(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	dir := filepath.Join(base, "jail")
	img := filepath.Join(base, "disk.img")
	require.NoError(t, os.WriteFile(img, []byte("IMAGE"), 0o644))
	secret := filepath.Join(base, "secret")
	require.NoError(t, os.WriteFile(secret, []byte("s"), 0o644))
	cfg := Config{Dir: dir, UID: 65534, GID: 65534,
		Binds: []Bind{{Source: img, Target: "/images/disk.img"}}}

	p, c, err := runJailed(t, cfg, "HOST_FILE="+secret)
	require.NoError(t, err)
	assert.Equal(t, "65534\t65534\t65534\t65534", p.Status["Uid"])
	assert.Equal(t, "65534\t65534\t65534\t65534", p.Status["Gid"])
	assert.Equal(t, "1", p.Status["NoNewPrivs"])
	assert.Equal(t, "0000000000000000", p.Status["CapEff"])
	assert.Equal(t, "0000000000000000", p.Status["CapPrm"])
	assert.Equal(t, "0000000000000000", p.Status["CapBnd"])
	assert.Equal(t, "1", p.Status["NSpid"][strings.LastIndex(p.Status["NSpid"], "\t")+1:], "pid 1 in its own pid namespace")
	host := hostNS(t)
	for _, ns := range []string{"mnt", "pid", "net", "ipc", "uts"} {
		assert.NotEqual(t, host[ns], p.NS[ns], ns)
		assert.NotEmpty(t, p.NS[ns])
	}
	assert.Equal(t, host["user"], p.NS["user"], "no user namespace asked for")
	assert.Equal(t, "kvmkit", p.Hostname)
	assert.Contains(t, p.HostFileErr, "no such file", "host file outside the jail must be invisible")
	assert.Equal(t, "ok", p.DevNull)
	assert.Equal(t, "IMAGE", p.Image)
	assert.Contains(t, p.ImageWrite, "read-only file system")
	assert.Subset(t, p.RootEntries, []string{"dev", "proc", "images"})
	assert.Subset(t, []string{"dev", "proc", "images", "lib", "lib64", "usr"}, p.RootEntries,
		"only devices, proc, the image and the executable's loader/libraries")
	assert.Empty(t, p.FDs, "no inherited pipe may cross into the jail")

	// Nothing is left behind on the host.
	assert.NoDirExists(t, dir)
	mounts, err := MountsUnder(base)
	require.NoError(t, err)
	assert.Empty(t, mounts)
	_ = c
}

func TestJailExitCodePassesThrough(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "jail")
	_, c, err := runJailed(t, Config{Dir: dir, UID: 1000, GID: 1000}, "EXIT_CODE=7", "HOST_FILE=/etc/passwd")
	var ee interface{ ExitCode() int }
	require.True(t, errors.As(err, &ee), "%v", err)
	assert.Equal(t, 7, c.ProcessState.ExitCode())
}

func TestJailUserNS(t *testing.T) {
	requireRoot(t)
	base, err := os.MkdirTemp("", "kvmkit-userns-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	require.NoError(t, os.Chmod(base, 0o755)) // the mapped uid must reach Dir
	dir := filepath.Join(base, "jail")
	p, _, err := runJailed(t, Config{Dir: dir, UID: 100000, GID: 100000, UserNS: true}, "HOST_FILE=/etc/passwd")
	require.NoError(t, err)
	assert.NotEqual(t, hostNS(t)["user"], p.NS["user"])
	assert.Equal(t, "0\t0\t0\t0", p.Status["Uid"], "root inside, mapped to 100000 outside")
	assert.Equal(t, "0000000000000000", p.Status["CapEff"])
	assert.Equal(t, "ok", p.DevNull)
	assert.Contains(t, p.HostFileErr, "no such file")
}

func TestJailKeepsExtraFiles(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "jail")
	c, err := Command(Config{Dir: dir, UID: 1000, GID: 1000}, []string{"-test.run=^$"})
	require.NoError(t, err)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	var out bytes.Buffer
	c.Stdout = &out
	c.ExtraFiles = []*os.File{w}
	c.Env = append(os.Environ(), "HOST_FILE=/etc/passwd")
	require.NoError(t, c.Start())
	w.Close()
	require.NoError(t, c.Release())
	require.NoError(t, c.Wait())
	require.NoError(t, c.Cleanup())
	var p probe
	require.NoError(t, json.Unmarshal(out.Bytes(), &p))
	assert.Equal(t, []string{"3"}, p.FDs, "ExtraFiles[0] stays fd 3; the sync/err pipes do not leak")
}

func TestRequiredDeviceMissing(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "jail")
	_, err := Command(Config{Dir: dir, Devices: []Device{{Path: "/dev/definitely-not-here", Required: true}}}, nil)
	require.ErrorIs(t, err, ErrDeviceMissing)
	assert.NoDirExists(t, dir, "a failed Command leaves nothing behind")
	// Optional missing devices are skipped.
	c, err := Command(Config{Dir: dir, Devices: []Device{{Path: "/dev/definitely-not-here"}}}, nil)
	require.NoError(t, err)
	assert.NoFileExists(t, filepath.Join(dir, "dev/definitely-not-here"))
	require.NoError(t, c.Cleanup())
	assert.NoDirExists(t, dir)
}

func TestSetupErrorIsReported(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "jail")
	// An rlimit above the hard maximum makes set-up fail inside the child.
	_, _, err := runJailed(t, Config{Dir: dir, UID: 1000, GID: 1000,
		Rlimits: []Rlimit{{Resource: unix.RLIMIT_NOFILE, Cur: 1 << 40, Max: 1 << 40}}})
	require.ErrorIs(t, err, ErrSetup)
	assert.Contains(t, err.Error(), "setrlimit")
	assert.NoDirExists(t, dir)
}

func TestConfigValidation(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{Dir: "/"},
		{Dir: "/x", UID: -1},
		{Dir: "/x", Binds: []Bind{{Source: "rel"}}},
		{Dir: "/x", Binds: []Bind{{Source: "/a", Target: "/proc/x"}}},
		{Dir: "/x", Devices: []Device{{Path: "dev/kvm"}}},
	} {
		_, err := Command(cfg, nil)
		assert.ErrorIs(t, err, ErrBadConfig, "%+v", cfg)
	}
}

func ExampleCommand() {
	// In main: if jail.Enter() { ...confined work...; return }
	c, err := Command(Config{Dir: "/srv/jail/vm1", UID: 1000, GID: 1000,
		Binds: []Bind{{Source: "/var/lib/vm1/disk.img"}}}, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Cleanup()
	c.Stdout = os.Stdout
	if err := c.Start(); err != nil {
		return
	}
	// ... add c.Process.Pid to a cgroup, move a tap into its netns ...
	if err := c.Release(); err != nil {
		return
	}
	_ = c.Wait()
}
