package lab

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseGoList(t *testing.T) {
	pkgs, err := ParseGoList("example.com/a\t/src/a\t2\t0\nexample.com/b\t/src/b\t0\t0\n")
	require.NoError(t, err)
	assert.Equal(t, []ListedPackage{{"example.com/a", "/src/a", 2}, {"example.com/b", "/src/b", 0}}, pkgs)
	_, err = ParseGoList("bad line\n")
	assert.ErrorContains(t, err, "bad line")
	_, err = ParseGoList("a\tb\tx\t0\n")
	assert.Error(t, err)
}

func TestParseLDD(t *testing.T) {
	out := []byte("\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n")
	assert.Equal(t, []string{"/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}, ParseLDD(out))
}

// TestGoTestPayload runs the generated script with sh on the host against
// fake test binaries to check statuses and markers.
func TestGoTestPayload(t *testing.T) {
	p := GoTestPayload(3, []string{"-test.run=^TestX$"})
	shSyntax(t, p)
	assert.Contains(t, p, "(cd /lab/pkg/1 && exec /lab/bin/1.test -test.v '-test.run=^TestX$')")

	// Re-root the script into a temp dir and run it.
	root := t.TempDir()
	for i, body := range []string{`echo "pkg0 $*"; exit 0`, `echo pkg1 in $(pwd); exit 1`, `exit 0`} {
		write(t, filepath.Join(root, "lab/bin", []string{"0", "1", "2"}[i]+".test"), "#!/bin/sh\n"+body+"\n")
		require.NoError(t, os.MkdirAll(filepath.Join(root, "lab/pkg", []string{"0", "1", "2"}[i]), 0o755))
	}
	script := strings.ReplaceAll(p, "/lab/", root+"/lab/")
	out, err := exec.Command("sh", "-c", script).CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, string(out))
	assert.Equal(t, 1, ee.ExitCode())
	var markers []Marker
	for _, l := range strings.Split(string(out), "\n") {
		if m, ok := ParseMarker(l); ok {
			markers = append(markers, m)
		}
	}
	require.Len(t, markers, 6)
	assert.Equal(t, Marker{Kind: MarkerPkgEnd, Value: "1:1", Index: 1, Code: 1}, markers[3])
	assert.Equal(t, 0, markers[5].Code)
	assert.Contains(t, string(out), "pkg0 -test.v -test.run=^TestX$")
	assert.Contains(t, string(out), "pkg1 in "+root+"/lab/pkg/1")
}

func TestAddPackageDir(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "x.go"), "package x")
	write(t, filepath.Join(dir, "testdata/golden/a"), "A")
	write(t, filepath.Join(dir, "sub/y.go"), "package sub")
	im := NewImage()
	require.NoError(t, AddPackageDir(im, "/lab/pkg/0", dir))
	assert.Equal(t, []string{"/lab", "/lab/pkg", "/lab/pkg/0", "/lab/pkg/0/testdata", "/lab/pkg/0/testdata/golden", "/lab/pkg/0/testdata/golden/a", "/lab/pkg/0/x.go"}, im.Paths())
}

func TestAddExecutableDynamic(t *testing.T) {
	sh, err := exec.LookPath("sh")
	require.NoError(t, err)
	sh, err = filepath.EvalSymlinks(sh)
	require.NoError(t, err)
	im := NewImage()
	require.NoError(t, AddExecutable(context.Background(), im, "/lab/bin/sh", sh))
	paths := strings.Join(im.Paths(), " ")
	assert.Contains(t, paths, "/lab/bin/sh")
	if strings.Contains(paths, "libc.so") {
		assert.Contains(t, paths, "ld-linux", "dynamic binary brings its interpreter")
	}
}
