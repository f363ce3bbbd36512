package guests

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAllImagesPresentAndFit(t *testing.T) {
	all := All()
	require.Len(t, all, 14)
	for i, g := range all {
		if i > 0 {
			assert.Less(t, all[i-1].Name, g.Name, "All must be sorted and unique")
		}
		t.Run(g.Name, func(t *testing.T) {
			img, mode, err := Get(g.Name)
			require.NoError(t, err)
			assert.Equal(t, g.Mode, mode)
			assert.NotEmpty(t, g.Description)
			require.NotEmpty(t, img)
			assert.LessOrEqual(t, len(img), mode.MaxSize())
			end := mode.LoadAddr() + uint64(len(img))
			if mode == ModeReal {
				assert.Less(t, end, uint64(LongStackTop))
				assert.True(t, strings.HasSuffix(g.Name, "16"), "real-mode guests are named *16")
			} else {
				assert.LessOrEqual(t, end, uint64(LongLoadAddr+1<<20))
				assert.False(t, strings.HasSuffix(g.Name, "16"), "long-mode guests are not named *16")
			}
		})
	}
}

// TestCatalogMatchesFiles checks that every source and every binary has a
// catalog entry and the other way round.
func TestCatalogMatchesFiles(t *testing.T) {
	names := map[string]bool{}
	for _, g := range All() {
		names[g.Name] = true
	}
	srcs, err := filepath.Glob("asm/*.asm")
	require.NoError(t, err)
	bins, err := filepath.Glob("*.bin")
	require.NoError(t, err)
	embedded, err := images.ReadDir(".")
	require.NoError(t, err)
	for _, set := range [][]string{srcs, bins} {
		got := map[string]bool{}
		for _, f := range set {
			got[strings.TrimSuffix(filepath.Base(f), filepath.Ext(f))] = true
		}
		assert.Equal(t, names, got)
	}
	assert.Len(t, embedded, len(names))
}

func TestGetUnknown(t *testing.T) {
	for _, name := range []string{"", "nope", "hello64.bin", "../guests"} {
		img, _, err := Get(name)
		assert.Nil(t, img)
		require.Error(t, err)
		assert.True(t, errors.Is(err, ErrUnknownGuest), "%v", err)
		assert.Contains(t, err.Error(), "unknown guest")
	}
}

func TestGetReturnsCopy(t *testing.T) {
	a, _, err := Get(Hello64)
	require.NoError(t, err)
	orig := bytes.Clone(a)
	for i := range a {
		a[i] = 0xCC
	}
	b, _, err := Get(Hello64)
	require.NoError(t, err)
	assert.Equal(t, orig, b)
}

func TestMode(t *testing.T) {
	tests := []struct {
		mode Mode
		str  string
		addr uint64
	}{
		{ModeLong, "long", 0x100000},
		{ModeReal, "real", 0x7C00},
		{Mode(7), "Mode(7)", 0x100000},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.str, tt.mode.String())
		assert.Equal(t, tt.addr, tt.mode.LoadAddr())
	}
}

func TestStackTop(t *testing.T) {
	assert.Equal(t, uint64(0x80000), StackTop(0))
	assert.Equal(t, uint64(0x7C000), StackTop(1))
	assert.Equal(t, uint64(0x80000-7*0x4000), StackTop(7))
}

type recordingWriterAt struct {
	off  int64
	data []byte
	err  error
}

func (w *recordingWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.off, w.data = off, bytes.Clone(p)
	return len(p), nil
}

func TestParams(t *testing.T) {
	tests := []struct {
		p    Params
		want []byte
	}{
		{Params{}, make([]byte, 24)},
		{Params{Iterations: 1}, append([]byte{1}, make([]byte, 23)...)},
		{
			Params{Iterations: 0x0102030405060708, DirtySize: 0x1000, DirtyPasses: 3},
			[]byte{8, 7, 6, 5, 4, 3, 2, 1, 0, 0x10, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0},
		},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, tt.p.Bytes())
		w := &recordingWriterAt{}
		require.NoError(t, tt.p.WriteTo(w))
		assert.Equal(t, int64(ParamBlockAddr), w.off)
		assert.Equal(t, tt.want, w.data)
	}
	boom := errors.New("boom")
	err := Params{}.WriteTo(&recordingWriterAt{err: boom})
	require.ErrorIs(t, err, boom)
	assert.Contains(t, err.Error(), "0x6000")
}

func TestComputeSequence(t *testing.T) {
	assert.Nil(t, ComputeSequence(0))
	assert.Nil(t, ComputeSequence(-1))
	long := ComputeSequence(1000)
	require.Len(t, long, 1000)
	assert.Equal(t, long[:10], ComputeSequence(10), "prefix must not depend on n")
	// A model stepped by hand agrees with the slice helper.
	m := NewComputeModel()
	for i, v := range long {
		require.Equal(t, v, m.Next(), "value %d", i)
	}
	// The sequence must actually vary (a broken model that returns a
	// constant or repeats quickly would make restore tests vacuous).
	seen := map[uint32]bool{}
	for _, v := range long {
		seen[v] = true
	}
	assert.Greater(t, len(seen), 990)
}

// TestComputeModelUsesCarry checks that the carry out of the LCG add feeds
// the next iteration, as the guest's adc does: dropping it must change the
// sequence within a few steps.
func TestComputeModelUsesCarry(t *testing.T) {
	a, b := NewComputeModel(), NewComputeModel()
	differ := false
	for i := 0; i < 64 && !differ; i++ {
		va := a.Next()
		b.carry = 0
		vb := b.Next()
		differ = va != vb
	}
	assert.True(t, differ, "carry never mattered")
}

func haveTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

// TestBuildReproducible rebuilds every guest with build.sh into a temporary
// directory and checks the result is byte-identical to the embedded images.
func TestBuildReproducible(t *testing.T) {
	haveTools(t, "sh", "as", "ld", "objcopy")
	dir := t.TempDir()
	out, err := exec.Command("sh", "build.sh", dir).CombinedOutput()
	require.NoError(t, err, "build.sh: %s", out)
	for _, g := range All() {
		built, err := os.ReadFile(filepath.Join(dir, g.Name+".bin"))
		require.NoError(t, err)
		img, _, err := Get(g.Name)
		require.NoError(t, err)
		assert.Equal(t, img, built, "%s.bin is stale: run go generate ./kvm/guests", g.Name)
	}
}

// TestDisassembles checks that objdump decodes every image without an
// invalid instruction (a 64-bit guest assembled as 16-bit code, or data in
// the entry path, would show up as "(bad)").
func TestDisassembles(t *testing.T) {
	haveTools(t, "objdump")
	for _, g := range All() {
		t.Run(g.Name, func(t *testing.T) {
			img, mode, err := Get(g.Name)
			require.NoError(t, err)
			f := filepath.Join(t.TempDir(), g.Name+".bin")
			require.NoError(t, os.WriteFile(f, img, 0o644))
			arch := "i386:x86-64"
			if mode == ModeReal {
				arch = "i8086"
			}
			out, err := exec.Command("objdump", "-D", "-b", "binary", "-m", arch, f).CombinedOutput()
			require.NoError(t, err, "%s", out)
			// The string constants after the code decode as
			// instructions too; none of today's decodes as "(bad)".
			text := string(out)
			if i := strings.Index(text, "(bad)"); i >= 0 {
				assert.Failf(t, "invalid instruction", "%s", text[max(0, i-200):i+5])
			}
			assert.Contains(t, text, "out ", "every guest does port I/O")
		})
	}
}
