package virtio

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// WatchEventFD calls fn each time the eventfd fd is signalled, until ctx
// ends (then it returns nil) or reading fd fails. It is the bridge for an
// ioeventfd: the VMM registers fd with KVM_IOEVENTFD on a queue's notify
// address and runs WatchEventFD(ctx, fd, func() { t.NotifyQueue(i) }) on its
// own goroutine, so notifications skip the vCPU exit path. Several signals
// between two reads are coalesced into one call, which is fine for queue
// notifications. fd stays open; the caller closes it after WatchEventFD
// returns.
func WatchEventFD(ctx context.Context, fd int, fn func()) error {
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd for cancellation: %w", err)
	}
	defer unix.Close(stop)
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		case <-done:
		}
	}()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(stop), Events: unix.POLLIN}}
	var buf [8]byte
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("poll eventfd %d: %w", fd, err)
		}
		if fds[1].Revents != 0 || ctx.Err() != nil {
			return nil
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			return fmt.Errorf("eventfd %d: poll revents %#x", fd, fds[0].Revents)
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			continue
		}
		if _, err := unix.Read(fd, buf[:]); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("read eventfd %d: %w", fd, err)
		}
		fn()
	}
}

// EventFDIRQ is an interrupt line backed by an eventfd, typically a KVM
// irqfd: raising the line signals the eventfd; lowering it does nothing
// (KVM treats an irqfd as an edge, and the transports raise again for every
// new event).
type EventFDIRQ struct {
	FD int
}

// SetLevel signals the eventfd when high is true.
func (e EventFDIRQ) SetLevel(high bool) error {
	if !high {
		return nil
	}
	_, err := unix.Write(e.FD, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	if err != nil {
		return fmt.Errorf("signal irqfd %d: %w", e.FD, err)
	}
	return nil
}
