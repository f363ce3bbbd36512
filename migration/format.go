package migration

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// FormatVersion is the version of the stream and snapshot format written by
// this package. Streams of any other version are rejected with a
// [*VersionError].
const FormatVersion uint32 = 1

const (
	magic        = "KVMKMIGR"
	headerSize   = 20 // magic, version, kind, crc
	recHdrSize   = 12 // type, length, header crc
	recTrailSize = 4  // payload crc
)

// Stream kinds, carried in the header so that a stream is never read as
// another (a snapshot fed to Receive, the reply stream read as a source).
const (
	kindSource   uint32 = 1 // source -> target
	kindTarget   uint32 = 2 // target -> source
	kindSnapshot uint32 = 3 // snapshot state file
)

func kindName(k uint32) string {
	switch k {
	case kindSource:
		return "migration-source"
	case kindTarget:
		return "migration-target"
	case kindSnapshot:
		return "snapshot"
	}
	return fmt.Sprintf("unknown(%d)", k)
}

// RecordType identifies a record in a stream.
type RecordType uint32

// Record types. Source→target: Config, Pages, RoundEnd, Paused, State,
// Complete, Done. Target→source: Ready, RoundAck, Ack. Both: Error. Snapshot state
// file: SnapshotInfo, Config, PageBitmap, State, Complete.
const (
	RecConfig       RecordType = 1  // encoded Config
	RecPages        RecordType = 2  // batch of pages and zero-page markers
	RecRoundEnd     RecordType = 3  // end of a memory pass: round number
	RecPaused       RecordType = 4  // source vCPUs stopped: downtime starts
	RecState        RecordType = 5  // opaque vCPU/VM/device state
	RecComplete     RecordType = 6  // everything sent: load and resume
	RecDone         RecordType = 7  // source received the Ack
	RecReady        RecordType = 16 // target prepared: send memory
	RecAck          RecordType = 17 // target resumed: timings
	RecError        RecordType = 18 // the sender failed: message
	RecRoundAck     RecordType = 19 // target applied a pre-copy round: number
	RecSnapshotInfo RecordType = 32 // snapshot kind, IDs, memory file layout
	RecPageBitmap   RecordType = 33 // diff snapshot: which pages the memory file holds
)

func (t RecordType) String() string {
	switch t {
	case RecConfig:
		return "Config"
	case RecPages:
		return "Pages"
	case RecRoundEnd:
		return "RoundEnd"
	case RecPaused:
		return "Paused"
	case RecState:
		return "State"
	case RecComplete:
		return "Complete"
	case RecDone:
		return "Done"
	case RecReady:
		return "Ready"
	case RecAck:
		return "Ack"
	case RecError:
		return "Error"
	case RecRoundAck:
		return "RoundAck"
	case RecSnapshotInfo:
		return "SnapshotInfo"
	case RecPageBitmap:
		return "PageBitmap"
	}
	return fmt.Sprintf("RecordType(%d)", uint32(t))
}

// Caps on payload lengths. A length above its type's cap is rejected before
// any allocation.
const (
	// MaxBatchPages is the most pages one Pages record carries.
	MaxBatchPages = 256
	// MaxStateSize caps the opaque VM state.
	MaxStateSize = 64 << 20
	// MaxErrorMessage caps the message of an Error record.
	MaxErrorMessage = 4096

	maxPagesPayload  = 4 + MaxBatchPages*(8+pageSize)
	maxConfigPayload = 1 << 20
	maxBitmapPayload = 64 << 20 // 2 TiB of RAM at one bit per page
)

func maxPayload(t RecordType) (uint32, bool) {
	switch t {
	case RecConfig:
		return maxConfigPayload, true
	case RecPages:
		return maxPagesPayload, true
	case RecRoundEnd, RecPaused, RecRoundAck:
		return 16, true
	case RecState:
		return MaxStateSize, true
	case RecComplete, RecDone, RecReady:
		return 0, true
	case RecAck:
		return 64, true
	case RecError:
		return MaxErrorMessage, true
	case RecSnapshotInfo:
		return 64 << 10, true
	case RecPageBitmap:
		return maxBitmapPayload, true
	}
	return 0, false
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// writeHeader writes the stream header of the given kind.
func writeHeader(w io.Writer, kind uint32) error {
	var h [headerSize]byte
	copy(h[:8], magic)
	binary.LittleEndian.PutUint32(h[8:], FormatVersion)
	binary.LittleEndian.PutUint32(h[12:], kind)
	binary.LittleEndian.PutUint32(h[16:], crc(h[:16]))
	_, err := w.Write(h[:])
	return err
}

// readHeader reads and checks a stream header of the given kind.
func readHeader(r io.Reader, kind uint32) error {
	var h [headerSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("stream header: truncated: %w", io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("stream header: %w", err)
	}
	if string(h[:8]) != magic {
		return ErrBadMagic
	}
	// Check the version before the checksum so that a stream from another
	// version says so, whatever its header looks like.
	if v := binary.LittleEndian.Uint32(h[8:]); v != FormatVersion {
		if crc(h[:16]) == binary.LittleEndian.Uint32(h[16:]) {
			return &VersionError{Got: v, Want: FormatVersion}
		}
		return &ChecksumError{Part: "stream header", Offset: 0}
	}
	if crc(h[:16]) != binary.LittleEndian.Uint32(h[16:]) {
		return &ChecksumError{Part: "stream header", Offset: 0}
	}
	if k := binary.LittleEndian.Uint32(h[12:]); k != kind {
		return &KindError{Got: k, Want: kind}
	}
	return nil
}

// recordWriter frames records onto w.
type recordWriter struct {
	w   io.Writer
	hdr [recHdrSize]byte
}

// write writes one record whose payload is the concatenation of parts.
func (rw *recordWriter) write(t RecordType, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if max, ok := maxPayload(t); !ok || uint64(n) > uint64(max) {
		return fmt.Errorf("record %v: payload of %d bytes exceeds its cap", t, n)
	}
	binary.LittleEndian.PutUint32(rw.hdr[0:], uint32(t))
	binary.LittleEndian.PutUint32(rw.hdr[4:], uint32(n))
	binary.LittleEndian.PutUint32(rw.hdr[8:], crc(rw.hdr[:8]))
	if _, err := rw.w.Write(rw.hdr[:]); err != nil {
		return err
	}
	var sum uint32
	for _, p := range parts {
		sum = crc32.Update(sum, castagnoli, p)
		if _, err := rw.w.Write(p); err != nil {
			return err
		}
	}
	var tr [recTrailSize]byte
	binary.LittleEndian.PutUint32(tr[:], sum)
	_, err := rw.w.Write(tr[:])
	return err
}

// recordReader reads records framed by recordWriter, checking every length
// against its cap and every checksum.
type recordReader struct {
	r   io.Reader
	off int64 // offset of the next record
	buf []byte
}

// readChunk is how much the payload buffer grows at a time beyond what was
// already allocated: a corrupt length on a short stream cannot make the
// reader allocate more than it actually received plus one chunk.
const readChunk = 1 << 20

// next returns the next record. The payload aliases an internal buffer that
// the following call reuses. At a clean end of stream it returns io.EOF.
func (rr *recordReader) next() (RecordType, []byte, error) {
	var hdr [recHdrSize]byte
	off := rr.off
	if n, err := io.ReadFull(rr.r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) && n == 0 {
			return 0, nil, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("record header at offset %d: truncated: %w", off, io.ErrUnexpectedEOF)
		}
		return 0, nil, fmt.Errorf("record header at offset %d: %w", off, err)
	}
	t := RecordType(binary.LittleEndian.Uint32(hdr[0:]))
	n := binary.LittleEndian.Uint32(hdr[4:])
	if crc(hdr[:8]) != binary.LittleEndian.Uint32(hdr[8:]) {
		return t, nil, &ChecksumError{Record: t, Part: "record header", Offset: off}
	}
	max, ok := maxPayload(t)
	if !ok {
		return t, nil, &ProtocolError{Record: t, Offset: off, Msg: "unknown record type"}
	}
	if n > max {
		return t, nil, &LimitError{What: fmt.Sprintf("record %v at offset %d: payload length", t, off), Got: uint64(n), Max: uint64(max)}
	}
	total := int(n) + recTrailSize
	rr.buf = rr.buf[:0]
	for len(rr.buf) < total {
		want := total - len(rr.buf)
		if want > readChunk {
			want = readChunk
		}
		if cap(rr.buf)-len(rr.buf) < want {
			nb := make([]byte, len(rr.buf), len(rr.buf)+want)
			copy(nb, rr.buf)
			rr.buf = nb
		}
		start := len(rr.buf)
		rr.buf = rr.buf[:start+want]
		if _, err := io.ReadFull(rr.r, rr.buf[start:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return t, nil, fmt.Errorf("record %v at offset %d (%d bytes): %w", t, off, n, err)
		}
	}
	payload := rr.buf[:n]
	if crc(payload) != binary.LittleEndian.Uint32(rr.buf[n:]) {
		return t, nil, &ChecksumError{Record: t, Part: "payload", Offset: off}
	}
	rr.off += int64(recHdrSize + total)
	return t, payload, nil
}

// enc appends little-endian values to a byte slice.
type enc struct{ b []byte }

func (e *enc) u16(v uint16) { e.b = binary.LittleEndian.AppendUint16(e.b, v) }
func (e *enc) u32(v uint32) { e.b = binary.LittleEndian.AppendUint32(e.b, v) }
func (e *enc) u64(v uint64) { e.b = binary.LittleEndian.AppendUint64(e.b, v) }
func (e *enc) bytes32(p []byte) {
	e.u32(uint32(len(p)))
	e.b = append(e.b, p...)
}

// dec reads little-endian values from a payload. The first error sticks;
// later reads return zero values.
type dec struct {
	b   []byte
	err error
	ctx string
}

func (d *dec) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%s: %s", d.ctx, fmt.Sprintf(format, args...))
	}
}

func (d *dec) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("truncated at %s", what)
		return nil
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *dec) u16(what string) uint16 {
	if p := d.take(2, what); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (d *dec) u32(what string) uint32 {
	if p := d.take(4, what); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (d *dec) u64(what string) uint64 {
	if p := d.take(8, what); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// bytes32 reads a uint32 length and that many bytes (copied), at most max.
func (d *dec) bytes32(what string, max int) []byte {
	n := d.u32(what + " length")
	if d.err != nil {
		return nil
	}
	if uint64(n) > uint64(max) {
		d.fail("%s length %d above the limit of %d", what, n, max)
		return nil
	}
	p := d.take(int(n), what)
	if p == nil || n == 0 {
		return nil
	}
	return append([]byte(nil), p...)
}

func (d *dec) end() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	return d.err
}
