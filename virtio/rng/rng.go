// Package rng is the virtio entropy device (virtio 1.2 section 5.4): it
// fills the driver's buffers with bytes from the host's random source.
package rng

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"

	"github.com/kvmkit/kvmkit/virtio"
)

// QueueSize is the maximum size of the request queue.
const QueueSize = 256

// MaxRequest caps the random bytes delivered per request, bounding the work
// one guest buffer can cause.
const MaxRequest = 64 << 10

// Options configure the device.
type Options struct {
	// Source provides the entropy; default crypto/rand.Reader (getrandom).
	Source io.Reader
}

// Device is a virtio-rng device.
type Device struct {
	virtio.Runner // QueueNotify, Reset, Pause, Resume
	src           io.Reader
}

var _ virtio.Device = (*Device)(nil)

// New returns an entropy device.
func New(opts Options) *Device {
	src := opts.Source
	if src == nil {
		src = rand.Reader
	}
	return &Device{src: src}
}

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceEntropy }

// Features implements virtio.Device; the entropy device has none.
func (d *Device) Features() uint64 { return 0 }

// QueueMaxSizes implements virtio.Device: one request queue.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize} }

// ReadConfig implements virtio.Device; there is no configuration space.
func (d *Device) ReadConfig(off uint64, data []byte) { clear(data) }

// WriteConfig implements virtio.Device and ignores the write.
func (d *Device) WriteConfig(off uint64, data []byte) {}

// Activate implements virtio.Device.
func (d *Device) Activate(a virtio.Activation) error {
	q := a.Queues[0]
	if q == nil {
		return fmt.Errorf("virtio-rng: request queue not enabled")
	}
	var c virtio.Chain
	w := virtio.StartWorker(func(ctx context.Context) {
		virtio.ServeQueue(q, 0, virtio.DeviceEntropy, a.Interrupt, &c, d.handle)
	})
	d.Start(virtio.Workers{w})
	return nil
}

// handle fills the request's writable buffers with random bytes.
func (d *Device) handle(c *virtio.Chain) (uint32, error) {
	left := uint64(MaxRequest)
	var n uint64
	for _, desc := range c.Writable() {
		if left == 0 {
			break
		}
		b := desc.Buf[:min(uint64(len(desc.Buf)), left)]
		k, err := io.ReadFull(d.src, b)
		n += uint64(k)
		left -= uint64(k)
		if err != nil {
			break // report what we have; the driver asks again
		}
	}
	return uint32(n), nil
}

const stateVersion = 1

type state struct{}

// SaveState implements virtio.Device; the device has no state of its own
// beyond its queue, which the transport saves.
func (d *Device) SaveState() ([]byte, error) {
	return virtio.EncodeState("virtio-rng", stateVersion, state{})
}

// RestoreState implements virtio.Device.
func (d *Device) RestoreState(b []byte) error {
	var s state
	return virtio.DecodeState(b, "virtio-rng", stateVersion, &s)
}
