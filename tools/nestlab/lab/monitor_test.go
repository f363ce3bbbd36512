package lab

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeMonitor serves the QEMU human monitor protocol on a unix socket
// (see serveMonitor).
func fakeMonitor(t *testing.T, reply func(cmd string) string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "mon.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go serveMonitor(l, reply)
	return sock
}

// serveMonitor answers every connection on l like QEMU's human monitor: a
// banner and prompt, then, for every command line, its echo, reply(cmd)
// and the prompt again. It returns when l is closed.
func serveMonitor(l net.Listener, reply func(cmd string) string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.Write([]byte("QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) "))
			r := bufio.NewReader(c)
			for {
				cmd, err := r.ReadString('\n')
				if err != nil {
					return
				}
				c.Write([]byte(cmd + reply(strings.TrimSpace(cmd)) + "(qemu) "))
			}
		}()
	}
}

func TestMonitorSample(t *testing.T) {
	regs := "RAX=0000000000000000 RBX=ffffffff82a0c940 RCX=0000000000000001 RDX=0000000000000000\r\n" +
		"RIP=ffffffff810a0010 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n" +
		"ES =0000 0000000000000000 00000000 00000000\r\n" +
		"CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n" +
		"CR0=80050033 CR2=00007f0000000000 CR3=0000000102e1a000 CR4=00350ef0\r\n" +
		"EFER=0000000000001d01\r\n"
	sock := fakeMonitor(t, func(cmd string) string {
		switch cmd {
		case "info registers":
			return regs
		case "info lapic":
			return "dumping local APIC state for CPU 0\r\n\r\nISR\t (none)\r\nIRR\t 236\r\n"
		}
		return "unknown command\r\n"
	})
	smap := filepath.Join(t.TempDir(), "System.map")
	require.NoError(t, os.WriteFile(smap, []byte(
		"ffffffff81000000 T _text\nffffffff810a0000 T default_idle\nffffffff810a0100 t other_fn\nffffffff82000000 D some_data\n"), 0o644))

	got := monitorSample(sock, smap)
	require.Len(t, got, 16, "%q", got)
	assert.Equal(t, []string{"lapic:", "  dumping local APIC state for CPU 0", "  ISR\t (none)", "  IRR\t 236"}, got[12:])
	assert.Equal(t, "sample 1:", got[0])
	assert.Contains(t, got, "  RIP=ffffffff810a0010 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1  <default_idle+0x10>")
	assert.Contains(t, got, "  EFER=0000000000001d01")
	assert.Equal(t, "sample 2:", got[6])
	assert.NotContains(t, strings.Join(got, "\n"), "ES =", "only the lines that say where the CPU is")
}

func TestMonitorSampleNoMonitor(t *testing.T) {
	got := monitorSample(filepath.Join(t.TempDir(), "absent.sock"), "")
	require.Len(t, got, 3)
	assert.Contains(t, got[0], "sample 1: QEMU monitor:")
	assert.Contains(t, got[2], "lapic: QEMU monitor:")
	assert.Nil(t, monitorSample("", ""))
}

func TestSymbolLookup(t *testing.T) {
	smap := filepath.Join(t.TempDir(), "System.map")
	require.NoError(t, os.WriteFile(smap, []byte("ffffffff81000100 T b\nffffffff81000000 T a\nbogus line\n"), 0o644))
	st := loadSystemMap(smap)
	tests := []struct{ line, want string }{
		{"RIP=ffffffff81000000 RFL=2", "a+0x0"},
		{"RIP=ffffffff81000105", "b+0x5"},
		{"RIP=0000000000401000 RFL=2", ""}, // user space
		{"RIP=ffffffff91000000", ""},       // far past the last symbol
		{"RIP=zz", ""},
		{"RIP=", ""},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, st.lookup(tt.line), tt.line)
	}
	assert.Equal(t, "", loadSystemMap("/nonexistent").lookup("RIP=ffffffff81000000"))
}
