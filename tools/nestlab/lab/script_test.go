package lab

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// shSyntax checks script with `sh -n` (POSIX sh, like busybox ash).
func shSyntax(t *testing.T, script string) {
	t.Helper()
	cmd := exec.Command("sh", "-n")
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "sh -n: %s\n%s", out, script)
}

func TestInitScript(t *testing.T) {
	s := InitScript(InitConfig{
		Modules: []InitModule{{Path: "/lab/modules/irqbypass.ko"}, {Path: "/lab/modules/kvm.ko"}, {Path: "/lab/modules/kvm-amd.ko", Params: "nested=0"}},
		Env:     []string{"Z=last", "A=it's quoted", "1BAD=x", "KVMKIT_NESTLAB=1"},
		Workdir: "/lab/work dir",
		Payload: GuestPayload,
	})
	shSyntax(t, s)
	lines := strings.Split(s, "\n")
	idx := func(sub string, from int) int {
		for i := from; i < len(lines); i++ {
			if strings.Contains(lines[i], sub) {
				return i
			}
		}
		t.Fatalf("init script lacks %q after line %d:\n%s", sub, from, s)
		return -1
	}
	// Each piece must appear, in this order: mounts, BOOT marker, modules in order, kvm check, lo, env, START, payload, EXIT, poweroff.
	order := []string{
		"mount -t devtmpfs devtmpfs /dev",
		"NESTLAB-BOOT",
		"insmod /lab/modules/irqbypass.ko",
		"insmod /lab/modules/kvm.ko",
		"insmod /lab/modules/kvm-amd.ko nested=0 || labfail insmod-kvm-amd",
		"[ -c /dev/kvm ] || labfail no-dev-kvm",
		"ip link set lo up",
		"export A='it'\\''s quoted'",
		"export KVMKIT_NESTLAB=1",
		"export Z=last",
		"NESTLAB-START",
		"(cd '/lab/work dir' && exec sh /lab/payload.sh) </dev/null",
		`echo "NESTLAB-EXIT=$rc"`,
		"poweroff -f",
	}
	prev := -1
	for _, o := range order {
		prev = idx(o, prev+1)
	}
	assert.NotContains(t, s, "1BAD", "invalid env names are dropped")
}

func TestShellQuote(t *testing.T) {
	for _, s := range []string{"", "plain", "with space", "it's", `"dq"`, "$HOME", "a\nb", "*", "-flag=1", "back\\slash", "é"} {
		t.Run(s, func(t *testing.T) {
			out, err := exec.Command("sh", "-c", "printf %s "+ShellQuote(s)).Output()
			require.NoError(t, err)
			assert.Equal(t, s, string(out))
		})
	}
	assert.Equal(t, "plain", ShellQuote("plain"))
}

func TestCommandPayload(t *testing.T) {
	p := CommandPayload([]string{"/lab/bin/x", "-a", "b c"})
	shSyntax(t, p)
	assert.Contains(t, p, "exec /lab/bin/x -a 'b c'\n")
}

func FuzzShellQuote(f *testing.F) {
	for _, s := range []string{"", "a b", "'", "''\\'"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if strings.ContainsRune(s, 0) {
			return // cannot be an argv element
		}
		q := ShellQuote(s)
		// The quoted word must be one single-quoted or safe word.
		if q != s {
			if !strings.HasPrefix(q, "'") || !strings.HasSuffix(q, "'") {
				t.Fatalf("bad quoting %q -> %q", s, q)
			}
			inner := strings.ReplaceAll(q[1:len(q)-1], `'\''`, "")
			if strings.Contains(inner, "'") {
				t.Fatalf("unescaped quote in %q", q)
			}
		}
	})
}
