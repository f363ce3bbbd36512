package lab

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// imageEntry is one file, directory or symlink of an Image.
type imageEntry struct {
	mode   fs.FileMode // type bits + permissions
	data   []byte      // inline content (files) or link target (symlinks)
	host   string      // host path to stream content from (files)
	size   int64
	isLink bool
}

// Image collects the files of an initramfs and writes it as a newc cpio.
// Parent directories are created implicitly; later additions replace
// earlier ones at the same path.
type Image struct {
	entries map[string]imageEntry
}

// NewImage returns an empty Image.
func NewImage() *Image { return &Image{entries: map[string]imageEntry{}} }

func cleanGuest(p string) (string, error) {
	c := path.Clean("/" + p)
	if c == "/" {
		return "", fmt.Errorf("nestlab: invalid guest path %q", p)
	}
	return c, nil
}

func (im *Image) addParents(p string) {
	for d := path.Dir(p); d != "/"; d = path.Dir(d) {
		if _, ok := im.entries[d]; !ok {
			im.entries[d] = imageEntry{mode: fs.ModeDir | 0o755}
		}
	}
}

// AddDir adds an empty directory.
func (im *Image) AddDir(guest string) error {
	g, err := cleanGuest(guest)
	if err != nil {
		return err
	}
	im.addParents(g)
	im.entries[g] = imageEntry{mode: fs.ModeDir | 0o755}
	return nil
}

// AddFile adds a file with inline content.
func (im *Image) AddFile(guest string, perm fs.FileMode, data []byte) error {
	g, err := cleanGuest(guest)
	if err != nil {
		return err
	}
	im.addParents(g)
	im.entries[g] = imageEntry{mode: perm.Perm(), data: data, size: int64(len(data))}
	return nil
}

// AddSymlink adds a symbolic link.
func (im *Image) AddSymlink(guest, target string) error {
	g, err := cleanGuest(guest)
	if err != nil {
		return err
	}
	im.addParents(g)
	im.entries[g] = imageEntry{mode: fs.ModeSymlink | 0o777, data: []byte(target), isLink: true}
	return nil
}

// AddHost adds a host file, or a host directory recursively, at guest.
// Content is read when the image is written. Symlinks inside a directory
// are kept as links; other special files are skipped.
func (im *Image) AddHost(guest, host string) error {
	g, err := cleanGuest(guest)
	if err != nil {
		return err
	}
	st, err := os.Stat(host)
	if err != nil {
		return fmt.Errorf("nestlab: --file %s: %w", host, err)
	}
	if !st.IsDir() {
		im.addParents(g)
		im.entries[g] = imageEntry{mode: st.Mode().Perm(), host: host, size: st.Size()}
		return nil
	}
	return filepath.WalkDir(host, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(host, p)
		if err != nil {
			return err
		}
		dst := path.Join(g, filepath.ToSlash(rel))
		switch {
		case d.IsDir():
			return im.AddDir(dst)
		case d.Type()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return im.AddSymlink(dst, t)
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			im.addParents(dst)
			im.entries[dst] = imageEntry{mode: info.Mode().Perm(), host: p, size: info.Size()}
		}
		return nil
	})
}

// Paths returns the guest paths in the image, sorted.
func (im *Image) Paths() []string {
	out := make([]string, 0, len(im.entries))
	for p := range im.entries {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// WriteTo writes the image as a newc cpio archive (uncompressed: the Linux
// unpacker takes it as is, and skipping compression is fastest under TCG).
// Sorted order puts every directory before its contents.
func (im *Image) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: w}
	c := NewCPIOWriter(cw)
	for _, p := range im.Paths() {
		e := im.entries[p]
		name := strings.TrimPrefix(p, "/")
		var err error
		switch {
		case e.mode.IsDir():
			err = c.WriteDir(name, e.mode.Perm())
		case e.isLink:
			err = c.WriteSymlink(name, string(e.data))
		case e.host != "":
			err = writeHostFile(c, name, e)
		default:
			err = c.WriteFile(name, e.mode.Perm(), e.data)
		}
		if err != nil {
			return cw.n, err
		}
	}
	err := c.Close()
	return cw.n, err
}

func writeHostFile(c *CPIOWriter, name string, e imageEntry) error {
	f, err := os.Open(e.host)
	if err != nil {
		return err
	}
	defer f.Close()
	return c.WriteFileFrom(name, e.mode.Perm(), e.size, f)
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
