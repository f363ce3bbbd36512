package seccomp

import (
	"errors"
	"fmt"
	"sort"
)

// Class names a kind of VMM thread with its own allow-list.
type Class int

const (
	// ClassVCPU is a thread running a vCPU: KVM_RUN and friends, eventfd
	// kicks, serial output.
	ClassVCPU Class = iota
	// ClassDevice is a device/IO thread: block and tap I/O, eventfds, epoll.
	ClassDevice
	// ClassControl is the control thread: set-up, guest memory, signals,
	// waiting for the guest to finish.
	ClassControl
	// ClassProcess is the union of all classes; it is the process-wide
	// (TSYNC) baseline on which per-thread filters stack.
	ClassProcess
)

// Classes lists every thread class, for iteration.
var Classes = [...]Class{ClassVCPU, ClassDevice, ClassControl, ClassProcess}

// String returns the class name.
func (c Class) String() string {
	switch c {
	case ClassVCPU:
		return "vcpu"
	case ClassDevice:
		return "device"
	case ClassControl:
		return "control"
	case ClassProcess:
		return "process"
	}
	return fmt.Sprintf("Class(%d)", int(c))
}

// ErrBadClass is wrapped by errors for an unknown thread class.
var ErrBadClass = errors.New("seccomp: unknown thread class")

// goRuntime is what the Go runtime itself calls on any thread after start-up
// (scheduler, GC, signals, preemption, thread exit, crash output). Traced
// with `strace -f` on internal/tracework idle, plus the runtime paths a
// short trace cannot hit, taken from runtime/sys_linux_amd64.s (exit,
// exit_group, clock_gettime fallback, getrandom, restart_syscall). The
// second line is what glibc adds when the binary links cgo (threads made
// by pthread_create: clone3, rseq and robust-list registration, guard-page
// mprotect, malloc's brk), traced with `-tags tracecgo`.
var goRuntime = []string{
	"clock_gettime", "clone", "exit", "exit_group", "futex", "getpid",
	"getrandom", "gettid", "madvise", "mmap", "munmap", "nanosleep",
	"restart_syscall", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
	"sched_yield", "sigaltstack", "tgkill", "write", "epoll_pwait",
	"clone3", "rseq", "set_robust_list", "mprotect", "brk",
}

// Per-class additions on top of goRuntime, from `strace -f` of
// internal/tracework <class> minus the idle trace (see ALLOWLIST.md).
var classExtra = map[Class][]string{
	ClassVCPU: {
		"ioctl", // KVM_RUN, KVM_GET/SET_REGS, KVM_IRQ_LINE, ...
		"read",  // eventfd drain
	},
	ClassDevice: {
		"read", "readv", "writev", "pread64", "pwrite64", "preadv",
		"pwritev", "fsync", "fdatasync", "fallocate", "lseek", "fstat",
		"ioctl", // tap offloads, KVM_IRQFD/IOEVENTFD registration
		"epoll_create1", "epoll_ctl", "eventfd2", "close",
		"ppoll", // virtio.WatchEventFD: ioeventfd queue notifications
	},
	ClassControl: {
		"read", "openat", "close", "fstat", "newfstatat", "fcntl", "ioctl",
		"memfd_create", "ftruncate", "mprotect", "pread64", "lseek",
		"epoll_create1", "epoll_ctl", "eventfd2", "pipe2",
		"prlimit64", "sched_getaffinity", "getdents64", "wait4", "waitid",
		"kill",
		"mremap",      // kvm.Memory.MoveFrom: restoring into a pre-built VM
		"setpriority", // machine.Pool renices the thread that builds VMs
	},
}

// AllowList returns the sorted system call names class c may make.
func AllowList(c Class) ([]string, error) {
	set := map[string]bool{}
	add := func(names []string) {
		for _, n := range names {
			set[n] = true
		}
	}
	switch c {
	case ClassVCPU, ClassDevice, ClassControl:
		add(goRuntime)
		add(classExtra[c])
	case ClassProcess:
		add(goRuntime)
		for _, extra := range classExtra {
			add(extra)
		}
		// seccomp(2) lets a thread stack its class filter on the process
		// filter; a filter can only take permissions away.
		add([]string{"seccomp"})
	default:
		return nil, fmt.Errorf("%w %d", ErrBadClass, int(c))
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}
