package lab

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Guest locations used by the gotest payload.
const (
	GuestBinDir = "/lab/bin" // test binaries and other executables
	GuestPkgDir = "/lab/pkg" // one copy of each package directory
)

// TestPackage is one package whose test binary was built.
type TestPackage struct {
	ImportPath string // e.g. github.com/kvmkit/kvmkit/kvm
	Dir        string // host directory of the package
	Binary     string // host path of the compiled test binary
}

// GoTool runs the go command for building test binaries.
type GoTool struct {
	Go     string    // go binary; default "go"
	Dir    string    // working directory (module root or below); default cwd
	Stderr io.Writer // build diagnostics
}

func (g GoTool) cmd(ctx context.Context, args ...string) *exec.Cmd {
	bin := g.Go
	if bin == "" {
		bin = "go"
	}
	c := exec.CommandContext(ctx, bin, args...)
	c.Dir = g.Dir
	// The L1 initramfs has no C library: build static Go binaries.
	c.Env = append(os.Environ(), "CGO_ENABLED=0")
	c.Stderr = g.Stderr
	return c
}

// ListedPackage is one line of `go list` output used by BuildTests.
type ListedPackage struct {
	ImportPath string
	Dir        string
	TestFiles  int // TestGoFiles + XTestGoFiles
}

// ParseGoList parses lines of "importpath\tdir\tntest\tnxtest".
func ParseGoList(out string) ([]ListedPackage, error) {
	var pkgs []ListedPackage
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) != 4 {
			return nil, fmt.Errorf("nestlab: unexpected go list line %q", line)
		}
		a, err1 := strconv.Atoi(f[2])
		b, err2 := strconv.Atoi(f[3])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("nestlab: unexpected go list line %q", line)
		}
		pkgs = append(pkgs, ListedPackage{ImportPath: f[0], Dir: f[1], TestFiles: a + b})
	}
	return pkgs, nil
}

// ListPackages expands package patterns with `go list`.
func (g GoTool) ListPackages(ctx context.Context, patterns []string) ([]ListedPackage, error) {
	args := append([]string{"list", "-f", "{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}"}, patterns...)
	out, err := g.cmd(ctx, args...).Output()
	if err != nil {
		return nil, fmt.Errorf("nestlab: go list %s: %w", strings.Join(patterns, " "), err)
	}
	return ParseGoList(string(out))
}

// BuildTest compiles one package's test binary to out with `go test -c`.
func (g GoTool) BuildTest(ctx context.Context, importPath, out string) error {
	if err := g.cmd(ctx, "test", "-c", "-o", out, importPath).Run(); err != nil {
		return fmt.Errorf("nestlab: go test -c %s: %w", importPath, err)
	}
	return nil
}

// Build compiles a main package to out.
func (g GoTool) Build(ctx context.Context, pkg, out string) error {
	if err := g.cmd(ctx, "build", "-o", out, pkg).Run(); err != nil {
		return fmt.Errorf("nestlab: go build %s: %w", pkg, err)
	}
	return nil
}

// GoTestPayload returns the payload script that runs each package's test
// binary (at GuestBinDir/<i>.test, working directory GuestPkgDir/<i>)
// with -test.v and args, bracketed by PKG-START/PKG-END markers. It exits 1
// if any package failed.
func GoTestPayload(n int, args []string) string {
	runs := make([]PackageRun, n)
	for i := range runs {
		runs[i] = PackageRun{Index: i, Args: args}
	}
	return GoTestRunsPayload(runs)
}

// PackageRun is one package's test binary run: its index (binary
// GuestBinDir/<Index>.test) and its arguments after -test.v.
type PackageRun struct {
	Index int
	Args  []string
}

// GoTestRunsPayload is GoTestPayload for chosen packages, each with its
// own arguments (a resumed run skips what already ran).
func GoTestRunsPayload(runs []PackageRun) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\nfail=0\n")
	for _, r := range runs {
		q := make([]string, len(r.Args))
		for i, a := range r.Args {
			q[i] = ShellQuote(a)
		}
		i := r.Index
		fmt.Fprintf(&b, "echo %sPKG-START=%d\n", markerPrefix, i)
		fmt.Fprintf(&b, "(cd %s/%d && exec %s/%d.test -test.v %s)\n", GuestPkgDir, i, GuestBinDir, i, strings.Join(q, " "))
		fmt.Fprintf(&b, "rc=$?\necho %sPKG-END=%d:$rc\n[ $rc -eq 0 ] || fail=1\n", markerPrefix, i)
	}
	b.WriteString("exit $fail\n")
	return b.String()
}

// AddPackageDir packs the regular files of a package directory (top level
// only) and its testdata/ tree at guest.
func AddPackageDir(im *Image, guest, dir string) error {
	if err := im.AddDir(guest); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		switch {
		case e.Name() == "testdata" && e.IsDir():
			if err := im.AddHost(path.Join(guest, "testdata"), p); err != nil {
				return err
			}
		case e.Type().IsRegular():
			if err := im.AddHost(path.Join(guest, e.Name()), p); err != nil {
				return err
			}
		}
	}
	return nil
}

// AddExecutable packs a host executable at guest; if it is dynamically
// linked, its interpreter and libraries (as resolved by ldd) are packed at
// their host paths so it can run in L1.
func AddExecutable(ctx context.Context, im *Image, guest, host string) error {
	if err := im.AddHost(guest, host); err != nil {
		return err
	}
	f, err := elf.Open(host)
	if err != nil {
		return nil // a script or other non-ELF file: nothing more to do
	}
	dynamic := false
	for _, p := range f.Progs {
		dynamic = dynamic || p.Type == elf.PT_INTERP
	}
	f.Close()
	if !dynamic {
		return nil
	}
	out, err := exec.CommandContext(ctx, "ldd", host).Output()
	if err != nil {
		return fmt.Errorf("nestlab: %s is dynamically linked and ldd failed: %w", host, err)
	}
	for _, lib := range ParseLDD(out) {
		real, err := filepath.EvalSymlinks(lib)
		if err != nil {
			return fmt.Errorf("nestlab: library of %s: %w", host, err)
		}
		if err := im.AddHost(lib, real); err != nil {
			return err
		}
	}
	return nil
}

// ParseLDD returns the absolute library paths in ldd output.
func ParseLDD(out []byte) []string {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		for _, f := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
				break
			}
		}
	}
	return libs
}
