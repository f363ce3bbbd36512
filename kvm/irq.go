package kvm

// IRQ is one interrupt line into the guest's interrupt controller. Devices
// raise and lower it; the VM delivers it (KVM_IRQ_LINE, or an irqfd).
type IRQ interface {
	// SetLevel drives the line high (asserted) or low.
	SetLevel(high bool) error
}

// NoIRQ is an IRQ that goes nowhere, for VMs without an interrupt controller
// and for tests.
type NoIRQ struct{}

// SetLevel implements IRQ and does nothing.
func (NoIRQ) SetLevel(bool) error { return nil }

// IRQFunc adapts a function to IRQ.
type IRQFunc func(high bool) error

// SetLevel implements IRQ.
func (f IRQFunc) SetLevel(high bool) error { return f(high) }
