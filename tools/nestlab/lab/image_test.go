package lab

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestImage(t *testing.T) {
	host := t.TempDir()
	write(t, filepath.Join(host, "tree/a.txt"), "A")
	write(t, filepath.Join(host, "tree/sub/b.txt"), "B")
	require.NoError(t, os.Symlink("a.txt", filepath.Join(host, "tree/link")))
	write(t, filepath.Join(host, "single"), "S")

	im := NewImage()
	require.NoError(t, im.AddFile("/lab/payload.sh", 0o755, []byte("#!/bin/sh\n")))
	require.NoError(t, im.AddSymlink("/bin/sh", "/bin/busybox"))
	require.NoError(t, im.AddHost("/data", filepath.Join(host, "tree")))
	require.NoError(t, im.AddHost("/x/y/single", filepath.Join(host, "single")))
	require.NoError(t, im.AddFile("/lab/payload.sh", 0o700, []byte("replaced")))
	assert.Error(t, im.AddFile("/", 0o644, nil))
	assert.ErrorContains(t, im.AddHost("/nope", filepath.Join(host, "missing")), "missing")

	assert.Equal(t, []string{
		"/bin", "/bin/sh", "/data", "/data/a.txt", "/data/link", "/data/sub", "/data/sub/b.txt",
		"/lab", "/lab/payload.sh", "/x", "/x/y", "/x/y/single",
	}, im.Paths())

	var buf bytes.Buffer
	n, err := im.WriteTo(&buf)
	require.NoError(t, err)
	assert.Equal(t, int64(buf.Len()), n)
	got := map[string]cpioEntry{}
	var order []string
	for _, e := range readNewc(t, buf.Bytes()) {
		got[e.name] = e
		order = append(order, e.name)
	}
	assert.Equal(t, "replaced", got["lab/payload.sh"].data)
	assert.Equal(t, uint32(0o100700), got["lab/payload.sh"].mode)
	assert.Equal(t, "B", got["data/sub/b.txt"].data)
	assert.Equal(t, "a.txt", got["data/link"].data)
	assert.Equal(t, uint32(0o120777), got["data/link"].mode)
	assert.Equal(t, uint32(0o040755), got["x/y"].mode)
	assert.Equal(t, "S", got["x/y/single"].data)
	// Every directory precedes its contents.
	seen := map[string]bool{}
	for _, name := range order {
		if d := filepath.Dir(name); d != "." {
			assert.True(t, seen[d], "%s before its directory", name)
		}
		seen[name] = true
	}
}
