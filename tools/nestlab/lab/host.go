package lab

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrMissing is matched (errors.Is) by every *MissingError.
var ErrMissing = errors.New("nestlab: missing host component")

// MissingError says which host file the lab needs and which Debian package
// provides it.
type MissingError struct {
	What    string // human name, e.g. "cloud kernel"
	Path    string // where it was looked for
	Package string // Debian package to install
}

func (e *MissingError) Error() string {
	return fmt.Sprintf("nestlab: %s not found (%s): apt-get install %s", e.What, e.Path, e.Package)
}

// Is reports whether target is ErrMissing.
func (e *MissingError) Is(target error) bool { return target == ErrMissing }

// Module names the kernel modules the L1 guest loads, in load order.
var moduleOrder = []struct{ name, rel string }{
	{"irqbypass", "kernel/virt/lib/irqbypass.ko"},
	{"kvm", "kernel/arch/x86/kvm/kvm.ko"},
	{"kvm-amd", "kernel/arch/x86/kvm/kvm-amd.ko"},
}

// ModuleFile is one kernel module found on the host.
type ModuleFile struct {
	Name string // module name, e.g. "kvm-amd"
	Path string // host path, possibly compressed (.ko.gz/.ko.xz/.ko.zst)
}

// Host is what the lab takes from the host: the Debian cloud kernel, its
// KVM modules and a static busybox.
type Host struct {
	KernelVersion string       // e.g. "6.1.0-57-cloud-amd64"
	Kernel        string       // /boot/vmlinuz-<version>
	Modules       []ModuleFile // irqbypass, kvm, kvm-amd in load order
	Busybox       string       // static busybox binary
}

// FindHost locates the newest *-cloud-amd64 kernel with its KVM modules and a
// static busybox under root ("/" on a real host; tests pass a fake tree).
func FindHost(root string) (*Host, error) {
	modDir := filepath.Join(root, "lib/modules")
	entries, err := os.ReadDir(modDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("nestlab: reading %s: %w", modDir, err)
	}
	var versions []string
	for _, e := range entries {
		if e.IsDir() && strings.HasSuffix(e.Name(), "-cloud-amd64") {
			versions = append(versions, e.Name())
		}
	}
	// Fall back to /boot when only the image is there (modules missing is
	// then reported precisely below).
	if len(versions) == 0 {
		boots, _ := filepath.Glob(filepath.Join(root, "boot/vmlinuz-*-cloud-amd64"))
		for _, b := range boots {
			versions = append(versions, strings.TrimPrefix(filepath.Base(b), "vmlinuz-"))
		}
	}
	if len(versions) == 0 {
		return nil, &MissingError{What: "cloud kernel", Path: filepath.Join(modDir, "*-cloud-amd64"), Package: "linux-image-cloud-amd64"}
	}
	best := versions[0]
	for _, v := range versions[1:] {
		if CompareKernelVersions(v, best) > 0 {
			best = v
		}
	}
	h := &Host{KernelVersion: best, Kernel: filepath.Join(root, "boot", "vmlinuz-"+best)}
	if _, err := os.Stat(h.Kernel); err != nil {
		return nil, &MissingError{What: "cloud kernel image", Path: h.Kernel, Package: "linux-image-" + best}
	}
	for _, m := range moduleOrder {
		base := filepath.Join(modDir, best, m.rel)
		found := ""
		for _, ext := range []string{"", ".xz", ".zst", ".gz"} {
			if _, err := os.Stat(base + ext); err == nil {
				found = base + ext
				break
			}
		}
		if found == "" {
			return nil, &MissingError{What: "kernel module " + m.name, Path: base, Package: "linux-image-" + best}
		}
		h.Modules = append(h.Modules, ModuleFile{Name: m.name, Path: found})
	}
	for _, p := range []string{"bin/busybox", "usr/bin/busybox"} {
		full := filepath.Join(root, p)
		if isStaticELF(full) {
			h.Busybox = full
			break
		}
	}
	if h.Busybox == "" {
		return nil, &MissingError{What: "static busybox", Path: filepath.Join(root, "bin/busybox"), Package: "busybox-static"}
	}
	return h, nil
}

// isStaticELF reports whether path is an ELF executable without a program
// interpreter (statically linked).
func isStaticELF(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// CompareKernelVersions orders Debian kernel release strings such as
// "6.1.0-57-cloud-amd64" by their numeric fields: it returns -1, 0 or +1.
func CompareKernelVersions(a, b string) int {
	na, nb := versionNumbers(a), versionNumbers(b)
	for i := 0; i < len(na) && i < len(nb); i++ {
		if na[i] != nb[i] {
			if na[i] < nb[i] {
				return -1
			}
			return 1
		}
	}
	switch {
	case len(na) < len(nb):
		return -1
	case len(na) > len(nb):
		return 1
	}
	return strings.Compare(a, b)
}

func versionNumbers(v string) []int {
	var out []int
	for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == '.' || r == '-' }) {
		n, err := strconv.Atoi(f)
		if err != nil {
			break // the flavour ("cloud") ends the numeric part
		}
		out = append(out, n)
	}
	return out
}

// ReadModule returns the module's uncompressed content. .gz is handled in
// Go; .xz and .zst need the xz or zstd command.
func ReadModule(ctx context.Context, m ModuleFile) ([]byte, error) {
	switch {
	case strings.HasSuffix(m.Path, ".gz"):
		f, err := os.Open(m.Path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("nestlab: %s: %w", m.Path, err)
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(m.Path, ".xz"), strings.HasSuffix(m.Path, ".zst"):
		tool, pkg := "xz", "xz-utils"
		if strings.HasSuffix(m.Path, ".zst") {
			tool, pkg = "zstd", "zstd"
		}
		if _, err := exec.LookPath(tool); err != nil {
			return nil, &MissingError{What: tool + " (to decompress " + filepath.Base(m.Path) + ")", Path: tool, Package: pkg}
		}
		var out, errb bytes.Buffer
		cmd := exec.CommandContext(ctx, tool, "-dc", m.Path)
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("nestlab: %s -dc %s: %v: %s", tool, m.Path, err, strings.TrimSpace(errb.String()))
		}
		return out.Bytes(), nil
	}
	return os.ReadFile(m.Path)
}

// SystemMap returns the path of the kernel's System.map (used to name the
// L1 kernel function a stalled CPU is in; it may not exist).
func (h *Host) SystemMap() string {
	return filepath.Join(filepath.Dir(h.Kernel), "System.map-"+h.KernelVersion)
}
