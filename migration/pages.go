package migration

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/kvm"
)

const (
	pageSize  = kvm.PageSize
	pageShift = 12
	// zeroFlag marks a page entry as all zeros: no data follows.
	zeroFlag = 1
	// flagMask covers the low bits of a page entry available for flags.
	flagMask = pageSize - 1
)

// zeroPage is compared against; it is never written.
var zeroPage [pageSize]byte

// IsZeroPage reports whether p (one page) holds only zero bytes. It runs at
// memory speed (bytes.Equal is vectorised).
func IsZeroPage(p []byte) bool { return bytes.Equal(p, zeroPage[:len(p)]) }

// BitmapWords returns the number of uint64 words of a dirty bitmap covering
// a region of size bytes: one bit per 4 KiB page, bit i of word w is page
// 64*w+i (the KVM_GET_DIRTY_LOG layout on little-endian hosts).
func BitmapWords(size uint64) int { return int((size/pageSize + 63) / 64) }

// countBits returns the number of set bits.
func countBits(bm []uint64) uint64 {
	var n uint64
	for _, w := range bm {
		n += uint64(bits.OnesCount64(w))
	}
	return n
}

// orBitmap ors src into dst.
func orBitmap(dst, src []uint64) {
	for i := range dst {
		dst[i] |= src[i]
	}
}

// forEachSet calls fn for every set bit, in order, stopping at an error.
func forEachSet(bm []uint64, fn func(page uint64) error) error {
	for w, word := range bm {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &= word - 1
			if err := fn(uint64(w)*64 + uint64(b)); err != nil {
				return err
			}
		}
	}
	return nil
}

// pageBatcher packs pages into Pages records: a uint32 count, then per page
// a uint64 (guest-physical address | flags) followed, unless zeroFlag is
// set, by the page's 4096 bytes.
type pageBatcher struct {
	rw    *recordWriter
	buf   []byte
	count int
	max   int

	pages, zero uint64 // totals since creation
	holes       uint64 // pages of a full pass skipped as never-written memfd holes
}

func newPageBatcher(rw *recordWriter, max int) *pageBatcher {
	if max <= 0 || max > MaxBatchPages {
		max = MaxBatchPages
	}
	return &pageBatcher{rw: rw, max: max, buf: make([]byte, 4, 4+max*(8+pageSize))}
}

// add queues the page at gpa whose bytes are data, sending a record when
// the batch is full. A zero page is queued as its address only.
func (b *pageBatcher) add(gpa uint64, data []byte) error {
	if IsZeroPage(data) {
		b.buf = binary.LittleEndian.AppendUint64(b.buf, gpa|zeroFlag)
		b.zero++
	} else {
		b.buf = binary.LittleEndian.AppendUint64(b.buf, gpa)
		b.buf = append(b.buf, data...)
		b.pages++
	}
	b.count++
	if b.count == b.max {
		return b.flush()
	}
	return nil
}

// flush sends the queued pages, if any.
func (b *pageBatcher) flush() error {
	if b.count == 0 {
		return nil
	}
	binary.LittleEndian.PutUint32(b.buf[:4], uint32(b.count))
	err := b.rw.write(RecPages, b.buf)
	b.buf = b.buf[:4]
	b.count = 0
	return err
}

// sendRegionPages queues the pages of region r whose bits are set in bm (all
// pages when bm is nil).
func (b *pageBatcher) sendRegionPages(r kvm.Region, bm []uint64, check func() error) error {
	send := func(page uint64) error {
		if page%64 == 0 && check != nil {
			if err := check(); err != nil {
				return err
			}
		}
		off := page << pageShift
		if off+pageSize > uint64(len(r.Host)) {
			return fmt.Errorf("dirty bitmap names page %d beyond region at %#x (%d pages)", page, r.GPA, len(r.Host)/pageSize)
		}
		return b.add(r.GPA+off, r.Host[off:off+pageSize])
	}
	if bm == nil {
		n := uint64(len(r.Host)) / pageSize
		return forEachDataPage(r.FD, n, func(first, end uint64) error {
			for p := first; p < end; p++ {
				if err := send(p); err != nil {
					return err
				}
			}
			return nil
		}, func(holes uint64) { b.holes += holes })
	}
	return forEachSet(bm, send)
}

// applyPages writes the pages of one Pages payload into regions. Every
// address is checked: aligned, flags known, inside a region. With fresh
// (the full pass into just-prepared, zero-filled RAM) a zero marker touches
// nothing, so an idle guest's untouched memory stays unallocated on the
// target. It returns the number of data pages and zero pages applied.
func applyPages(payload []byte, regions []kvm.Region, fresh bool) (data, zero uint64, err error) {
	if len(payload) < 4 {
		return 0, 0, fmt.Errorf("pages: payload of %d bytes has no count", len(payload))
	}
	count := binary.LittleEndian.Uint32(payload)
	if count == 0 || count > MaxBatchPages {
		return 0, 0, fmt.Errorf("pages: count %d, want 1..%d", count, MaxBatchPages)
	}
	p := payload[4:]
	last := -1
	for i := uint32(0); i < count; i++ {
		if len(p) < 8 {
			return data, zero, fmt.Errorf("pages: entry %d of %d truncated", i, count)
		}
		ent := binary.LittleEndian.Uint64(p)
		p = p[8:]
		gpa, flags := ent&^flagMask, ent&flagMask
		if flags&^zeroFlag != 0 {
			return data, zero, fmt.Errorf("pages: entry %d at %#x has unknown flags %#x", i, gpa, flags)
		}
		dst := pageAt(regions, gpa, &last)
		if dst == nil {
			return data, zero, fmt.Errorf("pages: entry %d: guest address %#x is not in guest RAM", i, gpa)
		}
		if flags&zeroFlag != 0 {
			// Checking before clearing avoids dirtying a page that is
			// already zero.
			if !fresh && !IsZeroPage(dst) {
				clear(dst)
			}
			zero++
			continue
		}
		if len(p) < pageSize {
			return data, zero, fmt.Errorf("pages: entry %d at %#x: data truncated", i, gpa)
		}
		copy(dst, p[:pageSize])
		p = p[pageSize:]
		data++
	}
	if len(p) != 0 {
		return data, zero, fmt.Errorf("pages: %d trailing bytes after %d entries", len(p), count)
	}
	return data, zero, nil
}

// pageAt returns the host bytes of the page at gpa, or nil. last caches the
// index of the region found previously.
func pageAt(regions []kvm.Region, gpa uint64, last *int) []byte {
	if *last >= 0 {
		r := &regions[*last]
		if gpa >= r.GPA && gpa-r.GPA < uint64(len(r.Host)) {
			off := gpa - r.GPA
			return r.Host[off : off+pageSize]
		}
	}
	for i := range regions {
		r := &regions[i]
		if gpa >= r.GPA && gpa-r.GPA < uint64(len(r.Host)) {
			*last = i
			off := gpa - r.GPA
			return r.Host[off : off+pageSize]
		}
	}
	return nil
}

// forEachDataPage calls f for each run [first, end) of pages of a region of
// n pages that may hold data, and holes with the number of pages skipped.
// For a memfd region (fd >= 0, mapped shared from offset 0) it asks the
// file for its data with SEEK_DATA/SEEK_HOLE: a hole was never written, so
// it reads as zeros and the full pass into zero-filled target RAM can
// skip it without even reading it (reading would allocate it here).
// Without an fd, or when the file system cannot say, every page is data.
func forEachDataPage(fd int, n uint64, f func(first, end uint64) error, holes func(uint64)) error {
	if fd < 0 {
		return f(0, n)
	}
	size := int64(n * pageSize)
	var off int64
	var skipped uint64
	for off < size {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // no data past off
			break
		}
		if err != nil {
			if off == 0 {
				return f(0, n) // SEEK_DATA unsupported: send everything
			}
			return fmt.Errorf("memory file: SEEK_DATA at %#x: %w", off, err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("memory file: SEEK_HOLE at %#x: %w", data, err)
		}
		hole = min(hole, size)
		first, end := uint64(data)/pageSize, (uint64(hole)+pageSize-1)/pageSize
		skipped += first - uint64(off)/pageSize
		if err := f(first, end); err != nil {
			return err
		}
		off = int64(end * pageSize)
	}
	if off < size {
		skipped += n - uint64(off)/pageSize
	}
	holes(skipped)
	return nil
}
