package migration

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"

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
		for p := uint64(0); p < uint64(len(r.Host))/pageSize; p++ {
			if err := send(p); err != nil {
				return err
			}
		}
		return nil
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
