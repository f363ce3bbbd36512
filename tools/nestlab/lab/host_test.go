package lab

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeHost lays out a fake / with the given kernel versions. It copies the
// test binary itself as a dynamic or static "busybox" as asked.
func fakeHost(t *testing.T, versions []string, withModules, staticBusybox bool) string {
	t.Helper()
	root := t.TempDir()
	for _, v := range versions {
		write(t, filepath.Join(root, "boot", "vmlinuz-"+v), "kernel")
		if withModules {
			for _, m := range moduleOrder {
				write(t, filepath.Join(root, "lib/modules", v, m.rel), m.name)
			}
		}
	}
	if staticBusybox {
		// A Go test binary built with CGO_ENABLED=0 is static; the go test
		// binary may not be, so write a minimal static ELF header instead.
		write(t, filepath.Join(root, "bin/busybox"), string(minimalStaticELF()))
	}
	return root
}

func write(t *testing.T, p, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(t, os.WriteFile(p, []byte(content), 0o755))
}

// minimalStaticELF returns an ELF64 x86-64 executable header with no
// program headers (so no PT_INTERP): enough for isStaticELF.
func minimalStaticELF() []byte {
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = 2, 1, 1 // 64-bit, little endian, version
	h[16] = 2                  // ET_EXEC
	h[18] = 62                 // EM_X86_64
	h[20] = 1                  // version
	h[52] = 64                 // ehsize
	h[54] = 56                 // phentsize
	h[58] = 64                 // shentsize
	return h
}

func TestFindHostPicksNewest(t *testing.T) {
	root := fakeHost(t, []string{"6.1.0-9-cloud-amd64", "6.1.0-57-cloud-amd64", "6.1.0-13-cloud-amd64"}, true, true)
	// A non-cloud flavour is ignored even if newer.
	write(t, filepath.Join(root, "lib/modules/6.9.0-1-amd64/x"), "")
	h, err := FindHost(root)
	require.NoError(t, err)
	assert.Equal(t, "6.1.0-57-cloud-amd64", h.KernelVersion)
	assert.Equal(t, filepath.Join(root, "boot/vmlinuz-6.1.0-57-cloud-amd64"), h.Kernel)
	require.Len(t, h.Modules, 3)
	assert.Equal(t, []string{"irqbypass", "kvm", "kvm-amd"}, []string{h.Modules[0].Name, h.Modules[1].Name, h.Modules[2].Name})
	assert.Equal(t, filepath.Join(root, "bin/busybox"), h.Busybox)
}

func TestFindHostErrors(t *testing.T) {
	tests := []struct {
		name    string
		root    func(t *testing.T) string
		pkg     string
		message string
	}{
		{"no kernel", func(t *testing.T) string { return t.TempDir() }, "linux-image-cloud-amd64", "cloud kernel not found"},
		{"no modules", func(t *testing.T) string { return fakeHost(t, []string{"6.1.0-57-cloud-amd64"}, false, true) }, "linux-image-6.1.0-57-cloud-amd64", "kernel module irqbypass"},
		{"no image", func(t *testing.T) string {
			root := fakeHost(t, []string{"6.1.0-57-cloud-amd64"}, true, true)
			require.NoError(t, os.Remove(filepath.Join(root, "boot/vmlinuz-6.1.0-57-cloud-amd64")))
			return root
		}, "linux-image-6.1.0-57-cloud-amd64", "cloud kernel image"},
		{"no busybox", func(t *testing.T) string { return fakeHost(t, []string{"6.1.0-57-cloud-amd64"}, true, false) }, "busybox-static", "static busybox"},
		{"dynamic busybox", func(t *testing.T) string {
			root := fakeHost(t, []string{"6.1.0-57-cloud-amd64"}, true, false)
			elf := minimalStaticELF()
			// Add one PT_INTERP program header.
			elf[32] = 64 // phoff
			elf[56] = 1  // phnum
			ph := make([]byte, 56)
			ph[0] = 3 // PT_INTERP
			write(t, filepath.Join(root, "bin/busybox"), string(append(elf, ph...)))
			return root
		}, "busybox-static", "static busybox"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := FindHost(tt.root(t))
			require.Error(t, err)
			assert.True(t, errors.Is(err, ErrMissing))
			var me *MissingError
			require.ErrorAs(t, err, &me)
			assert.Equal(t, tt.pkg, me.Package)
			assert.Contains(t, err.Error(), tt.message)
			assert.Contains(t, err.Error(), "apt-get install "+tt.pkg)
		})
	}
}

func TestCompareKernelVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"6.1.0-57-cloud-amd64", "6.1.0-9-cloud-amd64", 1},
		{"6.1.0-9-cloud-amd64", "6.1.0-57-cloud-amd64", -1},
		{"6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64", 1},
		{"6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64", 0},
		{"6.1.0-cloud-amd64", "6.1.0-1-cloud-amd64", -1},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, CompareKernelVersions(tt.a, tt.b), "%s vs %s", tt.a, tt.b)
	}
}

func TestReadModuleDecompresses(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "kvm.ko")
	write(t, plain, "ELF-module")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, err := zw.Write([]byte("ELF-module"))
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	gzPath := filepath.Join(dir, "kvm2.ko.gz")
	write(t, gzPath, gz.String())

	for _, p := range []string{plain, gzPath} {
		data, err := ReadModule(context.Background(), ModuleFile{Name: "kvm", Path: p})
		require.NoError(t, err)
		assert.Equal(t, "ELF-module", string(data))
	}
	bad := filepath.Join(dir, "bad.ko.gz")
	write(t, bad, "not gzip")
	_, err = ReadModule(context.Background(), ModuleFile{Name: "bad", Path: bad})
	assert.ErrorContains(t, err, "bad.ko.gz")
}
