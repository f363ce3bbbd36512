// Package selinux gives each VM an sVirt-style SELinux identity: a unique
// MCS category pair (for example system_u:system_r:svirt_t:s0:c12,c345)
// for the VMM process at exec and for its image files, released when the
// VM ends. Where SELinux is disabled it says so and carries on only when
// the caller allows it.
package selinux

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	gosel "github.com/opencontainers/selinux/go-selinux"
)

// MCS is a category pair c<Low>,c<High> with Low < High.
type MCS struct {
	Low, High int
}

// String returns "c<Low>,c<High>".
func (m MCS) String() string { return fmt.Sprintf("c%d,c%d", m.Low, m.High) }

// ErrBadMCS is wrapped when a category string cannot be parsed.
var ErrBadMCS = errors.New("selinux: bad MCS category pair")

// ParseMCS parses "c12,c345" (the order of the two may be either way).
func ParseMCS(s string) (MCS, error) {
	a, b, ok := strings.Cut(s, ",")
	if !ok {
		return MCS{}, fmt.Errorf("%w %q", ErrBadMCS, s)
	}
	parse := func(x string) (int, error) {
		if !strings.HasPrefix(x, "c") {
			return 0, fmt.Errorf("%w %q", ErrBadMCS, s)
		}
		n, err := strconv.Atoi(x[1:])
		if err != nil || n < 0 || n > 1023 {
			return 0, fmt.Errorf("%w %q", ErrBadMCS, s)
		}
		return n, nil
	}
	lo, err := parse(a)
	if err != nil {
		return MCS{}, err
	}
	hi, err := parse(b)
	if err != nil {
		return MCS{}, err
	}
	if lo == hi {
		return MCS{}, fmt.Errorf("%w %q: categories must differ", ErrBadMCS, s)
	}
	if lo > hi {
		lo, hi = hi, lo
	}
	return MCS{Low: lo, High: hi}, nil
}

// Errors from the allocator.
var (
	ErrExhausted  = errors.New("selinux: all MCS category pairs are in use")
	ErrInUse      = errors.New("selinux: MCS category pair already in use")
	ErrOutOfRange = errors.New("selinux: MCS category outside the allocator's range")
)

// Allocator hands out unique category pairs from categories [Min, Max].
// It is safe for concurrent use.
type Allocator struct {
	min, max int
	mu       sync.Mutex
	used     map[MCS]bool
}

// NewAllocator returns an allocator over categories min..max (libvirt uses
// 0..1023). It panics on an empty range, a programming error.
func NewAllocator(min, max int) *Allocator {
	if min < 0 || max > 1023 || max-min < 1 {
		panic(fmt.Sprintf("selinux: bad category range %d..%d", min, max))
	}
	return &Allocator{min: min, max: max, used: map[MCS]bool{}}
}

// Capacity is the number of distinct pairs the allocator can hand out.
func (a *Allocator) Capacity() int {
	k := a.max - a.min + 1
	return k * (k - 1) / 2
}

// InUse returns how many pairs are allocated or reserved.
func (a *Allocator) InUse() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.used)
}

// Allocate returns a random unused pair.
func (a *Allocator) Allocate() (MCS, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.used) >= a.Capacity() {
		return MCS{}, fmt.Errorf("%w (%d pairs in c%d..c%d)", ErrExhausted, a.Capacity(), a.min, a.max)
	}
	// Random probing is fast while the space is sparse; fall back to a
	// scan so that a nearly full space still finds the last free pair.
	for range 64 {
		x, y := a.min+rand.IntN(a.max-a.min+1), a.min+rand.IntN(a.max-a.min+1)
		if x == y {
			continue
		}
		m := MCS{Low: min(x, y), High: max(x, y)}
		if !a.used[m] {
			a.used[m] = true
			return m, nil
		}
	}
	for lo := a.min; lo < a.max; lo++ {
		for hi := lo + 1; hi <= a.max; hi++ {
			m := MCS{Low: lo, High: hi}
			if !a.used[m] {
				a.used[m] = true
				return m, nil
			}
		}
	}
	return MCS{}, ErrExhausted
}

// Reserve marks m as used (for pairs held by VMs this allocator did not
// start, see ReserveRunning).
func (a *Allocator) Reserve(m MCS) error {
	if m.Low < a.min || m.High > a.max || m.Low >= m.High {
		return fmt.Errorf("%w: %s not in c%d..c%d", ErrOutOfRange, m, a.min, a.max)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.used[m] {
		return fmt.Errorf("%w: %s", ErrInUse, m)
	}
	a.used[m] = true
	return nil
}

// Release returns m to the pool; releasing a free pair is a no-op.
func (a *Allocator) Release(m MCS) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.used, m)
}

// ReserveRunning reserves the pairs of processes already running with an
// svirt label, found under procDir (normally /proc). It returns how many
// it reserved.
func (a *Allocator) ReserveRunning(procDir string) (int, error) {
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return 0, fmt.Errorf("selinux: %w", err)
	}
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procDir, e.Name(), "attr", "current"))
		if err != nil {
			continue
		}
		l, err := ParseLabel(strings.TrimRight(string(b), "\x00\n"))
		if err != nil || l.Type != ProcessType {
			continue
		}
		if a.Reserve(l.MCS) == nil {
			n++
		}
	}
	return n, nil
}

// sVirt's types.
const (
	User        = "system_u"
	ProcessRole = "system_r"
	ObjectRole  = "object_r"
	ProcessType = "svirt_t"
	ImageType   = "svirt_image_t"
	Sensitivity = "s0"
)

// Label is an SELinux context user:role:type:level with an MCS pair.
type Label struct {
	User, Role, Type, Sensitivity string
	MCS                           MCS
}

// String returns the context string, e.g.
// system_u:system_r:svirt_t:s0:c12,c345.
func (l Label) String() string {
	return fmt.Sprintf("%s:%s:%s:%s:%s", l.User, l.Role, l.Type, l.Sensitivity, l.MCS)
}

// ProcessLabel is the label of the VMM process of the VM holding m.
func ProcessLabel(m MCS) Label {
	return Label{User: User, Role: ProcessRole, Type: ProcessType, Sensitivity: Sensitivity, MCS: m}
}

// ImageLabel is the label of the image files of the VM holding m.
func ImageLabel(m MCS) Label {
	return Label{User: User, Role: ObjectRole, Type: ImageType, Sensitivity: Sensitivity, MCS: m}
}

// ErrBadLabel is wrapped when a context string is not an MCS label.
var ErrBadLabel = errors.New("selinux: bad label")

// ParseLabel parses "user:role:type:s0:cA,cB".
func ParseLabel(s string) (Label, error) {
	parts := strings.SplitN(s, ":", 5)
	if len(parts) != 5 {
		return Label{}, fmt.Errorf("%w %q: want user:role:type:level:categories", ErrBadLabel, s)
	}
	for _, p := range parts[:4] {
		if p == "" {
			return Label{}, fmt.Errorf("%w %q: empty field", ErrBadLabel, s)
		}
	}
	m, err := ParseMCS(parts[4])
	if err != nil {
		return Label{}, fmt.Errorf("%w %q: %v", ErrBadLabel, s, err)
	}
	return Label{User: parts[0], Role: parts[1], Type: parts[2], Sensitivity: parts[3], MCS: m}, nil
}

// Mode is the --selinux policy.
type Mode int

const (
	// ModeOff does no labelling.
	ModeOff Mode = iota
	// ModeAuto labels when SELinux is enabled and otherwise logs that it
	// is not and carries on.
	ModeAuto
	// ModeRequire fails when SELinux is not enabled.
	ModeRequire
)

// String returns the flag spelling.
func (m Mode) String() string {
	switch m {
	case ModeOff:
		return "off"
	case ModeAuto:
		return "auto"
	case ModeRequire:
		return "require"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ErrBadMode is wrapped for an unknown mode name.
var ErrBadMode = errors.New("selinux: unknown mode")

// ParseMode parses "auto", "off" or "require".
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "off", "":
		return ModeOff, nil
	case "auto":
		return ModeAuto, nil
	case "require", "on":
		return ModeRequire, nil
	}
	return ModeOff, fmt.Errorf("%w %q (want auto, off or require)", ErrBadMode, s)
}

// ErrDisabled is returned by Setup in ModeRequire when SELinux is not
// enabled on the host.
var ErrDisabled = errors.New("selinux: not enabled on this host (no selinuxfs mounted)")

// Host is the SELinux facility of the host; tests replace it.
type Host interface {
	Enabled() bool
	FileLabel(path string) (string, error)
	SetFileLabel(path, label string) error
}

// RealHost uses github.com/opencontainers/selinux.
type RealHost struct{}

// Enabled reports whether SELinux is enabled (selinuxfs mounted, policy
// loaded).
func (RealHost) Enabled() bool { return gosel.GetEnabled() }

// FileLabel returns path's label.
func (RealHost) FileLabel(path string) (string, error) { return gosel.FileLabel(path) }

// SetFileLabel sets path's label.
func (RealHost) SetFileLabel(path, label string) error { return gosel.SetFileLabel(path, label) }

// Session is the SELinux identity of one running VM.
type Session struct {
	host   Host
	alloc  *Allocator
	mcs    MCS
	active bool
	orig   map[string]string // file -> label before Setup
}

// Setup allocates a pair from alloc and labels files with the image label.
// In ModeOff, and in ModeAuto on a host without SELinux (logged at warn
// level), it returns an inactive session whose ExecLabel is "". In
// ModeRequire without SELinux it fails with ErrDisabled.
func Setup(mode Mode, host Host, alloc *Allocator, files []string, log *slog.Logger) (*Session, error) {
	s := &Session{host: host, alloc: alloc, orig: map[string]string{}}
	if mode == ModeOff {
		return s, nil
	}
	if !host.Enabled() {
		if mode == ModeRequire {
			return nil, ErrDisabled
		}
		if log != nil {
			log.Warn("SELinux is disabled on this host: the VM runs without sVirt labels", "selinux", mode.String())
		}
		return s, nil
	}
	m, err := alloc.Allocate()
	if err != nil {
		return nil, err
	}
	s.mcs, s.active = m, true
	img := ImageLabel(m).String()
	for _, f := range files {
		old, err := host.FileLabel(f)
		if err != nil {
			_ = s.Close()
			return nil, fmt.Errorf("selinux: read label of %s: %w", f, err)
		}
		if err := host.SetFileLabel(f, img); err != nil {
			_ = s.Close()
			return nil, fmt.Errorf("selinux: label %s as %s: %w", f, img, err)
		}
		s.orig[f] = old
	}
	if log != nil {
		log.Info("sVirt labels", "process", ProcessLabel(m).String(), "image", img, "files", len(files))
	}
	return s, nil
}

// Active reports whether the session labels anything.
func (s *Session) Active() bool { return s.active }

// MCS returns the session's pair (zero when inactive).
func (s *Session) MCS() MCS { return s.mcs }

// ExecLabel is the label to give the VMM at exec ("" when inactive).
func (s *Session) ExecLabel() string {
	if !s.active {
		return ""
	}
	return ProcessLabel(s.mcs).String()
}

// Close restores the files' labels and releases the pair.
func (s *Session) Close() error {
	if !s.active {
		return nil
	}
	var errs []error
	for f, old := range s.orig {
		if old == "" {
			continue
		}
		if err := s.host.SetFileLabel(f, old); err != nil {
			errs = append(errs, fmt.Errorf("selinux: restore label of %s: %w", f, err))
		}
	}
	s.alloc.Release(s.mcs)
	s.active = false
	return errors.Join(errs...)
}
