package seccomp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Violation is one system call a filter did not allow, as recorded by the
// kernel's audit subsystem (record type 1326, AUDIT_SECCOMP).
type Violation struct {
	PID     int    // host PID of the offending process
	Comm    string // its command name
	Syscall int    // system call number (amd64)
	Name    string // system call name
	Signal  int    // signal sent (31 = SIGSYS for kills, 0 for log)
	Action  string // "log", "kill_process", "kill_thread", "trap", "errno", ...
}

// String formats v for a log line or error message.
func (v Violation) String() string {
	return fmt.Sprintf("seccomp %s: pid %d (%s) called %s (nr %d)", v.Action, v.PID, v.Comm, v.Name, v.Syscall)
}

// ViolationError reports that a process was stopped by a seccomp filter.
type ViolationError struct {
	PID        int
	Violations []Violation // what the kernel log names; may be empty
}

func (e *ViolationError) Error() string {
	if len(e.Violations) == 0 {
		return fmt.Sprintf("seccomp: pid %d killed by SIGSYS (the kernel log has no record of the system call)", e.PID)
	}
	v := e.Violations[len(e.Violations)-1]
	return fmt.Sprintf("seccomp: pid %d killed for calling %s (nr %d)", e.PID, v.Name, v.Syscall)
}

// ErrViolation is matched by errors.Is for every *ViolationError.
var ErrViolation = errors.New("seccomp violation")

// Is makes errors.Is(err, ErrViolation) true.
func (e *ViolationError) Is(target error) bool { return target == ErrViolation }

func actionName(code uint64) string {
	switch uint32(code) & unix.SECCOMP_RET_ACTION_FULL {
	case unix.SECCOMP_RET_KILL_PROCESS:
		return "kill_process"
	case unix.SECCOMP_RET_KILL_THREAD:
		return "kill_thread"
	case unix.SECCOMP_RET_TRAP:
		return "trap"
	case unix.SECCOMP_RET_ERRNO:
		return "errno"
	case unix.SECCOMP_RET_TRACE:
		return "trace"
	case unix.SECCOMP_RET_LOG:
		return "log"
	case unix.SECCOMP_RET_USER_NOTIF:
		return "user_notif"
	case unix.SECCOMP_RET_ALLOW:
		return "allow"
	}
	return fmt.Sprintf("action_%#x", code)
}

// ParseAuditRecord extracts a Violation from one kernel log line carrying an
// AUDIT_SECCOMP record, either a /dev/kmsg record ("6,12,34,-;audit: ...")
// or a dmesg/auditd line. ok is false for any other line.
func ParseAuditRecord(line string) (v Violation, ok bool) {
	i := strings.Index(line, "type=1326 ")
	if i < 0 {
		return Violation{}, false
	}
	fields := map[string]string{}
	for _, f := range strings.Fields(line[i:]) {
		k, val, found := strings.Cut(f, "=")
		if !found {
			continue
		}
		fields[k] = strings.Trim(val, `"`)
	}
	pid, err := strconv.Atoi(fields["pid"])
	if err != nil || pid <= 0 {
		return Violation{}, false
	}
	nr, err := strconv.Atoi(fields["syscall"])
	if err != nil || nr < 0 {
		return Violation{}, false
	}
	code, err := strconv.ParseUint(strings.TrimPrefix(fields["code"], "0x"), 16, 32)
	if err != nil {
		return Violation{}, false
	}
	sig, _ := strconv.Atoi(fields["sig"])
	return Violation{
		PID:     pid,
		Comm:    fields["comm"],
		Syscall: nr,
		Name:    SyscallName(nr),
		Signal:  sig,
		Action:  actionName(code),
	}, true
}

// maxKmsgRecord bounds one /dev/kmsg record; the kernel's limit is 8 KiB.
const maxKmsgRecord = 8192

// ScanKmsg reads the whole kernel log ring buffer from /dev/kmsg without
// blocking and returns the seccomp violations recorded for pid (all pids if
// pid is 0). The ring buffer outlives processes: on a host that has run
// many, it can hold a record of an earlier process that had the same PID.
// To attribute violations to one process, open a KmsgWatcher before
// starting it. Reading /dev/kmsg needs CAP_SYSLOG unless dmesg_restrict is 0.
func ScanKmsg(pid int) ([]Violation, error) {
	fd, err := openKmsg()
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return scanRecords(fdReader(fd), pid)
}

func openKmsg() (int, error) {
	// A raw fd, not *os.File: os would park a non-blocking read of a
	// pollable device in the netpoller instead of returning EAGAIN.
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("seccomp: read kernel log: %w", &os.PathError{Op: "open", Path: "/dev/kmsg", Err: err})
	}
	return fd, nil
}

type fdReader int

func (r fdReader) Read(p []byte) (int, error) {
	n, err := unix.Read(int(r), p)
	if n < 0 {
		n = 0
	}
	return n, err
}

// scanRecords reads kmsg-style records (one per Read, or newline
// separated) from r until EOF or EAGAIN.
func scanRecords(r io.Reader, pid int) ([]Violation, error) {
	var out []Violation
	buf := make([]byte, maxKmsgRecord)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if v, ok := ParseAuditRecord(line); ok && (pid == 0 || v.PID == pid) {
					out = append(out, v)
				}
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF), errors.Is(err, unix.EAGAIN):
			return out, nil
		case errors.Is(err, unix.EPIPE):
			// The ring buffer overwrote records we had not read: go on.
		default:
			return out, fmt.Errorf("seccomp: read kernel log: %w", err)
		}
		if n == 0 && err == nil {
			return out, nil
		}
	}
}

// KmsgWatcher sees the seccomp violations the kernel logs after it was
// opened, so that a record of an earlier process that had the same PID is
// never attributed to the process started after it. Open it before
// starting the process to watch; it is not safe for concurrent use.
type KmsgWatcher struct {
	fd   int
	seen []Violation // every violation read so far, all PIDs
}

// WatchKmsg opens /dev/kmsg positioned after the last record logged so far.
func WatchKmsg() (*KmsgWatcher, error) {
	fd, err := openKmsg()
	if err != nil {
		return nil, err
	}
	if _, err := unix.Seek(fd, 0, io.SeekEnd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("seccomp: read kernel log: seek to its end: %w", err)
	}
	return &KmsgWatcher{fd: fd}, nil
}

// Scan reads what was logged since the last call, without blocking, and
// returns every violation recorded for pid since the watcher was opened
// (all pids if pid is 0).
func (w *KmsgWatcher) Scan(pid int) ([]Violation, error) {
	if w.fd < 0 {
		return nil, errors.New("seccomp: kernel log watcher is closed")
	}
	vs, err := scanRecords(fdReader(w.fd), 0)
	w.seen = append(w.seen, vs...)
	var out []Violation
	for _, v := range w.seen {
		if pid == 0 || v.PID == pid {
			out = append(out, v)
		}
	}
	return out, err
}

// Wait polls the kernel log until it holds at least one violation for pid
// logged since the watcher was opened, or ctx ends. The audit subsystem
// hands records to the log from its own kernel thread, so a record can
// appear shortly after the offending process has already died. When ctx
// ends first Wait returns ctx's error and no violations.
func (w *KmsgWatcher) Wait(ctx context.Context, pid int) ([]Violation, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		vs, err := w.Scan(pid)
		if err != nil || len(vs) > 0 {
			return vs, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

// Close releases the watcher's file descriptor. It is idempotent.
func (w *KmsgWatcher) Close() error {
	if w.fd < 0 {
		return nil
	}
	fd := w.fd
	w.fd = -1
	return unix.Close(fd)
}
