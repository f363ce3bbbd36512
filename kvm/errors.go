package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNoKVM is wrapped by Open when the KVM device does not exist.
var ErrNoKVM = errors.New("KVM is not available")

// IoctlError names the ioctl that failed and wraps its errno, so that
// errors.Is(err, unix.EINVAL) works.
type IoctlError struct {
	Op  string     // ioctl name, e.g. "KVM_SET_USER_MEMORY_REGION"
	Err unix.Errno // the errno
}

func (e *IoctlError) Error() string { return fmt.Sprintf("%s: %v", e.Op, e.Err) }

// Unwrap returns the errno.
func (e *IoctlError) Unwrap() error { return e.Err }

// ioctl issues one ioctl and wraps a failure in an IoctlError.
func ioctl(fd int, req, arg uintptr, op string) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, &IoctlError{Op: op, Err: errno}
	}
	return r, nil
}

// ioctlRetry is ioctl for calls that may be interrupted by a signal and are
// safe to repeat. Never use it for KVM_RUN: EINTR is how a kick arrives.
func ioctlRetry(fd int, req, arg uintptr, op string) (uintptr, error) {
	for {
		r, err := ioctl(fd, req, arg, op)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return r, err
	}
}
