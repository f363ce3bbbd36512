package lab

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// cpioEntry is one entry parsed back by readNewc.
type cpioEntry struct {
	name string
	mode uint32
	data string
}

// readNewc is an independent newc parser used to check CPIOWriter.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	field := func(i int) uint64 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		require.NoError(t, err)
		return v
	}
	for {
		require.LessOrEqual(t, off+110, len(b), "truncated header")
		require.Equal(t, cpioMagic, string(b[off:off+6]))
		mode, size, namesize := field(1), field(6), field(11)
		nameStart := off + 110
		name := string(b[nameStart : nameStart+int(namesize)-1])
		require.Equal(t, byte(0), b[nameStart+int(namesize)-1])
		dataStart := (nameStart + int(namesize) + 3) &^ 3
		if name == cpioTrailer {
			return out
		}
		out = append(out, cpioEntry{name: name, mode: uint32(mode), data: string(b[dataStart : dataStart+int(size)])})
		off = (dataStart + int(size) + 3) &^ 3
	}
}

func TestCPIOWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	require.NoError(t, w.WriteDir("bin", 0o755))
	require.NoError(t, w.WriteFile("/bin/hello", 0o755, []byte("hi!")))
	require.NoError(t, w.WriteSymlink("bin/sh", "/bin/busybox"))
	require.NoError(t, w.WriteFile("empty", 0o600, nil))
	require.NoError(t, w.WriteFileFrom("big", 0o644, 5, strings.NewReader("12345")))
	require.NoError(t, w.Close())
	assert.Zero(t, buf.Len()%512, "archive is block padded")

	got := readNewc(t, buf.Bytes())
	assert.Equal(t, []cpioEntry{
		{"bin", 0o040755, ""},
		{"bin/hello", 0o100755, "hi!"},
		{"bin/sh", 0o120777, "/bin/busybox"},
		{"empty", 0o100600, ""},
		{"big", 0o100644, "12345"},
	}, got)
}

func TestCPIOWriterErrors(t *testing.T) {
	tests := []struct {
		name string
		do   func(w *CPIOWriter) error
		want string
	}{
		{"empty name", func(w *CPIOWriter) error { return w.WriteFile("", 0o644, nil) }, "invalid name"},
		{"trailer name", func(w *CPIOWriter) error { return w.WriteDir(cpioTrailer, 0o755) }, "invalid name"},
		{"nul in name", func(w *CPIOWriter) error { return w.WriteFile("a\x00b", 0o644, nil) }, "NUL"},
		{"short reader", func(w *CPIOWriter) error { return w.WriteFileFrom("f", 0o644, 10, strings.NewReader("abc")) }, "wrote 3 of 10"},
		{"too big", func(w *CPIOWriter) error { return w.WriteFileFrom("f", 0o644, 1<<33, strings.NewReader("")) }, "does not fit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do(NewCPIOWriter(io.Discard))
			var ce *CPIOError
			require.ErrorAs(t, err, &ce)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	w := NewCPIOWriter(io.Discard)
	require.NoError(t, w.Close())
	assert.True(t, errors.Is(w.WriteDir("x", 0o755), ErrCPIOClosed))
	assert.True(t, errors.Is(w.Close(), ErrCPIOClosed))
}

// TestCPIOWriterGNUCpio cross-checks the archive with GNU cpio when present.
func TestCPIOWriterGNUCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed")
	}
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	require.NoError(t, w.WriteDir("d", 0o755))
	require.NoError(t, w.WriteFile("d/f", 0o644, []byte("content\n")))
	require.NoError(t, w.WriteSymlink("d/l", "f"))
	require.NoError(t, w.Close())
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-idm", "--quiet", "--no-absolute-filenames")
	cmd.Dir = dir
	cmd.Stdin = &buf
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	data, err := os.ReadFile(filepath.Join(dir, "d", "f"))
	require.NoError(t, err)
	assert.Equal(t, "content\n", string(data))
	target, err := os.Readlink(filepath.Join(dir, "d", "l"))
	require.NoError(t, err)
	assert.Equal(t, "f", target)
}
