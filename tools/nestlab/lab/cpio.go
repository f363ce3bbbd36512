package lab

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
)

// cpioMagic is the magic of the "newc" (SVR4, no CRC) cpio format that the
// Linux initramfs unpacker reads.
const cpioMagic = "070701"

// cpioTrailer names the entry that ends a newc archive.
const cpioTrailer = "TRAILER!!!"

// maxCPIOField is the largest value a newc header field (8 hex digits) holds.
const maxCPIOField = 0xFFFFFFFF

// ErrCPIOClosed is returned when writing to a CPIOWriter after Close.
var ErrCPIOClosed = errors.New("cpio: writer closed")

// CPIOError describes an entry that cannot be represented in a newc archive.
type CPIOError struct {
	Name   string // entry name
	Reason string // what was wrong
}

func (e *CPIOError) Error() string { return fmt.Sprintf("cpio: entry %q: %s", e.Name, e.Reason) }

// CPIOWriter writes a newc-format cpio archive, as read by the Linux
// initramfs unpacker. Entries get uid/gid 0 and mtime 0 so archives are
// reproducible. It is not safe for concurrent use.
type CPIOWriter struct {
	w      io.Writer
	n      int64 // bytes written so far (for padding)
	ino    uint32
	closed bool
}

// NewCPIOWriter returns a CPIOWriter writing to w.
func NewCPIOWriter(w io.Writer) *CPIOWriter { return &CPIOWriter{w: w, ino: 1} }

// WriteDir adds a directory entry. Parents are not created implicitly.
func (c *CPIOWriter) WriteDir(name string, perm fs.FileMode) error {
	return c.entry(name, 0o040000|uint32(perm.Perm()), 0, nil)
}

// WriteFile adds a regular file with the given content.
func (c *CPIOWriter) WriteFile(name string, perm fs.FileMode, data []byte) error {
	return c.entry(name, 0o100000|uint32(perm.Perm()), int64(len(data)), strings.NewReader(string(data)))
}

// WriteFileFrom adds a regular file of size bytes read from r; it fails if r
// yields fewer than size bytes.
func (c *CPIOWriter) WriteFileFrom(name string, perm fs.FileMode, size int64, r io.Reader) error {
	return c.entry(name, 0o100000|uint32(perm.Perm()), size, r)
}

// WriteSymlink adds a symbolic link name pointing at target.
func (c *CPIOWriter) WriteSymlink(name, target string) error {
	return c.entry(name, 0o120777, int64(len(target)), strings.NewReader(target))
}

// Close writes the trailer entry. It does not close the underlying writer.
func (c *CPIOWriter) Close() error {
	if c.closed {
		return ErrCPIOClosed
	}
	if err := c.header(cpioTrailer, 0, 0, 0); err != nil {
		return err
	}
	c.closed = true
	return c.pad(512) // conventional block padding; harmless for the kernel
}

func (c *CPIOWriter) entry(name string, mode uint32, size int64, r io.Reader) error {
	if c.closed {
		return ErrCPIOClosed
	}
	name = strings.TrimPrefix(name, "/")
	switch {
	case name == "" || name == cpioTrailer:
		return &CPIOError{Name: name, Reason: "invalid name"}
	case strings.ContainsRune(name, 0):
		return &CPIOError{Name: name, Reason: "name contains NUL"}
	case size < 0 || size > maxCPIOField:
		return &CPIOError{Name: name, Reason: fmt.Sprintf("size %d does not fit the newc format", size)}
	}
	c.ino++
	if err := c.header(name, mode, c.ino, size); err != nil {
		return err
	}
	if size > 0 {
		n, err := io.CopyN(c.w, r, size)
		c.n += n
		if err != nil {
			return &CPIOError{Name: name, Reason: fmt.Sprintf("content: wrote %d of %d bytes: %v", n, size, err)}
		}
	}
	return c.pad(4)
}

func (c *CPIOWriter) header(name string, mode, ino uint32, size int64) error {
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	// magic ino mode uid gid nlink mtime filesize devmajor devminor
	// rdevmajor rdevminor namesize check
	h := fmt.Sprintf("%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		cpioMagic, ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	if err := c.write([]byte(h + name + "\x00")); err != nil {
		return err
	}
	return c.pad(4)
}

func (c *CPIOWriter) pad(align int64) error {
	if rem := c.n % align; rem != 0 {
		return c.write(make([]byte, align-rem))
	}
	return nil
}

func (c *CPIOWriter) write(p []byte) error {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return err
}
