package seccomp

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const childEnv = "KVMKIT_SECCOMP_TEST_CHILD"

// TestMain turns the test binary into the helper that installs filters and
// probes them when childEnv is set.
func TestMain(m *testing.M) {
	if what := os.Getenv(childEnv); what != "" {
		os.Exit(child(what))
	}
	os.Exit(m.Run())
}

func socketErr() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err == nil {
		unix.Close(fd)
	}
	return err
}

func child(what string) int {
	switch what {
	case "thread-errno":
		// Filter one locked thread; another thread stays unfiltered.
		res := make(chan string)
		go func() {
			if err := Install(ClassVCPU, ModeErrno); err != nil {
				res <- err.Error()
				return
			}
			res <- fmt.Sprint(socketErr())
		}()
		filtered := <-res
		other := make(chan string)
		go func() {
			runtime.LockOSThread() // a fresh thread: the filtered one is owned
			other <- fmt.Sprint(socketErr())
		}()
		fmt.Printf("filtered=%s other=%s\n", filtered, <-other)
		return 0
	case "process-errno", "process-audit", "process-enforce":
		mode, err := ParseMode(strings.TrimPrefix(what, "process-"))
		if err != nil {
			fmt.Println(err)
			return 3
		}
		if err := InstallProcess(ClassProcess, mode); err != nil {
			fmt.Println(err)
			return 3
		}
		st, _ := os.ReadFile("/proc/self/status")
		for _, l := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(l, "Seccomp:") || strings.HasPrefix(l, "NoNewPrivs:") {
				fmt.Println(strings.Join(strings.Fields(l), " "))
			}
		}
		// Another goroutine on another thread must be filtered as well.
		done := make(chan error)
		go func() { runtime.LockOSThread(); done <- socketErr() }()
		fmt.Printf("socket=%v\n", <-done)
		return 0
	}
	return 2
}

func runChild(t *testing.T, what string) (string, *os.ProcessState) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+what)
	out, _ := cmd.CombinedOutput()
	return string(out), cmd.ProcessState
}

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
		err  bool
	}{
		{"enforce", ModeEnforce, false},
		{"AUDIT", ModeAudit, false},
		{"off", ModeOff, false},
		{"", ModeOff, false},
		{"errno", ModeErrno, false},
		{"strict", ModeOff, true},
	} {
		got, err := ParseMode(tc.in)
		if tc.err {
			assert.ErrorIs(t, err, ErrBadMode, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
		if tc.in != "" {
			assert.Equal(t, strings.ToLower(tc.in), got.String())
		}
	}
}

func TestAllowListsAssemble(t *testing.T) {
	union := map[string]bool{}
	for _, c := range Classes {
		names, err := AllowList(c)
		require.NoError(t, err, c)
		assert.True(t, sort.StringsAreSorted(names), c)
		for _, n := range names {
			_, ok := SyscallNumber(n)
			assert.True(t, ok, "%s: %q is not an amd64 system call", c, n)
			if c != ClassProcess {
				union[n] = true
			}
		}
		// The runtime needs these on every thread.
		for _, n := range []string{"futex", "mmap", "rt_sigreturn", "exit_group", "tgkill"} {
			assert.Contains(t, names, n, c)
		}
		for _, m := range []Mode{ModeAudit, ModeEnforce, ModeErrno} {
			raw, err := Program(c, m)
			require.NoError(t, err, "%s/%s", c, m)
			assert.Greater(t, len(raw), len(names), "%s/%s", c, m)
		}
		t.Logf("%s: %d system calls", c, len(names))
	}
	proc, _ := AllowList(ClassProcess)
	union["seccomp"] = true // so a thread can stack its class filter
	assert.Len(t, proc, len(union), "process class is the union of the others plus seccomp")
	vcpu, _ := AllowList(ClassVCPU)
	assert.Contains(t, vcpu, "ioctl")
	assert.NotContains(t, vcpu, "openat", "a vCPU thread never opens files")
	assert.NotContains(t, proc, "socket")
	assert.NotContains(t, proc, "execve")

	_, err := AllowList(Class(99))
	assert.ErrorIs(t, err, ErrBadClass)
	_, err = Program(ClassVCPU, ModeOff)
	assert.ErrorIs(t, err, ErrBadMode)
}

func TestSyscallName(t *testing.T) {
	assert.Equal(t, "socket", SyscallName(unix.SYS_SOCKET))
	assert.Equal(t, "ioctl", SyscallName(unix.SYS_IOCTL))
	assert.Equal(t, "syscall_99999", SyscallName(99999))
	nr, ok := SyscallNumber("kexec_load")
	assert.True(t, ok)
	assert.Equal(t, unix.SYS_KEXEC_LOAD, nr)
}

func TestParseAuditRecord(t *testing.T) {
	for _, tc := range []struct {
		line string
		ok   bool
		want Violation
	}{
		{`6,1001,542632020,-;audit: type=1326 audit(1795998787.565:3): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=30734 comm="vmm" exe="/usr/bin/vmm" sig=31 arch=c000003e syscall=41 compat=0 ip=0x408fee code=0x80000000`,
			true, Violation{PID: 30734, Comm: "vmm", Syscall: 41, Name: "socket", Signal: 31, Action: "kill_process"}},
		{`[  542.607591] audit: type=1326 audit(1795998787.541:2): pid=7 comm="a b" sig=0 arch=c000003e syscall=165 compat=0 ip=0x1 code=0x7ffc0000`,
			true, Violation{PID: 7, Comm: "a", Syscall: 165, Name: "mount", Action: "log"}},
		{`audit: type=1326 pid=7 syscall=0 code=0x50001`, true, Violation{PID: 7, Syscall: 0, Name: "read", Action: "errno"}},
		{`audit: type=1300 pid=7 syscall=0 code=0x50001`, false, Violation{}},
		{`audit: type=1326 pid=x syscall=0 code=0x0`, false, Violation{}},
		{`audit: type=1326 pid=7 syscall=-1 code=0x0`, false, Violation{}},
		{`audit: type=1326 pid=7 syscall=1 code=zz`, false, Violation{}},
		{``, false, Violation{}},
	} {
		got, ok := ParseAuditRecord(tc.line)
		assert.Equal(t, tc.ok, ok, tc.line)
		assert.Equal(t, tc.want, got, tc.line)
	}
}

func TestScanRecords(t *testing.T) {
	in := strings.NewReader("x\naudit: type=1326 pid=5 syscall=41 code=0x80000000\naudit: type=1326 pid=6 syscall=2 code=0x7ffc0000\n")
	vs, err := scanRecords(in, 6)
	require.NoError(t, err)
	require.Len(t, vs, 1)
	assert.Equal(t, "open", vs[0].Name)
	e := &ViolationError{PID: 6, Violations: vs}
	assert.ErrorIs(t, e, ErrViolation)
	assert.Contains(t, e.Error(), "open")
	assert.Contains(t, (&ViolationError{PID: 6}).Error(), "SIGSYS")
}

func FuzzParseAuditRecord(f *testing.F) {
	f.Add(`audit: type=1326 audit(1.5:3): pid=30734 comm="vmm" sig=31 arch=c000003e syscall=41 compat=0 code=0x80000000`)
	f.Add(`type=1326 pid=1 syscall=999999999999 code=0xffffffffff`)
	f.Fuzz(func(t *testing.T, line string) {
		v, ok := ParseAuditRecord(line)
		if ok {
			require.Positive(t, v.PID)
			require.GreaterOrEqual(t, v.Syscall, 0)
			require.NotEmpty(t, v.Name)
		}
	})
}

func watchKmsg(t *testing.T) *KmsgWatcher {
	t.Helper()
	w, err := WatchKmsg()
	require.NoError(t, err)
	t.Cleanup(func() { w.Close() })
	return w
}

// TestKmsgWatcherIgnoresEarlierRecords writes fake seccomp records for one
// PID to the kernel log before and after a watcher opens: the whole-log
// scan sees both, the watcher only the later one. (A real host's log can
// hold a record of an earlier process with the PID a new child gets.)
func TestKmsgWatcherIgnoresEarlierRecords(t *testing.T) {
	requireRoot(t)
	const pid = 2147480001
	logRecord := func(nr int) {
		f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
		require.NoError(t, err)
		defer f.Close()
		_, err = fmt.Fprintf(f, "kvmkit-test audit: type=1326 pid=%d comm=\"old\" sig=31 syscall=%d code=0x80000000\n", pid, nr)
		require.NoError(t, err)
	}
	logRecord(unix.SYS_SOCKET)
	w := watchKmsg(t)
	vs, err := w.Scan(pid)
	require.NoError(t, err)
	assert.Empty(t, vs, "a record logged before the watcher opened")

	logRecord(unix.SYS_MOUNT)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	vs, err = w.Wait(ctx, pid)
	require.NoError(t, err)
	require.Len(t, vs, 1)
	assert.Equal(t, "mount", vs[0].Name)
	vs, err = w.Scan(pid) // nothing new: what was seen is kept
	require.NoError(t, err)
	assert.Len(t, vs, 1)

	all, err := ScanKmsg(pid)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, len(all), 2, "the whole log holds both")

	require.NoError(t, w.Close())
	require.NoError(t, w.Close(), "idempotent")
	_, err = w.Scan(pid)
	assert.Error(t, err)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: reads /dev/kmsg")
	}
}

func TestInstallThreadOnly(t *testing.T) {
	out, st := runChild(t, "thread-errno")
	require.True(t, st.Success(), out)
	assert.Contains(t, out, "filtered=operation not permitted other=<nil>", out)
}

func TestInstallProcessErrno(t *testing.T) {
	out, st := runChild(t, "process-errno")
	require.True(t, st.Success(), out)
	assert.Contains(t, out, "Seccomp: 2")
	assert.Contains(t, out, "NoNewPrivs: 1")
	assert.Contains(t, out, "socket=operation not permitted")
}

func TestInstallProcessEnforceReportsName(t *testing.T) {
	requireRoot(t)
	kw := watchKmsg(t)
	out, st := runChild(t, "process-enforce")
	ws := st.Sys().(syscall.WaitStatus)
	require.True(t, ws.Signaled(), "child should be killed: %s", out)
	assert.Equal(t, syscall.SIGSYS, ws.Signal())
	assert.NotContains(t, out, "socket=")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	vs, err := kw.Wait(ctx, st.Pid())
	require.NoError(t, err)
	require.NotEmpty(t, vs, "kernel log has no seccomp record for pid %d", st.Pid())
	last := vs[len(vs)-1]
	assert.Equal(t, "socket", last.Name)
	assert.Equal(t, "kill_process", last.Action)
	err = &ViolationError{PID: st.Pid(), Violations: vs}
	assert.True(t, errors.Is(err, ErrViolation))
	t.Log(err)
}

func TestInstallProcessAuditLogs(t *testing.T) {
	requireRoot(t)
	kw := watchKmsg(t)
	out, st := runChild(t, "process-audit")
	require.True(t, st.Success(), out)
	assert.Contains(t, out, "socket=<nil>")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	vs, err := kw.Wait(ctx, st.Pid())
	require.NoError(t, err)
	var names []string
	for _, v := range vs {
		assert.Equal(t, "log", v.Action)
		names = append(names, v.Name)
	}
	assert.Contains(t, names, "socket")
}
