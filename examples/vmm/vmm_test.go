package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
)

// TestMain lets the test binary stand in for vmm when the jail re-executes
// it (os.Executable) with vmm's arguments.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && !strings.HasPrefix(os.Args[1], "-test.") {
		os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// syncBuffer is a goroutine-safe bytes.Buffer.
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

// vmm runs the CLI in-process and returns its exit status and output.
func vmm(args ...string) (code int, stdout, stderr string) {
	var out, errb syncBuffer
	code = run(args, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

func requireKVM(t *testing.T) {
	t.Helper()
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
}

func writeGuest(t *testing.T, name string) string {
	t.Helper()
	img, _, err := guests.Get(name)
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), name+".bin")
	require.NoError(t, os.WriteFile(p, img, 0o644))
	return p
}

func TestRunGuests(t *testing.T) {
	requireKVM(t)
	cases := []struct {
		name     string
		args     []string
		code     int
		stdout   string
		stderrRE string
	}{
		{"default embedded guest", []string{"run"}, 0, "Hello from a kvmkit long-mode guest!", ""},
		{"long-mode image", []string{"run", "--image", writeGuest(t, "hello64"), "--mode", "long"}, 0, "Hello from a kvmkit long-mode guest!", ""},
		{"real-mode image", []string{"run", "--image", writeGuest(t, "hello16"), "--mode", "real"}, 0, "Hello from a kvmkit real-mode guest!", ""},
		{"exit code", []string{"run", "--guest", "exit42"}, 42, "", ""},
		{"real-mode exit code", []string{"run", "--image", writeGuest(t, "exit42_16"), "--mode", "real"}, 42, "", ""},
		{"triple fault", []string{"run", "--guest", "triple"}, exitCrash, "", "triple fault"},
		{"two vCPUs", []string{"run", "--guest", "smp", "--cpus", "2"}, 0, "smp: 2 vCPUs up", ""},
		{"no irqchip", []string{"run", "--no-irqchip", "--mem", "16M"}, 0, "Hello from a kvmkit long-mode guest!", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, out, errs := vmm(c.args...)
			assert.Equal(t, c.code, code, "stderr: %s", errs)
			assert.Contains(t, out, c.stdout)
			if c.stderrRE != "" {
				assert.Contains(t, errs, c.stderrRE)
				assert.Equal(t, 1, strings.Count(strings.TrimSpace(errs), "\n")+1, "one-line reason: %q", errs)
			}
		})
	}
}

// TestBadInput: wrong flags and malformed images get a clear error and a
// distinct status; nothing needs /dev/kvm to be rejected.
func TestBadInput(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "empty.bin")
	require.NoError(t, os.WriteFile(empty, nil, 0o644))
	cases := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"run", "--mem", "12X"}, exitUsage, "--mem"},
		{[]string{"run", "--mode", "protected"}, exitUsage, "--mode"},
		{[]string{"run", "--cpus", "0"}, exitUsage, "--cpus"},
		{[]string{"run", "--disk", "x.img,rw"}, exitUsage, "unknown option"},
		{[]string{"run", "--net", "bridge"}, exitUsage, "--net"},
		{[]string{"run", "--transport", "isa"}, exitUsage, "--transport"},
		{[]string{"run", "--image", "a", "--kernel", "b"}, exitUsage, "exclude"},
		{[]string{"run", "--initrd", "x"}, exitUsage, "--kernel"},
		{[]string{"run", "--bogus"}, exitUsage, "unknown flag"},
		{[]string{"run", "--on-reset", "explode"}, exitUsage, "--on-reset"},
		{[]string{"migrate", "--to", "127.0.0.1:1"}, exitUsage, "--control"},
		{[]string{"restore"}, exitUsage, "--from"},
		{[]string{"restore", "--from", "x", "--jail", "j"}, exitUsage, "--jail"},
		{[]string{"restore", "--from", "/nonexistent/snap"}, exitFailure, "/nonexistent/snap"},
		{[]string{"run", "--image", "/nonexistent/guest.bin"}, exitFailure, "/nonexistent/guest.bin"},
	}
	for _, c := range cases {
		code, _, errs := vmm(c.args...)
		assert.Equal(t, c.code, code, "%v: %s", c.args, errs)
		assert.Contains(t, errs, c.msg, "%v", c.args)
	}
	if ok, _ := kvm.Available(); ok {
		code, _, errs := vmm("run", "--image", empty)
		assert.Equal(t, exitFailure, code)
		assert.Contains(t, errs, "image")
	}
}

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"4096", 4096, true}, {"64K", 64 << 10, true}, {"128M", 128 << 20, true}, {"1G", 1 << 30, true},
		{"2GiB", 2 << 30, true}, {"256mb", 256 << 20, true}, {"0", 0, false}, {"-1", 0, false}, {"1X", 0, false},
		{"", 0, false}, {"99999999999T", 0, false},
	}
	for _, c := range cases {
		got, err := parseSize(c.in)
		if !c.ok {
			assert.Error(t, err, c.in)
			continue
		}
		require.NoError(t, err, c.in)
		assert.Equal(t, c.want, got, c.in)
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"128M", "1G", "4096", "2GiB", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if n, err := parseSize(s); err == nil && n == 0 {
			t.Fatalf("parseSize(%q) = 0 without error", s)
		}
	})
}

// waitSocket waits until the control socket answers.
func waitStatus(t *testing.T, sock string, want string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		code, out, _ := vmm("status", "--control", sock)
		if code == 0 && strings.Contains(out, `"state":"`+want+`"`) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("control socket %s never reported state %s", sock, want)
}

// TestMigrateCLI runs the dirtying guest under `vmm run --control`,
// receives it with `vmm receive`, migrates with `vmm migrate --json`,
// pauses/resumes and snapshots through the control socket, and checks the
// guest keeps passing its self-check on the target.
func TestMigrateCLI(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	srcSock, dstSock := filepath.Join(dir, "src.sock"), filepath.Join(dir, "dst.sock")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()

	srcOut, srcErr, srcDone := startVMM("run", "--guest", "dirty", "--mem", "128M", "--control", srcSock)
	dstOut, dstErr, dstDone := startVMM("receive", "--listen", addr, "--control", dstSock)
	waitStatus(t, srcSock, "running")
	waitText(t, dstErr, "waiting for a VM")

	code, out, errs := vmm("pause", "--control", srcSock)
	require.Equal(t, 0, code, errs)
	assert.Contains(t, out, `"state":"paused"`)
	code, _, errs = vmm("resume", "--control", srcSock)
	require.Equal(t, 0, code, errs)
	code, out, errs = vmm("snapshot", "--control", srcSock, "--to", filepath.Join(dir, "snap"))
	require.Equal(t, 0, code, errs)
	assert.Contains(t, out, `"ID"`)
	waitStatus(t, srcSock, "running")

	code, out, errs = vmm("migrate", "--control", srcSock, "--to", addr, "--json")
	require.Equal(t, 0, code, "migrate: %s %s\nsource vmm stderr: %s\ntarget vmm stderr: %s", out, errs, srcErr.String(), dstErr.String())
	var sum map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &sum), out)
	for _, k := range []string{"downtime_ms", "total_ms", "rounds", "bytes_sent", "pages_sent"} {
		assert.Contains(t, sum, k)
	}
	t.Logf("vmm migrate --json: %s", strings.TrimSpace(out))

	assert.Equal(t, 0, <-srcDone, "source vmm exits 0 after handing over: %s", srcErr.String())
	select {
	case code := <-dstDone:
		t.Fatalf("the target vmm ended (status %d) right after receiving the VM: stderr %q, COM1 %q", code, dstErr.String(), dstOut.String())
	case <-time.After(200 * time.Millisecond):
	}
	waitStatus(t, dstSock, "running")
	assert.Contains(t, dstErr.String(), "(in the VM built while waiting)", "receive builds a VM of its flags' shape while it waits")
	time.Sleep(500 * time.Millisecond) // let the guest make passes on the target
	code, _, errs = vmm("stop", "--control", dstSock)
	require.Equal(t, 0, code, errs)
	assert.Equal(t, 0, <-dstDone, "target: %s", dstErr.String())
	assert.NotContains(t, dstOut.String()+srcOut.String(), "LOST WRITE")
	t.Logf("target stderr: %s", dstErr.String())
}

// TestRestoreCLI snapshots the dirtying guest with `vmm snapshot`, then
// restores it with `vmm restore`, and again with `vmm restore --standby`
// (the VM built first, the restore on SIGUSR1): each time the guest makes
// passes on the restored VM and never finds a lost write.
func TestRestoreCLI(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	srcSock, snap := filepath.Join(dir, "src.sock"), filepath.Join(dir, "snap")
	_, srcErr, srcDone := startVMM("run", "--guest", "dirty", "--mem", "128M", "--control", srcSock)
	waitStatus(t, srcSock, "running")
	waitExits(t, srcSock, 3) // two complete passes: every page holds a pass number
	code, _, errs := vmm("snapshot", "--control", srcSock, "--to", snap)
	require.Equal(t, 0, code, errs)
	code, _, errs = vmm("stop", "--control", srcSock)
	require.Equal(t, 0, code, errs)
	require.Equal(t, 0, <-srcDone, srcErr.String())

	for _, standby := range []bool{false, true} {
		t.Run(map[bool]string{false: "restore", true: "standby"}[standby], func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "dst.sock")
			args := []string{"restore", "--from", snap, "--mem", "128M", "--control", sock}
			if standby {
				args = append(args, "--standby")
			}
			out, errb, done := startVMM(args...)
			var pid int
			if standby {
				waitText(t, errb, "send SIGUSR1 to restore")
				assert.NotContains(t, errb.String(), "restored", "nothing is restored before the signal")
				_, err := fmt.Sscanf(errb.String()[strings.Index(errb.String(), "(pid "):], "(pid %d)", &pid)
				require.NoError(t, err, errb.String())
				require.NoError(t, syscall.Kill(pid, syscall.SIGUSR1))
			}
			waitText(t, errb, "vmm: restored "+snap)
			if standby {
				assert.Contains(t, errb.String(), "(in the VM built while waiting)")
				// A second signal is ignored, not fatal.
				require.NoError(t, syscall.Kill(pid, syscall.SIGUSR1))
			}
			waitStatus(t, sock, "running")
			// The restored guest goes on with its passes (each one an exit
			// on its progress port) and checks every page as it goes.
			waitExits(t, sock, 3)
			code, _, errs := vmm("stop", "--control", sock)
			require.Equal(t, 0, code, errs)
			assert.Equal(t, 0, <-done, errb.String())
			assert.NotContains(t, out.String(), "LOST WRITE")
			t.Logf("%s", strings.TrimSpace(errb.String()))
		})
	}
}

// waitExits waits until the VM behind sock reports at least n exits.
func waitExits(t *testing.T, sock string, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		code, out, _ := vmm("status", "--control", sock)
		var st struct{ Exits int }
		if code == 0 && json.Unmarshal([]byte(out), &st) == nil && st.Exits >= n {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the VM behind %s never reached %d exits", sock, n)
}

// startVMM runs vmm as a separate process (this test binary re-executed;
// see TestMain), as a user would run two VMMs, in the background.
func startVMM(args ...string) (stdout, stderr *syncBuffer, done chan int) {
	stdout, stderr, done = &syncBuffer{}, &syncBuffer{}, make(chan int, 1)
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(stderr, err)
		done <- -1
		return stdout, stderr, done
	}
	cmd := exec.Command(exe, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(""), stdout, stderr
	go func() {
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case err == nil:
			done <- 0
		case errors.As(err, &ee):
			done <- ee.ExitCode()
		default:
			fmt.Fprintln(stderr, err)
			done <- -1
		}
	}()
	return stdout, stderr, done
}

func waitText(t *testing.T, b *syncBuffer, text string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(b.String(), text) {
		if time.Now().After(deadline) {
			t.Fatalf("%q never appeared in %q", text, b.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestJailedRun runs the demo guest in a jail (namespaces, pivot_root, no
// capabilities, uid 65534, seccomp enforce): output and exit code come back
// exactly as without the jail.
func TestJailedRun(t *testing.T) {
	requireKVM(t)
	if os.Geteuid() != 0 {
		t.Skip("the jail needs root")
	}
	labCgroups(t)
	for _, c := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"run"}, 0, "Hello from a kvmkit long-mode guest!"},
		{[]string{"run", "--guest", "exit42"}, 42, ""},
		{[]string{"run", "--image", writeGuest(t, "hello16"), "--mode", "real"}, 0, "Hello from a kvmkit real-mode guest!"},
		// A disk starts ioeventfd watcher goroutines (eventfd2, ppoll) and a
		// block worker under the filters, on both transports.
		{[]string{"run", "--guest", "exit42", "--disk", jailDisk(t)}, 42, ""},
		{[]string{"run", "--guest", "exit42", "--disk", jailDisk(t), "--rng", "--transport", "pci"}, 42, ""},
	} {
		args := append(c.args, "--jail", filepath.Join(t.TempDir(), "jail"), "--seccomp", "enforce", "--mem-limit", "512M", "--cpu-quota", "50%")
		code, out, errs := vmm(args...)
		assert.Equal(t, c.code, code, "%v: stderr: %s", args, errs)
		assert.Contains(t, out, c.out)
	}
}

// labCgroups mounts cgroup2 with the cpu, memory and pids controllers
// enabled when the test runs in the nested lab, whose minimal init mounts
// no cgroup file system.
func labCgroups(t *testing.T) {
	t.Helper()
	if os.Getenv("KVMKIT_NESTLAB") != "1" {
		return
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		require.NoError(t, os.MkdirAll("/sys/fs/cgroup", 0o755))
		require.NoError(t, unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""))
	}
	require.NoError(t, os.WriteFile("/sys/fs/cgroup/cgroup.subtree_control", []byte("+cpu +memory +pids"), 0o644))
}

func TestControlSocketErrors(t *testing.T) {
	code, _, errs := vmm("status", "--control", filepath.Join(t.TempDir(), "none.sock"))
	assert.Equal(t, exitFailure, code)
	assert.Contains(t, errs, "control socket")
}

// FuzzFollowMigration feeds arbitrary migrate streams (what a control
// socket returns) to the client: it must end with a result or an error,
// never panic.
func FuzzFollowMigration(f *testing.F) {
	f.Add([]byte(`{"progress":{"phase":"full","round":0,"total_pages":10,"pages_sent":5}}` + "\n" + `{"result":{"downtime_ms":1.5,"rounds":2}}` + "\n"))
	f.Add([]byte(`{"error":"boom"}` + "\n"))
	f.Add([]byte("not json\n"))
	f.Fuzz(func(t *testing.T, stream []byte) {
		for _, asJSON := range []bool{false, true} {
			var out, errb syncBuffer
			env := &cliEnv{stdout: &out, stderr: &errb}
			_ = followMigration(env, bytes.NewReader(stream), asJSON)
		}
	})
}

// jailDisk is a small raw image the jailed VMM (an unprivileged user)
// may open read-write: the test's temporary directories are 0700.
func jailDisk(t *testing.T) string {
	dir := t.TempDir()
	p := filepath.Join(dir, "disk.img")
	require.NoError(t, os.WriteFile(p, make([]byte, 1<<20), 0o666))
	require.NoError(t, os.Chmod(p, 0o666)) // past the umask
	require.NoError(t, os.Chmod(dir, 0o755))
	require.NoError(t, os.Chmod(filepath.Dir(dir), 0o755))
	return p
}
