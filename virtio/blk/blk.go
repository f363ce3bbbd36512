// Package blk is the virtio block device (virtio 1.2 section 5.2) backed by
// a raw image file: read, write, flush, discard, write-zeroes and get-id,
// with an optional read-only mode and rate limiter. I/O runs on one worker
// goroutine per queue, never on vCPU threads.
package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/virtio"
)

// SectorSize is the virtio-blk sector: offsets and capacity count 512 bytes.
const SectorSize = 512

// QueueSize is the maximum size of each request queue.
const QueueSize = 256

// IDLen is the length of the get-id answer (the disk serial).
const IDLen = 20

// MaxDiscardSegments is the most discard or write-zeroes segments accepted
// in one request.
const MaxDiscardSegments = 16

// Feature bits (virtio 1.2 section 5.2.3).
const (
	FeatureSizeMax     uint64 = 1 << 1
	FeatureSegMax      uint64 = 1 << 2
	FeatureRO          uint64 = 1 << 5
	FeatureBlkSize     uint64 = 1 << 6
	FeatureFlush       uint64 = 1 << 9
	FeatureMQ          uint64 = 1 << 12
	FeatureDiscard     uint64 = 1 << 13
	FeatureWriteZeroes uint64 = 1 << 14
)

// Request types.
const (
	TypeIn          uint32 = 0
	TypeOut         uint32 = 1
	TypeFlush       uint32 = 4
	TypeGetID       uint32 = 8
	TypeDiscard     uint32 = 11
	TypeWriteZeroes uint32 = 13
)

// Request status values.
const (
	StatusOK     byte = 0
	StatusIOErr  byte = 1
	StatusUnsupp byte = 2
)

// Limiter throttles I/O; virtio/ratelimit provides token buckets. Wait
// blocks until bytes may be transferred or ctx ends.
type Limiter interface {
	Wait(ctx context.Context, bytes int) error
}

// Options configure a block device.
type Options struct {
	// ReadOnly offers VIRTIO_BLK_F_RO and fails writes and discards with
	// VIRTIO_BLK_S_IOERR.
	ReadOnly bool
	// ID is the serial returned by get-id (at most IDLen bytes are used).
	ID string
	// Queues is the number of request queues (default 1; more offers
	// VIRTIO_BLK_F_MQ).
	Queues int
	// Limiter, if set, is waited on for the bytes of every read and write.
	Limiter Limiter
}

// Device is a virtio-blk device.
type Device struct {
	virtio.Runner // QueueNotify, Reset, Pause, Resume

	f        *os.File
	sectors  uint64
	readOnly bool
	id       [IDLen]byte
	queues   int
	limiter  Limiter
	config   [60]byte
}

var _ virtio.Device = (*Device)(nil)

// Open opens the raw image at path (read-only if opts.ReadOnly) and returns
// a device for it. Close closes the file.
func Open(path string, opts Options) (*Device, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("virtio-blk: %w", err)
	}
	d, err := New(f, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// New returns a device backed by f, whose size (rounded down to whole
// sectors) is the disk capacity. The device takes ownership of f.
func New(f *os.File, opts Options) (*Device, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("virtio-blk: stat %s: %w", f.Name(), err)
	}
	size := fi.Size()
	if fi.Mode()&os.ModeDevice != 0 {
		if size, err = f.Seek(0, 2); err != nil {
			return nil, fmt.Errorf("virtio-blk: size of %s: %w", f.Name(), err)
		}
	}
	nq := max(opts.Queues, 1)
	if nq > 64 {
		return nil, fmt.Errorf("virtio-blk: %d queues requested, at most 64", nq)
	}
	d := &Device{f: f, sectors: uint64(size) / SectorSize, readOnly: opts.ReadOnly, queues: nq, limiter: opts.Limiter}
	copy(d.id[:], opts.ID)
	c := d.config[:]
	binary.LittleEndian.PutUint64(c[0:], d.sectors)    // capacity
	binary.LittleEndian.PutUint32(c[12:], QueueSize-2) // seg_max
	binary.LittleEndian.PutUint32(c[20:], SectorSize)  // blk_size
	binary.LittleEndian.PutUint16(c[34:], uint16(nq))  // num_queues
	binary.LittleEndian.PutUint32(c[36:], 1<<22)       // max_discard_sectors (2 GiB)
	binary.LittleEndian.PutUint32(c[40:], MaxDiscardSegments)
	binary.LittleEndian.PutUint32(c[44:], 8)     // discard_sector_alignment (4 KiB)
	binary.LittleEndian.PutUint32(c[48:], 1<<22) // max_write_zeroes_sectors
	binary.LittleEndian.PutUint32(c[52:], MaxDiscardSegments)
	c[56] = 1 // write_zeroes_may_unmap
	return d, nil
}

// Close closes the image file. Reset the device (or stop the VM) first.
func (d *Device) Close() error { return d.f.Close() }

// Sync writes the image's data to stable storage (before a migration's
// switch-over, so the target on shared storage sees every completed write).
func (d *Device) Sync() error { return d.f.Sync() }

// Capacity returns the disk size in sectors.
func (d *Device) Capacity() uint64 { return d.sectors }

// Type implements virtio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceBlock }

// Features implements virtio.Device.
func (d *Device) Features() uint64 {
	f := FeatureSegMax | FeatureBlkSize | FeatureFlush | FeatureDiscard | FeatureWriteZeroes
	if d.readOnly {
		f |= FeatureRO
	}
	if d.queues > 1 {
		f |= FeatureMQ
	}
	return f
}

// QueueMaxSizes implements virtio.Device.
func (d *Device) QueueMaxSizes() []uint16 {
	s := make([]uint16, d.queues)
	for i := range s {
		s[i] = QueueSize
	}
	return s
}

// ReadConfig implements virtio.Device.
func (d *Device) ReadConfig(off uint64, data []byte) {
	clear(data)
	if off < uint64(len(d.config)) {
		copy(data, d.config[off:])
	}
}

// WriteConfig implements virtio.Device; the configuration is read-only.
func (d *Device) WriteConfig(off uint64, data []byte) {}

// Activate implements virtio.Device: it starts one worker per enabled queue.
func (d *Device) Activate(a virtio.Activation) error {
	ws := make(virtio.Workers, len(a.Queues))
	for i, q := range a.Queues {
		if q == nil {
			continue
		}
		var c virtio.Chain
		ws[i] = virtio.StartWorker(func(ctx context.Context) {
			virtio.ServeQueue(q, i, virtio.DeviceBlock, a.Interrupt, &c, func(c *virtio.Chain) (uint32, error) {
				return d.handle(ctx, c)
			})
		})
	}
	d.Start(ws)
	return nil
}

// request is a parsed virtio-blk request.
type request struct {
	typ    uint32
	sector uint64
	// data are the payload buffers: device-readable for writes and
	// discards, device-writable for reads and get-id.
	data   [][]byte
	length uint64
	status []byte // the one status byte, in guest memory
}

// parseRequest splits a chain into header, payload and status byte.
func parseRequest(c *virtio.Chain) (request, error) {
	var r request
	if c.ReadableLen() < 16 {
		return r, &virtio.RequestError{Device: virtio.DeviceBlock, Reason: fmt.Sprintf("header needs 16 readable bytes, chain has %d", c.ReadableLen())}
	}
	if c.WritableLen() < 1 {
		return r, &virtio.RequestError{Device: virtio.DeviceBlock, Reason: "no writable byte for the status"}
	}
	var hdr [16]byte
	rd := c.Reader()
	if _, err := rd.Read(hdr[:]); err != nil {
		return r, &virtio.RequestError{Device: virtio.DeviceBlock, Reason: "reading header: " + err.Error()}
	}
	r.typ = binary.LittleEndian.Uint32(hdr[0:])
	r.sector = binary.LittleEndian.Uint64(hdr[8:])

	w := c.Writable()
	last := w[len(w)-1]
	for last.Len == 0 { // zero-length trailing buffers: find the real last byte
		w = w[:len(w)-1]
		last = w[len(w)-1]
	}
	r.status = last.Buf[len(last.Buf)-1:]
	switch r.typ {
	case TypeIn, TypeGetID:
		r.length = c.WritableLen() - 1
		r.data = segments(c.Writable(), 0, r.length)
	default:
		r.length = c.ReadableLen() - 16
		r.data = segments(c.Readable(), 16, r.length)
	}
	return r, nil
}

// segments returns the n bytes of descs after the first skip bytes.
func segments(descs []virtio.Desc, skip, n uint64) [][]byte {
	var out [][]byte
	for _, d := range descs {
		b := d.Buf
		if skip >= uint64(len(b)) {
			skip -= uint64(len(b))
			continue
		}
		b = b[skip:]
		skip = 0
		if n == 0 {
			break
		}
		if uint64(len(b)) > n {
			b = b[:n]
		}
		if len(b) > 0 {
			out = append(out, b)
		}
		n -= uint64(len(b))
	}
	return out
}

// handle executes one request and returns the bytes written to the chain.
func (d *Device) handle(ctx context.Context, c *virtio.Chain) (uint32, error) {
	r, err := parseRequest(c)
	if err != nil {
		return 0, err
	}
	status, written := d.execute(ctx, &r)
	r.status[0] = status
	return uint32(min(written+1, c.WritableLen())), nil
}

// execute performs r and returns its status and the payload bytes written
// into guest buffers.
func (d *Device) execute(ctx context.Context, r *request) (byte, uint64) {
	switch r.typ {
	case TypeIn, TypeOut:
		if r.typ == TypeOut && d.readOnly {
			return StatusIOErr, 0
		}
		if !d.inRange(r.sector, r.length) || r.length%SectorSize != 0 {
			return StatusIOErr, 0
		}
		if d.limiter != nil {
			if err := d.limiter.Wait(ctx, int(min(r.length, 1<<30))); err != nil {
				return StatusIOErr, 0
			}
		}
		off := int64(r.sector * SectorSize)
		for _, b := range r.data {
			var err error
			if r.typ == TypeIn {
				_, err = d.f.ReadAt(b, off)
			} else {
				_, err = d.f.WriteAt(b, off)
			}
			if err != nil {
				return StatusIOErr, 0
			}
			off += int64(len(b))
		}
		if r.typ == TypeIn {
			return StatusOK, r.length
		}
		return StatusOK, 0
	case TypeFlush:
		if d.readOnly {
			return StatusOK, 0
		}
		if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
			return StatusIOErr, 0
		}
		return StatusOK, 0
	case TypeGetID:
		var n uint64
		id := d.id[:]
		for _, b := range r.data {
			k := copy(b, id)
			id = id[k:]
			n += uint64(k)
		}
		return StatusOK, n
	case TypeDiscard, TypeWriteZeroes:
		if d.readOnly {
			return StatusIOErr, 0
		}
		return d.discard(r), 0
	}
	return StatusUnsupp, 0
}

func (d *Device) inRange(sector, length uint64) bool {
	return sector <= d.sectors && length <= (d.sectors-sector)*SectorSize
}

// discard handles discard and write-zeroes segments.
func (d *Device) discard(r *request) byte {
	if r.length%16 != 0 || r.length/16 > MaxDiscardSegments || r.length == 0 {
		return StatusUnsupp
	}
	var buf [16 * MaxDiscardSegments]byte
	n := 0
	for _, b := range r.data {
		n += copy(buf[n:], b)
	}
	for s := 0; s < n; s += 16 {
		sector := binary.LittleEndian.Uint64(buf[s:])
		count := uint64(binary.LittleEndian.Uint32(buf[s+8:]))
		flags := binary.LittleEndian.Uint32(buf[s+12:])
		if flags&^1 != 0 || (r.typ == TypeDiscard && flags != 0) {
			return StatusUnsupp
		}
		if !d.inRange(sector, count*SectorSize) {
			return StatusIOErr
		}
		off, length := int64(sector*SectorSize), int64(count*SectorSize)
		if length == 0 {
			continue
		}
		var err error
		if r.typ == TypeWriteZeroes && flags == 0 {
			err = unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		} else {
			err = errors.ErrUnsupported
		}
		if err != nil {
			// Punching a hole both discards and reads back as zeroes.
			err = unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		}
		if err != nil {
			if r.typ == TypeDiscard {
				return StatusOK // discard is a hint
			}
			return StatusIOErr
		}
	}
	return StatusOK
}

const stateVersion = 1

type state struct {
	Capacity uint64 `json:"capacity"`
	ReadOnly bool   `json:"read_only"`
	Queues   int    `json:"queues"`
}

// SaveState implements virtio.Device. The disk contents are not part of it.
func (d *Device) SaveState() ([]byte, error) {
	return virtio.EncodeState("virtio-blk", stateVersion, state{Capacity: d.sectors, ReadOnly: d.readOnly, Queues: d.queues})
}

// RestoreState implements virtio.Device: it checks that the disk has the
// size, mode and queue count the saved guest knows.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := virtio.DecodeState(b, "virtio-blk", stateVersion, &s); err != nil {
		return err
	}
	if s != (state{Capacity: d.sectors, ReadOnly: d.readOnly, Queues: d.queues}) {
		return &virtio.StateError{What: "virtio-blk", Err: fmt.Errorf("%w: saved disk %d sectors ro=%v queues=%d, have %d ro=%v queues=%d",
			virtio.ErrStateMismatch, s.Capacity, s.ReadOnly, s.Queues, d.sectors, d.readOnly, d.queues)}
	}
	return nil
}
