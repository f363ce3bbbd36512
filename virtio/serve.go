package virtio

// Handler processes one request chain and returns how many bytes it wrote
// into the chain's device-writable buffers. An error means the request broke
// the device protocol; the device is then put in DEVICE_NEEDS_RESET.
type Handler func(c *Chain) (written uint32, err error)

// ServeQueue drains queue q (index i of a device of type t): it pops every
// available chain, hands it to h, pushes the completion, and raises the
// used-buffer interrupt when the driver wants one. Driver notifications are
// suppressed while it works and re-enabled before it returns, without losing
// buffers made available meanwhile. On a ring, chain or request error it
// calls irq.NeedsReset once and returns the error; a broken queue is left
// alone afterwards. c is scratch storage reused across chains.
func ServeQueue(q *Queue, i int, t DeviceType, irq Interrupt, c *Chain, h Handler) error {
	if q == nil || q.Err() != nil {
		return nil
	}
	fail := func(err error) error {
		err = &QueueError{Device: t, Queue: i, Err: err}
		irq.NeedsReset(err)
		return err
	}
	for {
		q.DisableNotification()
		pushed := false
		for {
			ok, err := q.Pop(c)
			if err != nil {
				return fail(err)
			}
			if !ok {
				break
			}
			n, err := h(c)
			if err != nil {
				q.fail(err)
				return fail(err)
			}
			if err := q.Push(c.Head, n); err != nil {
				return fail(err)
			}
			pushed = true
		}
		if pushed && q.NeedsInterrupt() {
			irq.SignalUsed(i)
		}
		more, err := q.EnableNotification()
		if err != nil {
			return fail(err)
		}
		if !more {
			return nil
		}
	}
}
