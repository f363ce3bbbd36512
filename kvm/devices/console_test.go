package devices

import (
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConsoleWatcherPanicSplitAcrossWrites(t *testing.T) {
	const panicLine = "[    1.234567] Kernel panic - not syncing: sysrq triggered crash"
	full := "[    1.000000] sysrq: Trigger a crash\r\n" + panicLine + "\r\n[    1.300000] ---[ end trace ]---\n"
	tests := []struct {
		name   string
		chunks func(string) []string
	}{
		{"one write", func(s string) []string { return []string{s} }},
		{"byte at a time", func(s string) []string { return strings.Split(s, "") }},
		{"split inside the pattern", func(s string) []string {
			i := strings.Index(s, "Kernel pa") + len("Kernel pa")
			return []string{s[:i], s[i:]}
		}},
		{"seven-byte chunks", func(s string) []string {
			var out []string
			for len(s) > 7 {
				out, s = append(out, s[:7]), s[7:]
			}
			return append(out, s)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var sink syncBuffer
			var got []ConsoleMatch
			w, err := NewConsoleWatcher(ConsoleConfig{Next: &sink, OnMatch: func(m ConsoleMatch) { got = append(got, m) }})
			require.NoError(t, err)
			for _, c := range tc.chunks(full) {
				n, err := w.Write([]byte(c))
				require.NoError(t, err)
				require.Equal(t, len(c), n)
			}
			require.Len(t, got, 1)
			assert.Equal(t, panicLine, got[0].Line, "CR stripped")
			assert.Equal(t, "Kernel panic", got[0].Pattern.String())
			assert.Equal(t, full, sink.String(), "bytes pass through unchanged")
			assert.Equal(t, got, w.Matches())
			assert.Len(t, w.Lines(), 3)
		})
	}
}

func TestConsoleWatcherRing(t *testing.T) {
	tests := []struct {
		name    string
		lines   int
		maxLen  int
		input   string
		want    []string
		matches int
	}{
		{"keeps last N", 3, 0, "a\nb\nc\nd\ne\n", []string{"c", "d", "e"}, 0},
		{"fewer than N", 5, 0, "a\nb\n", []string{"a", "b"}, 0},
		{"partial line last", 2, 0, "a\nb\nc", []string{"a", "b", "c"}, 0},
		{"empty lines kept", 3, 0, "\n\nx\n", []string{"", "", "x"}, 0},
		{"long line truncated", 2, 8, "0123456789abcdef\nshort\n", []string{"01234567", "short"}, 0},
		{"long partial capped", 2, 4, "abcdefgh", []string{"abcd"}, 0},
		{"pattern past the cap not seen", 2, 6, "xxxxxxKernel panic\n", []string{"xxxxxx"}, 0},
		{"pattern in head of long line", 2, 16, "Kernel panic " + strings.Repeat("z", 100) + "\n", []string{"Kernel panic zzz"}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, err := NewConsoleWatcher(ConsoleConfig{Lines: tc.lines, MaxLineLen: tc.maxLen})
			require.NoError(t, err)
			_, err = w.Write([]byte(tc.input))
			require.NoError(t, err)
			assert.Equal(t, tc.want, w.Lines())
			assert.Len(t, w.Matches(), tc.matches)
		})
	}
}

func TestConsoleWatcherPatternsAndEndLine(t *testing.T) {
	var got []string
	w, err := NewConsoleWatcher(ConsoleConfig{
		Patterns: []*regexp.Regexp{regexp.MustCompile(`^BUG: `), regexp.MustCompile(`Oops`)},
		OnMatch:  func(m ConsoleMatch) { got = append(got, m.Pattern.String()+"|"+m.Line) },
	})
	require.NoError(t, err)
	_, _ = w.Write([]byte("Kernel panic is not a pattern here\nBUG: kernel NULL pointer dereference\n  BUG: not at start\n"))
	_, _ = w.Write([]byte("Oops: 0002 [#1] SMP"))
	assert.Equal(t, []string{"^BUG: |BUG: kernel NULL pointer dereference"}, got, "partial line not matched yet")
	w.EndLine()
	assert.Equal(t, "Oops|Oops: 0002 [#1] SMP", got[1])
	w.EndLine() // nothing pending: no-op
	assert.Len(t, got, 2)
}

type errWriter struct{ n int }

func (e errWriter) Write(p []byte) (int, error) { return min(e.n, len(p)), errors.New("sink full") }

func TestConsoleWatcherNextError(t *testing.T) {
	w, err := NewConsoleWatcher(ConsoleConfig{Next: errWriter{2}})
	require.NoError(t, err)
	n, err := w.Write([]byte("Kernel panic\n"))
	assert.Equal(t, 2, n)
	assert.EqualError(t, err, "sink full")
	assert.Len(t, w.Matches(), 1, "still scanned")
}

func TestConsoleWatcherConfigErrors(t *testing.T) {
	for _, cfg := range []ConsoleConfig{{Lines: -1}, {MaxLineLen: -5}, {Patterns: []*regexp.Regexp{nil}}} {
		_, err := NewConsoleWatcher(cfg)
		var ce *ConfigError
		assert.ErrorAs(t, err, &ce)
	}
}

// FuzzConsoleWatcher feeds arbitrary output in arbitrary chunks: nothing may
// panic and the kept lines stay within bounds.
func FuzzConsoleWatcher(f *testing.F) {
	f.Add([]byte("Kernel panic - not syncing\n\r\n\x00\xff"), uint8(3))
	f.Add([]byte(strings.Repeat("x", 300)), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		const lines, maxLen = 4, 32
		w, err := NewConsoleWatcher(ConsoleConfig{Lines: lines, MaxLineLen: maxLen})
		require.NoError(t, err)
		step := int(chunk%16) + 1
		for len(data) > 0 {
			k := min(step, len(data))
			n, err := w.Write(data[:k])
			require.NoError(t, err)
			require.Equal(t, k, n)
			data = data[k:]
		}
		got := w.Lines()
		require.LessOrEqual(t, len(got), lines+1)
		for _, l := range got {
			require.LessOrEqual(t, len(l), maxLen)
			require.NotContains(t, l, "\n")
		}
		require.LessOrEqual(t, len(w.Matches()), maxMatchesKept)
		w.EndLine()
		require.LessOrEqual(t, len(w.Lines()), lines)
	})
}
