package lab

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeQEMUEnv makes the test binary act as QEMU (see fakeQEMUMain).
const fakeQEMUEnv = "NESTLAB_FAKE_QEMU"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeQEMUEnv); mode != "" {
		os.Exit(fakeQEMUMain(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeQEMUMain stands in for a QEMU whose L1 boots, starts the payload
// and then goes silent (stalls), serving the human monitor named by its
// -monitor argument. In mode "wakes", an "nmi" command brings the
// heartbeat back and the payload exits 0; in mode "dead" nothing helps.
func fakeQEMUMain(mode string, args []string) int {
	var sock string
	for i, a := range args {
		if a == "-monitor" && i+1 < len(args) {
			spec := strings.TrimPrefix(args[i+1], "unix:")
			sock, _, _ = strings.Cut(spec, ",")
		}
	}
	if sock == "" {
		fmt.Fprintln(os.Stderr, "fake qemu: no -monitor unix: argument")
		return 1
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake qemu:", err)
		return 1
	}
	fmt.Println("NESTLAB-BOOT uptime=1")
	fmt.Println("NESTLAB-START")
	fmt.Println("running")
	woke := make(chan struct{}, 1)
	go serveMonitor(l, func(cmd string) string {
		switch cmd {
		case "info registers":
			return "RIP=ffffffff81a17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
		case "nmi":
			if mode == "wakes" {
				woke <- struct{}{}
			}
		}
		return ""
	})
	select {
	case <-woke:
		fmt.Println("NESTLAB-ALIVE uptime=9")
		fmt.Println("after the nudge")
		fmt.Println("NESTLAB-EXIT=0")
		return 0
	case <-time.After(time.Minute):
		return 1
	}
}

// fakeQEMUBinary returns a QEMU stand-in that runs fakeQEMUMain in mode.
func fakeQEMUBinary(t *testing.T, mode string) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "qemu")
	script := fmt.Sprintf("#!/bin/sh\nexec env %s=%s %s \"$@\"\n", fakeQEMUEnv, mode, ShellQuote(exe))
	require.NoError(t, os.WriteFile(p, []byte(script), 0o755))
	return p
}
