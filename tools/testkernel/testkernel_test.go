// Package testkernel_test checks the test kernel recipe (tools/testkernel):
// script syntax and the config fragment always, and with KVMKIT_LAB_E2E=1
// it builds (or reuses) the kernel and boots each test under QEMU TCG.
package testkernel_test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestScriptsParse(t *testing.T) {
	out, err := exec.Command("bash", "-n", "build.sh").CombinedOutput()
	require.NoError(t, err, string(out))
	out, err = exec.Command("sh", "-n", "init.sh").CombinedOutput()
	require.NoError(t, err, string(out))
}

func TestConfigFragment(t *testing.T) {
	f, err := os.Open("kvmkit.config")
	require.NoError(t, err)
	defer f.Close()
	line := regexp.MustCompile(`^CONFIG_[A-Z0-9_]+=(y|[0-9]+)$`)
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		require.Regexp(t, line, l)
		name := strings.SplitN(l, "=", 2)[0]
		assert.False(t, seen[name], "duplicate %s", name)
		seen[name] = true
	}
	for _, must := range []string{"CONFIG_PVH", "CONFIG_KVM_GUEST", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_X86_MPPARSE", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_DEVPORT", "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP"} {
		assert.True(t, seen[must], "fragment lacks %s", must)
	}
}

// TestBootUnderTCG builds (or reuses) the kernel and boots it with host
// QEMU TCG. Slow the first time (kernel build); guarded by KVMKIT_LAB_E2E=1.
func TestBootUnderTCG(t *testing.T) {
	if os.Getenv("KVMKIT_LAB_E2E") != "1" {
		t.Skip("set KVMKIT_LAB_E2E=1 to build and boot the test kernel")
	}
	out, err := exec.Command("bash", "build.sh").Output()
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	dir := lines[len(lines)-1]

	disk := filepath.Join(t.TempDir(), "disk.img")
	content := make([]byte, 1<<20)
	for i := range content {
		content[i] = byte(i * 7)
	}
	require.NoError(t, os.WriteFile(disk, content, 0o644))
	sum := sha256.Sum256(content)

	tests := []struct {
		name   string
		extra  []string
		append string
		want   []string
		exit   int
	}{
		{"boot", nil, "", []string{"KVMKIT-INIT-OK", "cpus=2", "KVMKIT-TEST name=boot result=PASS"}, 0},
		{"panic", nil, "", []string{"KVMKIT-INIT-OK", "Kernel panic - not syncing: sysrq triggered crash"}, 0},
		{"exitport", []string{"-device", "isa-debug-exit,iobase=0xf4,iosize=4"}, "kvmkit.code=7", []string{"result=PASS action=outb"}, 7<<1 | 1},
		{"reboot", nil, "", []string{"result=PASS action=reboot", "reboot: Restarting system"}, 0},
		{"rng", []string{"-device", "virtio-rng-pci"}, "", []string{"KVMKIT-TEST name=rng result=PASS bytes=64"}, 0},
		{"disk", []string{"-drive", "file=" + disk + ",if=virtio,format=raw"}, "kvmkit.sum=" + hex.EncodeToString(sum[:]), []string{"KVMKIT-TEST name=disk result=PASS"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := []string{"-accel", "tcg,thread=multi", "-cpu", "max", "-M", "pc", "-smp", "2", "-m", "256M",
				"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
				"-kernel", filepath.Join(dir, "bzImage"), "-initrd", filepath.Join(dir, "initramfs.cpio.gz"),
				"-append", strings.TrimSpace("console=ttyS0 panic=-1 kvmkit.test=" + tt.name + " " + tt.append)}
			args = append(args, tt.extra...)
			cmd := exec.Command("timeout", append([]string{"180", "qemu-system-x86_64"}, args...)...)
			start := time.Now()
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tt.exit, code, string(out))
			for _, w := range tt.want {
				assert.Contains(t, string(out), w)
			}
			assert.NotContains(t, string(out), "result=FAIL")
			t.Logf("%s: %v wall", tt.name, time.Since(start).Round(10*time.Millisecond))
		})
	}
}
