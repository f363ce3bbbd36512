// Package seccomp confines VMM threads with seccomp BPF allow-lists, one per
// thread class (vCPU, device/IO, control), built with the pure-Go
// github.com/elastic/go-seccomp-bpf assembler, and reports violations with
// the system call's name.
//
// A filter installed with seccomp(2) applies to the calling OS thread only.
// Install therefore locks the calling goroutine to its thread for the rest
// of the goroutine's life (when such a goroutine returns, the Go runtime
// destroys the thread, so the filter can never leak to other goroutines).
// InstallProcess uses SECCOMP_FILTER_FLAG_TSYNC to put one filter on every
// thread of the process; a per-thread filter installed later stacks on top
// of it and can only narrow it further.
//
// How the allow-lists were derived is documented in ALLOWLIST.md.
package seccomp

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"unsafe"

	bpf "github.com/elastic/go-seccomp-bpf"
	xbpf "golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Mode selects what a filter does with a system call outside the
// allow-list.
type Mode int

const (
	// ModeOff installs no filter.
	ModeOff Mode = iota
	// ModeAudit allows the call and asks the kernel to log it
	// (SECCOMP_RET_LOG); read the log back with a KmsgWatcher.
	ModeAudit
	// ModeEnforce kills the whole process (SECCOMP_RET_KILL_PROCESS); the
	// parent sees SIGSYS and the kernel logs the call (see KmsgWatcher).
	ModeEnforce
	// ModeErrno makes the call fail with EPERM instead of killing; useful
	// to probe a policy without losing the process.
	ModeErrno
)

// String returns the flag spelling of m.
func (m Mode) String() string {
	switch m {
	case ModeOff:
		return "off"
	case ModeAudit:
		return "audit"
	case ModeEnforce:
		return "enforce"
	case ModeErrno:
		return "errno"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ErrBadMode is wrapped by errors for an unknown mode name or value.
var ErrBadMode = errors.New("seccomp: unknown mode")

// ParseMode parses "enforce", "audit", "errno" or "off" (the --seccomp flag).
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "off", "":
		return ModeOff, nil
	case "audit", "log":
		return ModeAudit, nil
	case "enforce", "kill":
		return ModeEnforce, nil
	case "errno", "deny":
		return ModeErrno, nil
	}
	return ModeOff, fmt.Errorf("%w %q (want enforce, audit, errno or off)", ErrBadMode, s)
}

// action returns the go-seccomp-bpf default action for m. go-seccomp-bpf
// cannot express an errno value in a default action, so ModeErrno
// assembles as ActionErrno and Program patches in EPERM.
func (m Mode) action() (bpf.Action, error) {
	switch m {
	case ModeAudit:
		return bpf.ActionLog, nil
	case ModeEnforce:
		return bpf.ActionKillProcess, nil
	case ModeErrno:
		return bpf.ActionErrno, nil
	}
	return 0, fmt.Errorf("%w %d has no filter action", ErrBadMode, int(m))
}

// Policy returns the go-seccomp-bpf policy for class c in mode m: the
// class's allow-list is allowed, everything else gets m's action.
func Policy(c Class, m Mode) (*bpf.Policy, error) {
	names, err := AllowList(c)
	if err != nil {
		return nil, err
	}
	act, err := m.action()
	if err != nil {
		return nil, err
	}
	return &bpf.Policy{
		DefaultAction: act,
		Syscalls:      []bpf.SyscallGroup{{Names: names, Action: bpf.ActionAllow}},
	}, nil
}

// Program assembles class c's filter in mode m into classic BPF.
func Program(c Class, m Mode) ([]xbpf.RawInstruction, error) {
	p, err := Policy(c, m)
	if err != nil {
		return nil, err
	}
	insts, err := p.Assemble()
	if err != nil {
		return nil, fmt.Errorf("seccomp: assemble %s filter: %w", c, err)
	}
	if m == ModeErrno {
		for i, in := range insts {
			if r, ok := in.(xbpf.RetConstant); ok && r.Val == uint32(bpf.ActionErrno) {
				insts[i] = xbpf.RetConstant{Val: uint32(bpf.ActionErrno) | uint32(unix.EPERM)}
			}
		}
	}
	raw, err := xbpf.Assemble(insts)
	if err != nil {
		return nil, fmt.Errorf("seccomp: assemble %s filter: %w", c, err)
	}
	return raw, nil
}

// InstallError reports a filter that could not be installed.
type InstallError struct {
	Class Class
	Mode  Mode
	TSync bool
	Err   error
}

func (e *InstallError) Error() string {
	scope := "thread"
	if e.TSync {
		scope = "process"
	}
	return fmt.Sprintf("seccomp: install %s filter (%s) on %s: %v", e.Class, e.Mode, scope, e.Err)
}

// Unwrap returns the underlying error.
func (e *InstallError) Unwrap() error { return e.Err }

// Install puts class c's filter in mode m on the calling OS thread and sets
// no_new_privs on it. It locks the calling goroutine to its OS thread and
// never unlocks it: the goroutine must live as long as the work it guards
// (its thread is destroyed when it returns). ModeOff installs nothing.
func Install(c Class, m Mode) error {
	if m == ModeOff {
		return nil
	}
	runtime.LockOSThread()
	return load(c, m, false)
}

// InstallProcess puts class c's filter in mode m on every thread of the
// process (SECCOMP_FILTER_FLAG_TSYNC) and sets no_new_privs. Threads
// created later inherit it. ModeOff installs nothing.
func InstallProcess(c Class, m Mode) error {
	if m == ModeOff {
		return nil
	}
	// The filter and no_new_privs must be set on the same thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return load(c, m, true)
}

func load(c Class, m Mode, tsync bool) error {
	raw, err := Program(c, m)
	if err != nil {
		return &InstallError{Class: c, Mode: m, TSync: tsync, Err: err}
	}
	if len(raw) > 0xffff {
		return &InstallError{Class: c, Mode: m, TSync: tsync, Err: fmt.Errorf("program has %d instructions", len(raw))}
	}
	filt := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filt[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filt)), Filter: &filt[0]}
	// Under a process filter prctl may be forbidden; no_new_privs is then
	// already set (it is a precondition of that filter) and inherited.
	if !noNewPrivs() {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return &InstallError{Class: c, Mode: m, TSync: tsync, Err: fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)}
		}
	}
	var flags uintptr
	if tsync {
		flags = unix.SECCOMP_FILTER_FLAG_TSYNC
	}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(filt)
	if errno != 0 {
		return &InstallError{Class: c, Mode: m, TSync: tsync, Err: fmt.Errorf("seccomp(SET_MODE_FILTER): %w", errno)}
	}
	if tsync && r != 0 {
		return &InstallError{Class: c, Mode: m, TSync: tsync, Err: fmt.Errorf("thread %d could not be synchronised", r)}
	}
	return nil
}

// noNewPrivs reports whether the calling thread already has no_new_privs,
// read from /proc/thread-self/status (prctl itself may be filtered).
func noNewPrivs() bool {
	b, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte("\nNoNewPrivs:\t1"))
}
