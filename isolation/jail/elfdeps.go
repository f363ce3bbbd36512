package jail

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// libDirs are searched, in order, for a dynamic executable's libraries
// (the default search path of glibc's loader on x86-64 Debian/Fedora).
var libDirs = [...]string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
	"/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// maxDeps bounds the dependency walk of one executable.
const maxDeps = 64

// ELFDeps returns the files a dynamically linked executable needs at exec
// time: its ELF interpreter and the shared libraries it loads, found
// recursively in RUNPATH/RPATH and the default library directories. It
// returns nothing for a static executable.
func ELFDeps(path string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	var walk func(p string, top bool) error
	walk = func(p string, top bool) error {
		f, err := elf.Open(p)
		if err != nil {
			return fmt.Errorf("jail: read ELF %s: %w", p, err)
		}
		defer f.Close()
		if top {
			for _, prog := range f.Progs {
				if prog.Type != elf.PT_INTERP {
					continue
				}
				b := make([]byte, min(prog.Filesz, 4096))
				if _, err := prog.ReadAt(b, 0); err != nil {
					return fmt.Errorf("jail: read interpreter of %s: %w", p, err)
				}
				interp := strings.TrimRight(string(b), "\x00")
				if !seen[interp] {
					seen[interp] = true
					out = append(out, interp)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			if errors.Is(err, elf.ErrNoSymbols) {
				return nil
			}
			return fmt.Errorf("jail: read libraries of %s: %w", p, err)
		}
		var dirs []string
		for _, tag := range []elf.DynTag{elf.DT_RUNPATH, elf.DT_RPATH} {
			vals, _ := f.DynString(tag)
			for _, v := range vals {
				for _, d := range strings.Split(v, ":") {
					d = strings.ReplaceAll(d, "$ORIGIN", filepath.Dir(p))
					if filepath.IsAbs(d) {
						dirs = append(dirs, d)
					}
				}
			}
		}
		dirs = append(dirs, libDirs[:]...)
		for _, lib := range libs {
			found := ""
			for _, d := range dirs {
				cand := filepath.Join(d, lib)
				if st, err := os.Stat(cand); err == nil && st.Mode().IsRegular() {
					found = cand
					break
				}
			}
			if found == "" {
				return fmt.Errorf("jail: %s needs %s, not found in %q", p, lib, dirs)
			}
			if seen[found] {
				continue
			}
			if len(out) >= maxDeps {
				return fmt.Errorf("jail: %s needs more than %d libraries", path, maxDeps)
			}
			seen[found] = true
			out = append(out, found)
			if err := walk(found, false); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(path, true); err != nil {
		return nil, err
	}
	return out, nil
}
