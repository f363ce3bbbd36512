package devices

import (
	"bytes"
	"io"
	"regexp"
	"strconv"
	"sync"
)

// Defaults for ConsoleWatcher.
const (
	DefaultConsoleLines   = 100
	DefaultConsoleLineLen = 1024
)

// DefaultConsolePatterns returns the patterns a ConsoleWatcher uses when
// none are configured: a Linux kernel panic.
func DefaultConsolePatterns() []*regexp.Regexp {
	return []*regexp.Regexp{regexp.MustCompile(`Kernel panic`)}
}

// ConsoleConfig configures a ConsoleWatcher.
type ConsoleConfig struct {
	// Next receives every byte written, unchanged; nil means nowhere.
	Next io.Writer
	// Lines is how many recent lines to keep; 0 means DefaultConsoleLines.
	Lines int
	// MaxLineLen caps a kept line in bytes; the rest of a longer line is
	// dropped (the head of a line is what identifies it). 0 means
	// DefaultConsoleLineLen.
	MaxLineLen int
	// Patterns are matched against each complete line; nil means
	// DefaultConsolePatterns().
	Patterns []*regexp.Regexp
	// OnMatch is called once per matching line (for the first pattern that
	// matches), from the writing goroutine, without locks held.
	OnMatch func(ConsoleMatch)
}

// ConsoleMatch is a console line that matched a pattern.
type ConsoleMatch struct {
	Pattern *regexp.Regexp
	Line    string
}

// ConsoleWatcher is an io.Writer that sits between a UART and the real
// sink: it passes bytes through, keeps the last N lines in a ring (bounded
// memory: N lines of at most MaxLineLen bytes plus one partial line), and
// reports lines matching a pattern, e.g. a kernel panic. Lines end at '\n'
// (a trailing '\r' is dropped); a line split across any number of writes is
// reassembled. It is safe for concurrent use.
type ConsoleWatcher struct {
	next     io.Writer
	max      int
	patterns []*regexp.Regexp
	onMatch  func(ConsoleMatch)

	mu        sync.Mutex
	lines     []string // ring
	start     int      // index of the oldest line
	count     int
	partial   []byte
	truncated bool // partial hit max; dropping until '\n'
	matches   []ConsoleMatch
}

var _ io.Writer = (*ConsoleWatcher)(nil)

// maxMatchesKept bounds the matches a ConsoleWatcher remembers.
const maxMatchesKept = 16

// NewConsoleWatcher returns a watcher configured by cfg.
func NewConsoleWatcher(cfg ConsoleConfig) (*ConsoleWatcher, error) {
	if cfg.Lines < 0 {
		return nil, &ConfigError{Device: "ConsoleWatcher", Field: "Lines", Reason: "is negative"}
	}
	if cfg.MaxLineLen < 0 {
		return nil, &ConfigError{Device: "ConsoleWatcher", Field: "MaxLineLen", Reason: "is negative"}
	}
	w := &ConsoleWatcher{next: cfg.Next, max: cfg.MaxLineLen, patterns: cfg.Patterns, onMatch: cfg.OnMatch}
	n := cfg.Lines
	if n == 0 {
		n = DefaultConsoleLines
	}
	if w.max == 0 {
		w.max = DefaultConsoleLineLen
	}
	if w.patterns == nil {
		w.patterns = DefaultConsolePatterns()
	}
	for i, p := range w.patterns {
		if p == nil {
			return nil, &ConfigError{Device: "ConsoleWatcher", Field: "Patterns", Reason: "contains nil at index " + strconv.Itoa(i)}
		}
	}
	w.lines = make([]string, n)
	return w, nil
}

// Write passes p to Next and scans it. It returns Next's result (or
// len(p), nil without Next); p is scanned in full either way, since the
// guest did print it.
func (w *ConsoleWatcher) Write(p []byte) (int, error) {
	n, err := len(p), error(nil)
	if w.next != nil {
		n, err = w.next.Write(p)
	}
	w.mu.Lock()
	var found []ConsoleMatch
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		seg := p
		if i >= 0 {
			seg = p[:i]
		}
		if !w.truncated {
			room := w.max - len(w.partial)
			if len(seg) > room {
				seg = seg[:room]
				w.truncated = true
			}
			w.partial = append(w.partial, seg...)
		}
		if i < 0 {
			break
		}
		if m, ok := w.endLine(); ok {
			found = append(found, m)
		}
		p = p[i+1:]
	}
	w.mu.Unlock()
	w.report(found)
	return n, err
}

// EndLine treats a pending partial line (output that did not end in a
// newline, e.g. when the guest stopped) as complete: it is kept and matched.
func (w *ConsoleWatcher) EndLine() {
	w.mu.Lock()
	var found []ConsoleMatch
	if len(w.partial) > 0 || w.truncated {
		if m, ok := w.endLine(); ok {
			found = append(found, m)
		}
	}
	w.mu.Unlock()
	w.report(found)
}

func (w *ConsoleWatcher) report(found []ConsoleMatch) {
	if w.onMatch == nil {
		return
	}
	for _, m := range found {
		w.onMatch(m)
	}
}

// endLine moves the partial line into the ring and matches it.
func (w *ConsoleWatcher) endLine() (ConsoleMatch, bool) {
	line := string(bytes.TrimSuffix(w.partial, []byte{'\r'}))
	w.partial = w.partial[:0]
	w.truncated = false
	if len(w.lines) > 0 {
		if w.count < len(w.lines) {
			w.lines[(w.start+w.count)%len(w.lines)] = line
			w.count++
		} else {
			w.lines[w.start] = line
			w.start = (w.start + 1) % len(w.lines)
		}
	}
	for _, p := range w.patterns {
		if p.MatchString(line) {
			m := ConsoleMatch{Pattern: p, Line: line}
			if len(w.matches) < maxMatchesKept {
				w.matches = append(w.matches, m)
			}
			return m, true
		}
	}
	return ConsoleMatch{}, false
}

// Lines returns the kept lines, oldest first, followed by the pending
// partial line if there is one.
func (w *ConsoleWatcher) Lines() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]string, 0, w.count+1)
	for i := 0; i < w.count; i++ {
		out = append(out, w.lines[(w.start+i)%len(w.lines)])
	}
	if len(w.partial) > 0 {
		out = append(out, string(w.partial))
	}
	return out
}

// Matches returns the first matches seen (at most 16), oldest first.
func (w *ConsoleWatcher) Matches() []ConsoleMatch {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]ConsoleMatch(nil), w.matches...)
}
