// Package isolation confines one VMM process per VM: it composes a
// per-VM cgroup (package cgroup), a jail of namespaces, pivot_root and
// dropped privileges (package jail), sVirt SELinux labels (package
// selinux), seccomp filters per thread class (package seccomp) and tap
// plumbing (package netsetup) around a re-execution of the current
// program, and cleans all of it up when the VMM exits. Each part is usable
// alone from its own package.
//
// A program using Launch must call Child first thing in main.
package isolation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvmkit/kvmkit/isolation/cgroup"
	"github.com/kvmkit/kvmkit/isolation/jail"
	"github.com/kvmkit/kvmkit/isolation/netsetup"
	"github.com/kvmkit/kvmkit/isolation/seccomp"
	"github.com/kvmkit/kvmkit/isolation/selinux"
)

const envSeccomp = "KVMKIT_ISOLATION_SECCOMP"

// Child must be the first call in main of a program that uses Launch. It
// returns false in a normal run. In the jailed re-execution it installs
// the process-wide seccomp filter (ClassProcess, in the mode the parent
// asked for) and returns true: the program is confined and should do its
// real work (and not launch again). In the intermediate set-up stage it
// never returns.
func Child() (jailed bool, err error) {
	if !jail.Enter() {
		return false, nil
	}
	mode, err := seccomp.ParseMode(os.Getenv(envSeccomp))
	_ = os.Unsetenv(envSeccomp)
	if err != nil {
		return true, err
	}
	return true, seccomp.InstallProcess(seccomp.ClassProcess, mode)
}

// Config describes one isolated VMM run.
type Config struct {
	// Name identifies the VM (cgroup name); "kvmkit-<pid>" when empty.
	Name string
	// Jail configures the namespaces and the jail directory; Dir is
	// required.
	Jail jail.Config
	// Images are bound read-write into the jail at their host paths and
	// get the VM's SELinux image label.
	Images []string
	// Limits for the VM's cgroup.
	Limits cgroup.Limits
	// NoCgroup skips the cgroup.
	NoCgroup bool
	// GuestMemory is the guest RAM size in bytes; with Limits.MemoryMax it
	// lets Launch refuse a limit that cannot hold the guest.
	GuestMemory int64
	// Seccomp is the mode of the process-wide filter in the child.
	Seccomp seccomp.Mode
	// SELinux mode; SELinuxAlloc hands out MCS pairs (a fresh 0..1023
	// allocator when nil; share one between VMs of one process).
	SELinux      selinux.Mode
	SELinuxAlloc *selinux.Allocator
	// Taps are existing tap (or veth) names to move into the jail's
	// network namespace before the VMM starts.
	Taps []string
	// Args are the arguments of the re-executed program; os.Args[1:] when
	// nil.
	Args []string
	// Stdio of the VMM; ExtraFiles become fds 3, 4, ... in the jail.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	ExtraFiles     []*os.File
	Logger         *slog.Logger
}

// VMMOverhead is the memory a VMM needs beyond guest RAM (Go runtime,
// device buffers); Launch refuses MemoryMax < GuestMemory+VMMOverhead.
const VMMOverhead = 32 << 20

// Errors returned by Launch.
var (
	// ErrMemoryLimit: the memory limit is too small for the guest, or the
	// VMM was killed for exceeding it.
	ErrMemoryLimit = errors.New("memory limit")
)

// MemoryLimitError reports a memory limit that cannot hold the VM.
type MemoryLimitError struct {
	Limit, Guest int64
	OOMKilled    bool // the kernel killed the VMM at the limit
}

func (e *MemoryLimitError) Error() string {
	if e.OOMKilled {
		return fmt.Sprintf("isolation: VMM killed by the kernel: memory limit %s exceeded", FormatSize(e.Limit))
	}
	return fmt.Sprintf("isolation: memory limit %s is below guest memory %s plus %s VMM overhead",
		FormatSize(e.Limit), FormatSize(e.Guest), FormatSize(VMMOverhead))
}

// Is makes errors.Is(err, ErrMemoryLimit) true.
func (e *MemoryLimitError) Is(t error) bool { return t == ErrMemoryLimit }

// Result is the outcome of a VMM run.
type Result struct {
	// ExitCode is the VMM's exit status (128+signal when killed).
	ExitCode int
	// Startup is the time from Launch to the jailed program starting.
	Startup time.Duration
}

// Launch runs the current program again, isolated as cfg says, waits for
// it, and removes the cgroup, jail directory entries and SELinux labels.
// A VMM that exits on its own, with any code, gives a nil error; a VMM
// killed by seccomp or the memory limit gives an error naming the cause.
// Cancelling ctx kills the VMM.
func Launch(ctx context.Context, cfg Config) (res *Result, err error) {
	t0 := time.Now()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Name == "" {
		cfg.Name = "kvmkit-" + strconv.Itoa(os.Getpid())
	}
	if l := cfg.Limits.MemoryMax; l > 0 && cfg.GuestMemory > 0 && l < cfg.GuestMemory+VMMOverhead {
		return nil, &MemoryLimitError{Limit: l, Guest: cfg.GuestMemory}
	}
	var cleanups []func() error
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			if cerr := cleanups[i](); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()

	alloc := cfg.SELinuxAlloc
	if alloc == nil {
		alloc = selinux.NewAllocator(0, 1023)
	}
	sel, err := selinux.Setup(cfg.SELinux, selinux.RealHost{}, alloc, cfg.Images, log)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, sel.Close)

	jc := cfg.Jail
	jc.ExecLabel = sel.ExecLabel()
	jc.Binds = append([]jail.Bind(nil), jc.Binds...)
	for _, img := range cfg.Images {
		jc.Binds = append(jc.Binds, jail.Bind{Source: img, Writable: true})
	}
	jc.Env = append(append([]string(nil), jc.Env...), envSeccomp+"="+cfg.Seccomp.String())
	cmd, err := jail.Command(jc, cfg.Args)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, cmd.Cleanup)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = cfg.Stdin, cfg.Stdout, cfg.Stderr
	cmd.ExtraFiles = cfg.ExtraFiles

	var cg *cgroup.Cgroup
	if !cfg.NoCgroup {
		sys, err := cgroup.Detect(cgroup.Options{}, cfg.Limits)
		if err != nil {
			return nil, err
		}
		cg, err = sys.New(cfg.Name, cfg.Limits)
		if err != nil {
			return nil, err
		}
		log.Debug("cgroup", "version", sys.Version.String(), "dirs", cg.Dirs())
		cleanups = append(cleanups, func() error {
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return cg.Remove(rctx)
		})
	}

	// Opened before the VMM starts, so that a seccomp kill is reported with
	// the VMM's own record, never one of an earlier process that had its
	// PID. Without access to the kernel log the kill is still reported.
	kmsg, kerr := seccomp.WatchKmsg()
	if kerr == nil {
		cleanups = append(cleanups, kmsg.Close)
	} else {
		log.Debug("seccomp violations will not be named", "err", kerr)
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	pid := cmd.Process.Pid
	setup := func() error {
		if cg != nil {
			if err := cg.AddProcess(pid); err != nil {
				return err
			}
		}
		for _, tap := range cfg.Taps {
			if err := netsetup.MoveToNetns(tap, pid); err != nil {
				return err
			}
		}
		return nil
	}
	if err := setup(); err != nil {
		cmd.Abort()
		return nil, err
	}
	if err := cmd.Release(); err != nil {
		return nil, err
	}
	res = &Result{Startup: time.Since(t0)}
	log.Debug("VMM jailed", "pid", pid, "startup", res.Startup)

	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = cmd.Process.Kill()
		case <-done:
		}
	}()
	werr := cmd.Wait()
	close(done)
	if werr != nil {
		var ee *exec.ExitError
		if !errors.As(werr, &ee) {
			return res, fmt.Errorf("isolation: wait for VMM: %w", werr)
		}
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	res.ExitCode = ws.ExitStatus()
	if ws.Signaled() {
		res.ExitCode = 128 + int(ws.Signal())
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		switch ws.Signal() {
		case syscall.SIGSYS:
			var vs []seccomp.Violation
			if kmsg != nil {
				kctx, cancel := context.WithTimeout(context.Background(), time.Second)
				vs, _ = kmsg.Wait(kctx, pid)
				cancel()
			}
			return res, &seccomp.ViolationError{PID: pid, Violations: vs}
		case syscall.SIGKILL:
			if cg != nil {
				if n, _ := cg.OOMKills(); n > 0 {
					return res, &MemoryLimitError{Limit: cfg.Limits.MemoryMax, Guest: cfg.GuestMemory, OOMKilled: true}
				}
			}
		}
		return res, fmt.Errorf("isolation: VMM killed by signal %v", ws.Signal())
	}
	return res, nil
}

// FormatSize prints n bytes with a binary suffix (256M, 1G, 4096).
func FormatSize(n int64) string {
	for _, u := range []struct {
		s string
		v int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if n >= u.v && n%u.v == 0 {
			return strconv.FormatInt(n/u.v, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}

// ErrBadFlag is wrapped by the flag parsers.
var ErrBadFlag = errors.New("isolation: bad flag value")

// ParseSize parses "256M", "1G", "512K", "4096" (binary units, optional
// trailing "B"/"iB").
func ParseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%w: size %q (want e.g. 256M)", ErrBadFlag, s)
	}
	return n * mult, nil
}

// ParseCPUQuota parses "50%" (half a CPU), "200%" (two CPUs) or a
// fraction "0.5" into a fraction of one CPU.
func ParseCPUQuota(s string) (float64, error) {
	t := strings.TrimSpace(s)
	pct := strings.HasSuffix(t, "%")
	t = strings.TrimSuffix(t, "%")
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v <= 0 || v != v || v > 1e6 {
		return 0, fmt.Errorf("%w: cpu quota %q (want e.g. 50%%)", ErrBadFlag, s)
	}
	if pct {
		v /= 100
	}
	return v, nil
}

// Flags are the vmm CLI's isolation flags, as strings.
type Flags struct {
	Jail     string // --jail DIR
	UID, GID int    // --uid N --gid N
	CPUQuota string // --cpu-quota 50%
	MemLimit string // --mem-limit 256M
	Seccomp  string // --seccomp enforce|audit|off
	SELinux  string // --selinux auto|off
}

// ConfigFromFlags turns the CLI flags into a Config (Args, stdio, Images,
// GuestMemory and Taps are left for the caller).
func ConfigFromFlags(f Flags) (Config, error) {
	var c Config
	if f.Jail == "" {
		return c, fmt.Errorf("%w: --jail DIR is required", ErrBadFlag)
	}
	c.Jail = jail.Config{Dir: f.Jail, UID: f.UID, GID: f.GID}
	var err error
	if f.CPUQuota != "" {
		if c.Limits.CPUQuota, err = ParseCPUQuota(f.CPUQuota); err != nil {
			return c, err
		}
	}
	if f.MemLimit != "" {
		if c.Limits.MemoryMax, err = ParseSize(f.MemLimit); err != nil {
			return c, err
		}
	}
	if c.Seccomp, err = seccomp.ParseMode(f.Seccomp); err != nil {
		return c, err
	}
	if c.SELinux, err = selinux.ParseMode(f.SELinux); err != nil {
		return c, err
	}
	return c, nil
}
