package kvm

import (
	"errors"
	"fmt"
)

// CrashKind classifies why a guest stopped abnormally.
type CrashKind int

// Crash kinds.
const (
	CrashTripleFault   CrashKind = iota + 1 // KVM_EXIT_SHUTDOWN: triple fault or shutdown
	CrashInternalError                      // KVM_EXIT_INTERNAL_ERROR: emulation failure and such
	CrashFailEntry                          // KVM_EXIT_FAIL_ENTRY: the hardware refused the guest state
	CrashSystemEvent                        // KVM_EXIT_SYSTEM_EVENT of type crash
	CrashUnhandledExit                      // an exit reason kvmkit does not handle
	CrashRunError                           // KVM_RUN failed (for example EFAULT)
	CrashPanic                              // the guest reported a panic (pvpanic, console)
	CrashWatchdog                           // the guest stopped making progress
)

var crashNames = map[CrashKind]string{
	CrashTripleFault:   "triple fault (shutdown)",
	CrashInternalError: "KVM internal error",
	CrashFailEntry:     "VM entry failed",
	CrashSystemEvent:   "guest crash event",
	CrashUnhandledExit: "unhandled exit",
	CrashRunError:      "KVM_RUN failed",
	CrashPanic:         "guest panic",
	CrashWatchdog:      "guest stopped making progress",
}

func (k CrashKind) String() string {
	if s, ok := crashNames[k]; ok {
		return s
	}
	return fmt.Sprintf("crash kind %d", int(k))
}

// ErrGuestCrash is wrapped by every *GuestCrash.
var ErrGuestCrash = errors.New("guest crashed")

// GuestCrash reports a guest that stopped abnormally. The host process and
// other VMs are not affected.
type GuestCrash struct {
	Kind   CrashKind
	VCPU   int        // vCPU that saw it, or -1
	RIP    uint64     // guest RIP at the exit, when known
	Exit   ExitReason // the KVM exit reason, when there is one
	Detail string     // suberror, hardware reason, console line, ...
	// Console holds the last console lines, when a console watcher is attached.
	Console []string
	Err     error // underlying error, if any
}

func (e *GuestCrash) Error() string {
	s := fmt.Sprintf("guest crash: %s", e.Kind)
	if e.VCPU >= 0 {
		s += fmt.Sprintf(" on vCPU %d at RIP %#x", e.VCPU, e.RIP)
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Is makes errors.Is(err, ErrGuestCrash) true.
func (e *GuestCrash) Is(target error) bool { return target == ErrGuestCrash }

// Unwrap returns the underlying error.
func (e *GuestCrash) Unwrap() error { return e.Err }

// StopReason says why a Runner stopped without a crash.
type StopReason int

// Stop reasons.
const (
	StopExitPort StopReason = iota + 1 // the guest wrote its exit code
	StopPowerOff                       // the guest powered off (system event, ACPI, ...)
	StopReset                          // the guest asked for a reset
	StopCanceled                       // the context was canceled or Stop was called
	StopMigrated                       // the VM now runs elsewhere (live migration)
)

var stopNames = map[StopReason]string{
	StopExitPort: "exit port", StopPowerOff: "power off", StopReset: "reset", StopCanceled: "canceled",
	StopMigrated: "migrated",
}

func (r StopReason) String() string {
	if s, ok := stopNames[r]; ok {
		return s
	}
	return fmt.Sprintf("stop reason %d", int(r))
}

// Result is how a VM run ended when it was not a crash.
type Result struct {
	Reason   StopReason
	ExitCode uint8 // for StopExitPort
}
