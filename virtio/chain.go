package virtio

import "io"

// Desc is one validated buffer of a descriptor chain. Buf aliases guest
// memory (it is nil for zero-length buffers).
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable
	Buf   []byte
}

// Chain is a validated descriptor chain: the device-readable buffers come
// first, then the device-writable ones. Indirect tables are already
// resolved. A Chain may be reused across Queue.Pop calls.
type Chain struct {
	// Head is the head descriptor index, to pass to Queue.Push.
	Head  uint16
	Descs []Desc

	nReadable   int
	readableLen uint64
	writableLen uint64
}

func (c *Chain) reset(head uint16) {
	c.Head = head
	c.Descs = c.Descs[:0]
	c.nReadable = 0
	c.readableLen = 0
	c.writableLen = 0
}

// Readable returns the device-readable buffers.
func (c *Chain) Readable() []Desc { return c.Descs[:c.nReadable] }

// Writable returns the device-writable buffers.
func (c *Chain) Writable() []Desc { return c.Descs[c.nReadable:] }

// ReadableLen returns the total length of the device-readable buffers.
func (c *Chain) ReadableLen() uint64 { return c.readableLen }

// WritableLen returns the total length of the device-writable buffers.
func (c *Chain) WritableLen() uint64 { return c.writableLen }

// Reader returns an io.Reader over the device-readable buffers.
func (c *Chain) Reader() *ChainReader { return &ChainReader{descs: c.Readable()} }

// Writer returns an io.Writer over the device-writable buffers.
func (c *Chain) Writer() *ChainWriter { return &ChainWriter{descs: c.Writable()} }

// ChainReader reads a chain's device-readable buffers in order.
type ChainReader struct {
	descs []Desc
	off   int
	n     uint64
}

// Read implements io.Reader.
func (r *ChainReader) Read(p []byte) (int, error) {
	total := 0
	for len(p) > 0 && len(r.descs) > 0 {
		b := r.descs[0].Buf[r.off:]
		k := copy(p, b)
		p = p[k:]
		total += k
		r.off += k
		if r.off == len(r.descs[0].Buf) {
			r.descs, r.off = r.descs[1:], 0
		}
	}
	r.n += uint64(total)
	if total == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return total, nil
}

// Skip discards up to n bytes and returns how many were skipped.
func (r *ChainReader) Skip(n uint64) uint64 {
	var done uint64
	for done < n && len(r.descs) > 0 {
		left := uint64(len(r.descs[0].Buf) - r.off)
		k := min(left, n-done)
		r.off += int(k)
		done += k
		if r.off == len(r.descs[0].Buf) {
			r.descs, r.off = r.descs[1:], 0
		}
	}
	r.n += done
	return done
}

// Consumed returns how many bytes have been read or skipped.
func (r *ChainReader) Consumed() uint64 { return r.n }

// ChainWriter writes into a chain's device-writable buffers in order.
type ChainWriter struct {
	descs []Desc
	off   int
	n     uint64
}

// Write implements io.Writer. It returns io.ErrShortWrite when the buffers
// are full; the bytes that fitted are written.
func (w *ChainWriter) Write(p []byte) (int, error) {
	total := 0
	for len(p) > 0 && len(w.descs) > 0 {
		b := w.descs[0].Buf[w.off:]
		k := copy(b, p)
		p = p[k:]
		total += k
		w.off += k
		if w.off == len(w.descs[0].Buf) {
			w.descs, w.off = w.descs[1:], 0
		}
	}
	w.n += uint64(total)
	if len(p) > 0 {
		return total, io.ErrShortWrite
	}
	return total, nil
}

// Written returns how many bytes have been written, the value to report in
// Queue.Push.
func (w *ChainWriter) Written() uint64 { return w.n }

// Remaining returns how many more bytes fit.
func (w *ChainWriter) Remaining() uint64 {
	var n uint64
	for i, d := range w.descs {
		n += uint64(len(d.Buf))
		if i == 0 {
			n -= uint64(w.off)
		}
	}
	return n
}
