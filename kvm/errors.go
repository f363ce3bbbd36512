package kvm

import (
	"errors"
	"fmt"
	"unsafe"

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

// ioctl issues one ioctl whose argument points to memory, and wraps a
// failure in an IoctlError. The pointer stays an unsafe.Pointer until the
// syscall itself: converting it to uintptr earlier (in a helper) would let
// the Go runtime move a stack-allocated argument while the kernel still
// has the old address.
func ioctl(fd int, req uintptr, arg unsafe.Pointer, op string) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return r, &IoctlError{Op: op, Err: errno}
	}
	return r, nil
}

// ioctlVal issues one ioctl whose argument is a plain value.
func ioctlVal(fd int, req, arg uintptr, op string) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, &IoctlError{Op: op, Err: errno}
	}
	return r, nil
}

// ioctlRetry is ioctl for calls that may be interrupted by a signal and are
// safe to repeat. Never use it for KVM_RUN: EINTR is how a kick arrives.
func ioctlRetry(fd int, req uintptr, arg unsafe.Pointer, op string) (uintptr, error) {
	for {
		r, err := ioctl(fd, req, arg, op)
		if !errors.Is(err, unix.EINTR) {
			return r, err
		}
	}
}

// ioctlValRetry is ioctlVal retried on EINTR.
func ioctlValRetry(fd int, req, arg uintptr, op string) (uintptr, error) {
	for {
		r, err := ioctlVal(fd, req, arg, op)
		if !errors.Is(err, unix.EINTR) {
			return r, err
		}
	}
}

// closeFD closes *fd once: it sets *fd to -1, so a second Close of a
// handle never closes a descriptor number the process has reused since.
func closeFD(fd *int) error {
	n := *fd
	if n < 0 {
		return nil
	}
	*fd = -1
	return unix.Close(n)
}
