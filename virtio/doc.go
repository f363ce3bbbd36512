// Package virtio implements the transport- and device-independent core of
// virtio 1.x: the split virtqueue as laid out in guest memory, the Device
// interface that transports (virtio/mmio, virtio/pci) drive, feature and
// status constants, a per-queue worker, and versioned state encoding for
// snapshots and live migration.
//
// The Queue knows the ring layout and nothing about devices: it yields
// validated descriptor chains (every guest-controlled index, address, length
// and chain length is checked) and takes used-buffer completions, and it
// decides whether the driver wants an interrupt (VIRTIO_F_EVENT_IDX).
// A malformed ring makes the queue return a *ChainError or *RingError; the
// device reports it through Interrupt.NeedsReset, which puts the device in
// DEVICE_NEEDS_RESET while the rest of the VM keeps running.
package virtio
