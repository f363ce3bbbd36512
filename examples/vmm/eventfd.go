package main

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/virtio"
)

// queueNotifier hands a device's queue notifications to KVM ioeventfds: a
// guest write to a queue's notify address completes inside the kernel (the
// vCPU goes straight back into the guest, no exit to the VMM) and a
// goroutine per queue calls notify. The transport's MMIO handler for the
// same address stays registered, so a write KVM does not match (another
// width, a moved BAR) still arrives by the exit path.
type queueNotifier struct {
	vm        *kvm.VM
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	regs      []kvm.IOEventFD
	closeOnce sync.Once
}

// notifyByEventFD registers one ioeventfd per queue (reg describes the
// address of queue q) and starts its watcher. On any failure it undoes
// what it did and returns the error; the caller keeps the exit path.
func notifyByEventFD(m *machine.Machine, queues int, reg func(q int) kvm.IOEventFD, notify func(q int)) (*queueNotifier, error) {
	ctx, cancel := context.WithCancel(context.Background())
	n := &queueNotifier{vm: m.VM(), cancel: cancel}
	for q := range queues {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			n.Close()
			return nil, fmt.Errorf("eventfd for queue %d: %w", q, err)
		}
		e := reg(q)
		e.FD = fd
		if err := n.vm.AddIOEventFD(e); err != nil {
			unix.Close(fd)
			n.Close()
			return nil, fmt.Errorf("queue %d at %#x: %w", q, e.Addr, err)
		}
		n.regs = append(n.regs, e)
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			_ = virtio.WatchEventFD(ctx, fd, func() { notify(q) })
		}()
	}
	return n, nil
}

// Close stops the watchers, deassigns the ioeventfds and closes them.
func (n *queueNotifier) Close() error {
	var errs []error
	n.closeOnce.Do(func() {
		n.cancel()
		n.wg.Wait()
		for _, e := range n.regs {
			errs = append(errs, n.vm.RemoveIOEventFD(e), unix.Close(e.FD))
		}
	})
	return errors.Join(errs...)
}
