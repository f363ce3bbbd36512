package virtio

import (
	"encoding/binary"
	"errors"
	"sync/atomic"

	"github.com/kvmkit/kvmkit/kvm"
)

// Split ring layout sizes (virtio 1.2 section 2.7).
const (
	descSize     = 16
	usedElemSize = 8
	ringHeader   = 4 // flags + idx
)

// Queue is the device side of one split virtqueue. The transport configures
// it (size, ring addresses, ready) while the driver sets the device up; the
// device's worker then pops chains and pushes completions after Activate.
//
// A Queue is not safe for concurrent use: configuration happens on the
// transport's lock before activation, processing on one worker goroutine
// afterwards.
type Queue struct {
	maxSize uint16
	size    uint16
	ready   bool

	descAddr, availAddr, usedAddr uint64

	mem      kvm.GuestMemory
	desc     []byte // host views of the rings, set by Activate
	avail    []byte
	used     []byte
	eventIdx bool
	indirect bool

	nextAvail      uint16
	nextUsed       uint16
	signalledUsed  uint16
	signalledValid bool

	broken error // sticky: set by the first ring or chain error
	fence  atomic.Uint32
}

// NewQueue returns an unconfigured queue whose size may be at most maxSize
// (a power of two up to MaxQueueSize). The driver may choose a smaller size.
func NewQueue(maxSize uint16) *Queue {
	return &Queue{maxSize: maxSize, size: maxSize}
}

// MaxSize returns the largest size the driver may configure.
func (q *Queue) MaxSize() uint16 { return q.maxSize }

// Size returns the configured queue size.
func (q *Queue) Size() uint16 { return q.size }

// SetSize sets the queue size chosen by the driver. It is validated by
// Activate.
func (q *Queue) SetSize(n uint16) { q.size = n }

// Ready reports whether the driver enabled the queue.
func (q *Queue) Ready() bool { return q.ready }

// SetReady records the driver enabling or disabling the queue.
func (q *Queue) SetReady(r bool) { q.ready = r }

// DescAddr returns the guest-physical address of the descriptor table.
func (q *Queue) DescAddr() uint64 { return q.descAddr }

// AvailAddr returns the guest-physical address of the available (driver) ring.
func (q *Queue) AvailAddr() uint64 { return q.availAddr }

// UsedAddr returns the guest-physical address of the used (device) ring.
func (q *Queue) UsedAddr() uint64 { return q.usedAddr }

// SetDescAddr sets the descriptor table address.
func (q *Queue) SetDescAddr(a uint64) { q.descAddr = a }

// SetAvailAddr sets the available ring address.
func (q *Queue) SetAvailAddr(a uint64) { q.availAddr = a }

// SetUsedAddr sets the used ring address.
func (q *Queue) SetUsedAddr(a uint64) { q.usedAddr = a }

// Reset returns the queue to its power-on state.
func (q *Queue) Reset() {
	*q = Queue{maxSize: q.maxSize, size: q.maxSize}
}

// Err returns the error that broke the queue, or nil.
func (q *Queue) Err() error { return q.broken }

// Activate validates the configuration and maps the rings. features are the
// negotiated feature bits; FeatureEventIdx and FeatureIndirectDesc matter.
func (q *Queue) Activate(mem kvm.GuestMemory, features uint64) error {
	if !q.ready {
		return q.fail(&RingError{What: "ready", Err: ErrQueueNotReady})
	}
	n := uint64(q.size)
	if n == 0 || n&(n-1) != 0 || q.size > q.maxSize || n > MaxQueueSize {
		return q.fail(&RingError{What: "size", Value: n, Err: ErrQueueSize})
	}
	var err error
	if q.desc, err = mapRing(mem, "desc", q.descAddr, n*descSize, 16); err != nil {
		return q.fail(err)
	}
	if q.avail, err = mapRing(mem, "avail", q.availAddr, ringHeader+2*n+2, 2); err != nil {
		return q.fail(err)
	}
	if q.used, err = mapRing(mem, "used", q.usedAddr, ringHeader+usedElemSize*n+2, 4); err != nil {
		return q.fail(err)
	}
	q.mem = mem
	q.eventIdx = features&FeatureEventIdx != 0
	q.indirect = features&FeatureIndirectDesc != 0
	return nil
}

func mapRing(mem kvm.GuestMemory, what string, addr, n, align uint64) ([]byte, error) {
	if addr%align != 0 {
		return nil, &RingError{What: what, Value: addr, Err: ErrRingAddress}
	}
	b, err := mem.Slice(addr, n)
	if err != nil {
		return nil, &RingError{What: what, Value: addr, Err: errors.Join(ErrRingAddress, err)}
	}
	return b, nil
}

func (q *Queue) fail(err error) error {
	if q.broken == nil {
		q.broken = err
	}
	return err
}

// barrier orders the surrounding loads and stores against the guest: an
// atomic read-modify-write is a full fence on amd64 and arm64 and the Go
// compiler does not move memory accesses across it.
func (q *Queue) barrier() { q.fence.Add(1) }

func (q *Queue) availIdx() uint16 { return binary.LittleEndian.Uint16(q.avail[2:]) }

func (q *Queue) availFlags() uint16 { return binary.LittleEndian.Uint16(q.avail[0:]) }

// Pending reports whether the driver has made buffers available that have
// not been popped yet. It returns an error if the available index is bogus.
func (q *Queue) Pending() (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.avail == nil {
		return false, &RingError{What: "ready", Err: ErrQueueNotReady}
	}
	idx := q.availIdx()
	q.barrier()
	ahead := idx - q.nextAvail
	if ahead > q.size {
		return false, q.fail(&RingError{What: "avail.idx", Value: uint64(idx), Err: ErrAvailIndex})
	}
	return ahead != 0, nil
}

// Pop parses the next available descriptor chain into c (reusing its
// storage). It returns false when no chain is available. Any malformed
// value makes it return a *ChainError or *RingError; the queue then stays
// broken and every later call returns the same error.
func (q *Queue) Pop(c *Chain) (bool, error) {
	ok, err := q.Pending()
	if !ok || err != nil {
		return false, err
	}
	head := binary.LittleEndian.Uint16(q.avail[ringHeader+2*uint64(q.nextAvail%q.size):])
	if err := q.parse(c, head); err != nil {
		return false, q.fail(err)
	}
	q.nextAvail++
	if q.eventIdx {
		// Ask for a notification when the driver adds past what we have
		// consumed: avail_event lives after the used ring.
		binary.LittleEndian.PutUint16(q.used[ringHeader+usedElemSize*uint64(q.size):], q.nextAvail)
	}
	return true, nil
}

// parse walks and validates the chain starting at head.
func (q *Queue) parse(c *Chain, head uint16) error {
	c.reset(head)
	table := q.desc
	limit := uint64(q.size)
	idx := uint64(head)
	indirect := false
	count := uint64(0)
	cerr := func(e error, addr, n uint64) error {
		return &ChainError{Head: head, Index: uint16(idx), Indirect: indirect, Addr: addr, Len: n, Err: e}
	}
	if idx >= limit {
		return cerr(ErrDescIndex, 0, 0)
	}
	for {
		count++
		if count > limit || len(c.Descs) >= MaxIndirectEntries+int(q.size) {
			return cerr(ErrChainTooLong, 0, 0)
		}
		d := table[idx*descSize : idx*descSize+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		n := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&DescFlagIndirect != 0 {
			switch {
			case !q.indirect:
				return cerr(ErrIndirectDisabled, addr, uint64(n))
			case indirect:
				return cerr(ErrIndirectNested, addr, uint64(n))
			case flags&DescFlagNext != 0:
				return cerr(ErrIndirectNext, addr, uint64(n))
			case n == 0 || n%descSize != 0 || n/descSize > MaxIndirectEntries:
				return cerr(ErrIndirectLen, addr, uint64(n))
			}
			// No alignment check: the specification requires 16-byte
			// alignment only of the ring's descriptor table, and Linux
			// kmallocs indirect tables with 8-byte alignment.
			t, err := q.mem.Slice(addr, uint64(n))
			if err != nil {
				return cerr(errors.Join(ErrDescAddress, err), addr, uint64(n))
			}
			// The indirect table gets its own loop bound: its length.
			table, limit, idx, count, indirect = t, uint64(n/descSize), 0, 0, true
			continue
		}
		// Even a zero-length buffer must name guest RAM: an address the
		// device could never touch is still a malformed descriptor.
		buf, err := q.mem.Slice(addr, uint64(n))
		if err != nil {
			return cerr(errors.Join(ErrDescAddress, err), addr, uint64(n))
		}
		write := flags&DescFlagWrite != 0
		if !write && c.nReadable != len(c.Descs) {
			return cerr(ErrDescOrder, addr, uint64(n))
		}
		c.Descs = append(c.Descs, Desc{Addr: addr, Len: n, Write: write, Buf: buf})
		if write {
			c.writableLen += uint64(n)
		} else {
			c.nReadable++
			c.readableLen += uint64(n)
		}
		if flags&DescFlagNext == 0 {
			return nil
		}
		idx = uint64(next)
		if idx >= limit {
			return cerr(ErrDescIndex, 0, 0)
		}
	}
}

// Rewind gives back the last n popped chains that were not pushed, so that
// the next Pop returns them again (used when a frame needs more buffers than
// are available).
func (q *Queue) Rewind(n uint16) {
	q.nextAvail -= n
	if q.eventIdx && q.used != nil {
		binary.LittleEndian.PutUint16(q.used[ringHeader+usedElemSize*uint64(q.size):], q.nextAvail)
	}
}

// Push returns the chain with head index head to the driver, reporting that
// the device wrote written bytes into its device-writable buffers.
func (q *Queue) Push(head uint16, written uint32) error {
	if q.broken != nil {
		return q.broken
	}
	if q.used == nil {
		return &RingError{What: "ready", Err: ErrQueueNotReady}
	}
	if head >= q.size {
		return &RingError{What: "used.id", Value: uint64(head), Err: ErrUsedID}
	}
	e := q.used[ringHeader+usedElemSize*uint64(q.nextUsed%q.size):]
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], written)
	q.nextUsed++
	q.barrier() // the element must be visible before the index
	binary.LittleEndian.PutUint16(q.used[2:], q.nextUsed)
	q.barrier()
	return nil
}

// NeedsInterrupt reports whether the driver wants an interrupt for the
// completions pushed since the last call: with VIRTIO_F_EVENT_IDX it checks
// used_event, otherwise the VIRTQ_AVAIL_F_NO_INTERRUPT flag.
func (q *Queue) NeedsInterrupt() bool {
	if q.avail == nil || q.broken != nil {
		return false
	}
	q.barrier()
	if !q.eventIdx {
		return q.availFlags()&AvailFlagNoInterrupt == 0
	}
	usedEvent := binary.LittleEndian.Uint16(q.avail[ringHeader+2*uint64(q.size):])
	old, valid := q.signalledUsed, q.signalledValid
	q.signalledUsed, q.signalledValid = q.nextUsed, true
	if !valid {
		return true
	}
	// vring_need_event: did nextUsed move past usedEvent since old?
	return q.nextUsed-usedEvent-1 < q.nextUsed-old
}

// DisableNotification asks the driver not to notify the device (a hint; with
// VIRTIO_F_EVENT_IDX the avail_event written by Pop already suppresses).
func (q *Queue) DisableNotification() {
	if q.used == nil || q.eventIdx {
		return
	}
	f := binary.LittleEndian.Uint16(q.used[0:])
	binary.LittleEndian.PutUint16(q.used[0:], f|UsedFlagNoNotify)
}

// EnableNotification asks the driver to notify the device about new buffers
// and then reports whether buffers arrived meanwhile (the caller must then
// process them, as no notification will come for them).
func (q *Queue) EnableNotification() (bool, error) {
	if q.used == nil {
		return false, q.broken
	}
	if q.eventIdx {
		binary.LittleEndian.PutUint16(q.used[ringHeader+usedElemSize*uint64(q.size):], q.nextAvail)
	} else {
		f := binary.LittleEndian.Uint16(q.used[0:])
		binary.LittleEndian.PutUint16(q.used[0:], f&^UsedFlagNoNotify)
	}
	q.barrier()
	return q.Pending()
}

// QueueState is the saved state of one queue.
type QueueState struct {
	MaxSize        uint16 `json:"max_size"`
	Size           uint16 `json:"size"`
	Ready          bool   `json:"ready"`
	DescAddr       uint64 `json:"desc_addr"`
	AvailAddr      uint64 `json:"avail_addr"`
	UsedAddr       uint64 `json:"used_addr"`
	NextAvail      uint16 `json:"next_avail"`
	NextUsed       uint16 `json:"next_used"`
	SignalledUsed  uint16 `json:"signalled_used"`
	SignalledValid bool   `json:"signalled_valid"`
}

// State returns the queue's state for saving.
func (q *Queue) State() QueueState {
	return QueueState{
		MaxSize: q.maxSize, Size: q.size, Ready: q.ready,
		DescAddr: q.descAddr, AvailAddr: q.availAddr, UsedAddr: q.usedAddr,
		NextAvail: q.nextAvail, NextUsed: q.nextUsed,
		SignalledUsed: q.signalledUsed, SignalledValid: q.signalledValid,
	}
}

// SetState restores a saved state into an inactive queue. The caller then
// calls Activate if the device was running.
func (q *Queue) SetState(s QueueState) error {
	if s.MaxSize != q.maxSize {
		return &StateError{What: "queue max size", Err: ErrStateMismatch}
	}
	*q = Queue{
		maxSize: q.maxSize, size: s.Size, ready: s.Ready,
		descAddr: s.DescAddr, availAddr: s.AvailAddr, usedAddr: s.UsedAddr,
		nextAvail: s.NextAvail, nextUsed: s.NextUsed,
		signalledUsed: s.SignalledUsed, signalledValid: s.SignalledValid,
	}
	return nil
}
