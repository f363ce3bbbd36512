// Package vtest is a virtio driver written in Go against guest memory, for
// testing devices and transports without KVM: it negotiates features through
// the virtio-mmio registers, lays out split queues in guest memory, posts
// buffers, notifies and reads the used ring.
package vtest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/virtio"
)

// MMIO register offsets used by the driver (mirrors virtio/mmio, which
// cannot be imported here without a cycle in its tests).
const (
	regDeviceFeatures    = 0x010
	regDeviceFeaturesSel = 0x014
	regDriverFeatures    = 0x020
	regDriverFeaturesSel = 0x024
	regQueueSel          = 0x030
	regQueueNumMax       = 0x034
	regQueueNum          = 0x038
	regQueueReady        = 0x044
	regQueueNotify       = 0x050
	regInterruptStatus   = 0x060
	regInterruptACK      = 0x064
	regStatus            = 0x070
	regQueueDescLow      = 0x080
	regQueueDescHigh     = 0x084
	regQueueDriverLow    = 0x090
	regQueueDriverHigh   = 0x094
	regQueueDeviceLow    = 0x0a0
	regQueueDeviceHigh   = 0x0a4
	regConfig            = 0x100
)

// Driver drives one virtio-mmio device.
type Driver struct {
	Dev  kvm.Device
	Mem  kvm.GuestMemory
	next uint64 // bump allocator for guest memory
	// Features are the negotiated features after Init.
	Features uint64
}

// NewDriver returns a driver that allocates guest memory from base upward.
func NewDriver(dev kvm.Device, mem kvm.GuestMemory, base uint64) *Driver {
	return &Driver{Dev: dev, Mem: mem, next: base}
}

// Alloc reserves n bytes of guest memory aligned to align and zeroes them.
func (d *Driver) Alloc(n, align uint64) uint64 {
	d.next = (d.next + align - 1) &^ (align - 1)
	a := d.next
	d.next += n
	if _, err := d.Mem.WriteAt(make([]byte, n), int64(a)); err != nil {
		panic(fmt.Sprintf("vtest: alloc %d bytes at %#x: %v", n, a, err))
	}
	return a
}

// Read32 reads a 32-bit register.
func (d *Driver) Read32(off uint64) uint32 {
	var b [4]byte
	d.Dev.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// Write32 writes a 32-bit register.
func (d *Driver) Write32(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.Dev.Write(off, b[:])
}

// ReadConfig reads n bytes of device configuration space at off.
func (d *Driver) ReadConfig(off uint64, n int) []byte {
	b := make([]byte, n)
	d.Dev.Read(regConfig+off, b)
	return b
}

// Status returns the device status.
func (d *Driver) Status() uint32 { return d.Read32(regStatus) }

// DeviceFeatures reads the 64 offered feature bits.
func (d *Driver) DeviceFeatures() uint64 {
	d.Write32(regDeviceFeaturesSel, 0)
	lo := d.Read32(regDeviceFeatures)
	d.Write32(regDeviceFeaturesSel, 1)
	hi := d.Read32(regDeviceFeatures)
	return uint64(hi)<<32 | uint64(lo)
}

// Init resets the device and negotiates want & offered. It fails if the
// device refuses FEATURES_OK.
func (d *Driver) Init(want uint64) error {
	d.Write32(regStatus, 0)
	d.Write32(regStatus, virtio.StatusAcknowledge)
	d.Write32(regStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	f := d.DeviceFeatures() & want
	d.Write32(regDriverFeaturesSel, 0)
	d.Write32(regDriverFeatures, uint32(f))
	d.Write32(regDriverFeaturesSel, 1)
	d.Write32(regDriverFeatures, uint32(f>>32))
	d.Write32(regStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)
	if d.Status()&virtio.StatusFeaturesOK == 0 {
		return errors.New("vtest: device refused FEATURES_OK")
	}
	d.Features = f
	return nil
}

// DriverOK sets DRIVER_OK.
func (d *Driver) DriverOK() {
	d.Write32(regStatus, d.Status()|virtio.StatusDriverOK)
}

// NeedsReset reports whether the device set DEVICE_NEEDS_RESET.
func (d *Driver) NeedsReset() bool { return d.Status()&virtio.StatusDeviceNeedsReset != 0 }

// AckInterrupts reads and acknowledges the interrupt status.
func (d *Driver) AckInterrupts() uint32 {
	v := d.Read32(regInterruptStatus)
	d.Write32(regInterruptACK, v)
	return v
}

// Queue is the driver side of one split virtqueue.
type Queue struct {
	d                 *Driver
	Index             int
	Size              uint16
	Desc, Avail, Used uint64
	availIdx          uint16
	lastUsed          uint16
	free              uint16 // next free descriptor (simple bump, wraps)
}

// SetupQueue configures queue i with size entries (0 = the device maximum).
func (d *Driver) SetupQueue(i int, size uint16) (*Queue, error) {
	d.Write32(regQueueSel, uint32(i))
	max := d.Read32(regQueueNumMax)
	if max == 0 {
		return nil, fmt.Errorf("vtest: queue %d does not exist", i)
	}
	if size == 0 {
		size = uint16(max)
	}
	n := uint64(size)
	q := &Queue{d: d, Index: i, Size: size}
	q.Desc = d.Alloc(16*n, 16)
	q.Avail = d.Alloc(6+2*n, 2)
	q.Used = d.Alloc(6+8*n, 4)
	d.Write32(regQueueNum, uint32(size))
	d.Write32(regQueueDescLow, uint32(q.Desc))
	d.Write32(regQueueDescHigh, uint32(q.Desc>>32))
	d.Write32(regQueueDriverLow, uint32(q.Avail))
	d.Write32(regQueueDriverHigh, uint32(q.Avail>>32))
	d.Write32(regQueueDeviceLow, uint32(q.Used))
	d.Write32(regQueueDeviceHigh, uint32(q.Used>>32))
	d.Write32(regQueueReady, 1)
	return q, nil
}

// Desc is a raw descriptor as the driver writes it.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

// WriteDesc writes raw descriptor i of table at tableAddr.
func (d *Driver) WriteDesc(tableAddr uint64, i uint16, desc Desc) {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], desc.Addr)
	binary.LittleEndian.PutUint32(b[8:], desc.Len)
	binary.LittleEndian.PutUint16(b[12:], desc.Flags)
	binary.LittleEndian.PutUint16(b[14:], desc.Next)
	if _, err := d.Mem.WriteAt(b[:], int64(tableAddr)+16*int64(i)); err != nil {
		panic(err)
	}
}

// Buf is one buffer to post.
type Buf struct {
	Addr  uint64
	Len   uint32
	Write bool
}

// Post links bufs into a chain of fresh descriptors, publishes its head in
// the available ring and returns the head. It does not notify.
func (q *Queue) Post(bufs ...Buf) uint16 {
	head := q.free
	for k, b := range bufs {
		i := q.free
		q.free = (q.free + 1) % q.Size
		desc := Desc{Addr: b.Addr, Len: b.Len}
		if b.Write {
			desc.Flags |= virtio.DescFlagWrite
		}
		if k < len(bufs)-1 {
			desc.Flags |= virtio.DescFlagNext
			desc.Next = q.free
		}
		q.d.WriteDesc(q.Desc, i, desc)
	}
	q.Publish(head)
	return head
}

// PostIndirect builds an indirect table holding bufs and posts it.
func (q *Queue) PostIndirect(bufs ...Buf) uint16 {
	table := q.d.Alloc(16*uint64(len(bufs)), 16)
	for k, b := range bufs {
		desc := Desc{Addr: b.Addr, Len: b.Len}
		if b.Write {
			desc.Flags |= virtio.DescFlagWrite
		}
		if k < len(bufs)-1 {
			desc.Flags |= virtio.DescFlagNext
			desc.Next = uint16(k + 1)
		}
		q.d.WriteDesc(table, uint16(k), desc)
	}
	head := q.free
	q.free = (q.free + 1) % q.Size
	q.d.WriteDesc(q.Desc, head, Desc{Addr: table, Len: uint32(16 * len(bufs)), Flags: virtio.DescFlagIndirect})
	q.Publish(head)
	return head
}

// Publish puts head in the next available ring slot and bumps avail.idx.
func (q *Queue) Publish(head uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], head)
	q.d.Mem.WriteAt(b[:], int64(q.Avail)+4+2*int64(q.availIdx%q.Size))
	q.availIdx++
	q.SetAvailIdx(q.availIdx)
}

// SetAvailIdx writes avail.idx directly (for hostile tests).
func (q *Queue) SetAvailIdx(v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	q.d.Mem.WriteAt(b[:], int64(q.Avail)+2)
}

// SetUsedEvent writes used_event (VIRTIO_F_EVENT_IDX).
func (q *Queue) SetUsedEvent(v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	q.d.Mem.WriteAt(b[:], int64(q.Avail)+4+2*int64(q.Size))
}

// AvailEvent reads avail_event written by the device.
func (q *Queue) AvailEvent() uint16 {
	var b [2]byte
	q.d.Mem.ReadAt(b[:], int64(q.Used)+4+8*int64(q.Size))
	return binary.LittleEndian.Uint16(b[:])
}

// Kick notifies the device.
func (q *Queue) Kick() { q.d.Write32(regQueueNotify, uint32(q.Index)) }

// UsedIdx reads used.idx.
func (q *Queue) UsedIdx() uint16 {
	var b [2]byte
	q.d.Mem.ReadAt(b[:], int64(q.Used)+2)
	return binary.LittleEndian.Uint16(b[:])
}

// Used is one used-ring element.
type Used struct {
	ID  uint32
	Len uint32
}

// PollUsed returns the next used element if there is one.
func (q *Queue) PollUsed() (Used, bool) {
	if q.UsedIdx() == q.lastUsed {
		return Used{}, false
	}
	var b [8]byte
	q.d.Mem.ReadAt(b[:], int64(q.Used)+4+8*int64(q.lastUsed%q.Size))
	q.lastUsed++
	return Used{ID: binary.LittleEndian.Uint32(b[0:]), Len: binary.LittleEndian.Uint32(b[4:])}, true
}

// WaitUsed waits for the next used element or for ctx to end.
func (q *Queue) WaitUsed(ctx context.Context) (Used, error) {
	for {
		if u, ok := q.PollUsed(); ok {
			return u, nil
		}
		select {
		case <-ctx.Done():
			return Used{}, fmt.Errorf("vtest: queue %d: waiting for used buffer: %w", q.Index, ctx.Err())
		case <-time.After(200 * time.Microsecond):
		}
	}
}

// WaitNeedsReset waits until the device reports DEVICE_NEEDS_RESET.
func (d *Driver) WaitNeedsReset(ctx context.Context) error {
	for !d.NeedsReset() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("vtest: waiting for DEVICE_NEEDS_RESET: %w", ctx.Err())
		case <-time.After(200 * time.Microsecond):
		}
	}
	return nil
}

// NewRawQueue lays out a queue of size entries in guest memory without
// telling any transport, for testing virtio.Queue directly.
func (d *Driver) NewRawQueue(size uint16) *Queue {
	n := uint64(size)
	q := &Queue{d: d, Size: size}
	q.Desc = d.Alloc(16*n, 16)
	q.Avail = d.Alloc(6+2*n, 2)
	q.Used = d.Alloc(6+8*n, 4)
	return q
}

// SetAvailFlags writes avail.flags.
func (q *Queue) SetAvailFlags(v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	q.d.Mem.WriteAt(b[:], int64(q.Avail))
}

// UsedFlags reads used.flags.
func (q *Queue) UsedFlags() uint16 {
	var b [2]byte
	q.d.Mem.ReadAt(b[:], int64(q.Used))
	return binary.LittleEndian.Uint16(b[:])
}
