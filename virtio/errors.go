package virtio

import (
	"errors"
	"fmt"
)

// Sentinel errors for malformed rings and chains. Every *ChainError and
// *RingError wraps exactly one of them, so callers can use errors.Is.
var (
	ErrDescIndex        = errors.New("descriptor index out of range")
	ErrDescAddress      = errors.New("descriptor buffer outside guest RAM")
	ErrChainTooLong     = errors.New("descriptor chain longer than its table (loop?)")
	ErrIndirectNested   = errors.New("indirect descriptor inside an indirect table")
	ErrIndirectNext     = errors.New("indirect descriptor with NEXT flag")
	ErrIndirectLen      = errors.New("indirect table length not a non-zero multiple of 16 or too large")
	ErrIndirectDisabled = errors.New("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
	ErrDescOrder        = errors.New("device-readable descriptor after a device-writable one")
	ErrAvailIndex       = errors.New("available index ran ahead by more than the queue size")
	ErrRingAddress      = errors.New("ring outside guest RAM or misaligned")
	ErrQueueSize        = errors.New("queue size zero, not a power of two, or above the maximum")
	ErrQueueNotReady    = errors.New("queue not ready")
	ErrUsedID           = errors.New("used element id out of range")
)

// ChainError reports a descriptor chain the driver built wrongly.
type ChainError struct {
	Head  uint16 // head descriptor index from the available ring
	Index uint16 // descriptor index where the problem was found
	// Indirect is true when Index is an entry of an indirect table.
	Indirect bool
	Addr     uint64 // guest address involved, if any
	Len      uint64 // length involved, if any
	Err      error  // one of the Err* sentinels
}

func (e *ChainError) Error() string {
	where := "descriptor"
	if e.Indirect {
		where = "indirect descriptor"
	}
	if e.Addr == 0 && e.Len == 0 {
		return fmt.Sprintf("virtqueue chain head %d, %s %d: %v", e.Head, where, e.Index, e.Err)
	}
	return fmt.Sprintf("virtqueue chain head %d, %s %d (addr %#x len %#x): %v",
		e.Head, where, e.Index, e.Addr, e.Len, e.Err)
}

// Unwrap returns the sentinel.
func (e *ChainError) Unwrap() error { return e.Err }

// RingError reports a problem with the queue itself rather than one chain:
// ring addresses, queue size or the available index.
type RingError struct {
	What  string // "desc", "avail", "used", "size" or "avail.idx"
	Value uint64 // the offending address, size or index
	Err   error  // one of the Err* sentinels
}

func (e *RingError) Error() string {
	return fmt.Sprintf("virtqueue %s %#x: %v", e.What, e.Value, e.Err)
}

// Unwrap returns the sentinel.
func (e *RingError) Unwrap() error { return e.Err }

// QueueError names the queue of a device on which err happened. Devices wrap
// ring and chain errors with it before calling Interrupt.NeedsReset.
type QueueError struct {
	Device DeviceType
	Queue  int
	Err    error
}

func (e *QueueError) Error() string {
	return fmt.Sprintf("virtio-%s queue %d: %v", e.Device, e.Queue, e.Err)
}

// Unwrap returns the underlying error.
func (e *QueueError) Unwrap() error { return e.Err }

// RequestError reports a request whose chain was well formed but whose
// contents break the device's protocol (for example a virtio-blk request
// without room for the status byte).
type RequestError struct {
	Device DeviceType
	Reason string
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("virtio-%s request: %s", e.Device, e.Reason)
}
