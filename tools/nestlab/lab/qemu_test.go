package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeQEMU writes a shell script standing in for QEMU: it ignores its
// arguments and runs body.
func fakeQEMU(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755))
	return p
}

func TestRunQEMU(t *testing.T) {
	tests := []struct {
		name        string
		body        string
		payloadOnly bool
		timeout     time.Duration
		wantErr     error
		wantStatus  int
		wantReason  string
		wantOut     string
		wantMarkers []MarkerKind
	}{
		{
			name:        "payload exit status",
			body:        `printf 'SeaBIOS\033[2J\r\nNESTLAB-BOOT uptime=1.5\r\nNESTLAB-START\r\nhello\r\nNESTLAB-EXIT=3\r\n'`,
			wantStatus:  3,
			wantOut:     "SeaBIOS\nNESTLAB-BOOT uptime=1.5\nNESTLAB-START\nhello\nNESTLAB-EXIT=3\n",
			wantMarkers: []MarkerKind{MarkerBoot, MarkerStart, MarkerExit},
		},
		{
			name:        "payload only output",
			body:        `printf 'boot noise\nNESTLAB-BOOT uptime=1\nNESTLAB-START\nPASS\nNESTLAB-EXIT=0\n[ 3.0] reboot: Power down\n'`,
			payloadOnly: true,
			wantOut:     "PASS\n",
			wantMarkers: []MarkerKind{MarkerBoot, MarkerStart, MarkerExit},
		},
		{
			name:        "kvm module failure",
			body:        `printf 'NESTLAB-BOOT uptime=1\nNESTLAB-ERROR=insmod-kvm-amd\n'`,
			wantErr:     ErrNoKVM,
			wantStatus:  ExitNoKVM,
			wantReason:  "insmod-kvm-amd",
			wantMarkers: []MarkerKind{MarkerBoot, MarkerError},
		},
		{
			name:        "kernel panic",
			body:        `printf 'NESTLAB-BOOT uptime=1\nNESTLAB-START\n[ 5.1] Kernel panic - not syncing: Fatal exception\n'`,
			wantErr:     ErrCrashed,
			wantStatus:  ExitCrashed,
			wantReason:  "Kernel panic - not syncing: Fatal exception",
			wantMarkers: []MarkerKind{MarkerBoot, MarkerStart},
		},
		{
			name:       "never booted",
			body:       `echo 'qemu: could not load kernel' >&2; exit 1`,
			wantErr:    ErrQEMU,
			wantStatus: ExitCrashed,
			wantReason: "could not load kernel",
		},
		{
			name:       "exits silently",
			body:       `exit 0`,
			wantErr:    ErrCrashed,
			wantStatus: ExitCrashed,
			wantReason: "never reached /init",
		},
		{
			name:        "hang",
			body:        `echo NESTLAB-BOOT uptime=1; sleep 30; echo NESTLAB-EXIT=0`,
			timeout:     300 * time.Millisecond,
			wantErr:     ErrTimeout,
			wantStatus:  ExitTimeout,
			wantReason:  "no exit after 300ms",
			wantMarkers: []MarkerKind{MarkerBoot},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			var markers []MarkerKind
			opts := Options{
				QEMU:        fakeQEMU(t, tt.body),
				Output:      &out,
				PayloadOnly: tt.payloadOnly,
				Timeout:     tt.timeout,
				OnMarker:    func(m Marker) { markers = append(markers, m.Kind) },
			}
			opts.defaults()
			start := time.Now()
			res, err := runQEMU(context.Background(), &Host{Kernel: "kernel"}, "initrd", opts)
			assert.Less(t, time.Since(start), 10*time.Second, "must not hang")
			require.NotNil(t, res)
			assert.Equal(t, tt.wantMarkers, markers)
			if tt.wantErr == nil {
				require.NoError(t, err)
				assert.Equal(t, tt.wantStatus, res.ExitCode)
			} else {
				require.Error(t, err)
				assert.True(t, errors.Is(err, tt.wantErr), "got %v", err)
				var be *BootError
				require.ErrorAs(t, err, &be)
				assert.Contains(t, be.Reason, tt.wantReason)
				assert.Equal(t, tt.wantStatus, ExitStatus(err))
				assert.NotContains(t, err.Error(), "\n", "one-line reason")
			}
			if tt.wantOut != "" {
				assert.Equal(t, tt.wantOut, out.String())
			}
		})
	}
}

func TestRunQEMUCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	opts := Options{QEMU: fakeQEMU(t, `echo NESTLAB-BOOT uptime=1; sleep 30`)}
	opts.defaults()
	opts.OnMarker = func(Marker) { cancel() }
	res, err := runQEMU(ctx, &Host{Kernel: "k"}, "i", opts)
	require.ErrorIs(t, err, ErrCanceled)
	assert.Equal(t, ExitSignal, ExitStatus(err))
	assert.Less(t, res.Wall, 10*time.Second)
}

func TestRunQEMULongLine(t *testing.T) {
	// A guest printing a huge line without newline must not blow up memory;
	// it is forwarded in pieces.
	var out bytes.Buffer
	opts := Options{QEMU: fakeQEMU(t, `head -c 300000 /dev/zero | tr '\0' x; printf '\nNESTLAB-EXIT=0\n'`), Output: &out}
	opts.defaults()
	res, err := runQEMU(context.Background(), &Host{Kernel: "k"}, "i", opts)
	require.NoError(t, err)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, 300000, strings.Count(out.String(), "x"))
}

func TestQEMUArgs(t *testing.T) {
	args := QEMUArgs(Options{Mem: "2G", CPUs: 4, Cmdline: "foo=1"}, "/boot/k", "/tmp/i", "")
	s := strings.Join(args, " ")
	for _, want := range []string{"-accel tcg,thread=multi", "-cpu max", "-smp 4", "-m 2G", "-no-reboot", "-kernel /boot/k", "-initrd /tmp/i", "-serial stdio"} {
		assert.Contains(t, s, want)
	}
	assert.Equal(t, "-append", args[len(args)-2])
	assert.Contains(t, args[len(args)-1], "console=ttyS0")
	assert.Contains(t, args[len(args)-1], "panic=-1")
	assert.True(t, strings.HasSuffix(args[len(args)-1], " foo=1"))
}

func TestExitStatus(t *testing.T) {
	assert.Equal(t, 0, ExitStatus(nil))
	assert.Equal(t, ExitCrashed, ExitStatus(errors.New("other")))
	assert.Equal(t, ExitTimeout, ExitStatus(&BootError{Kind: ErrTimeout}))
}

func TestRunQEMUStall(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		wantErr error
		wantOut string
	}{
		{
			name:    "silent after boot is a stall",
			body:    `printf 'NESTLAB-BOOT uptime=1\nNESTLAB-START\nrunning\n'; sleep 30`,
			wantErr: ErrStalled,
			wantOut: "running\n",
		},
		{
			name:    "heartbeats keep a quiet payload alive and stay off the output",
			body:    `printf 'NESTLAB-BOOT uptime=1\nNESTLAB-START\n'; for i in 1 2 3 4 5 6; do sleep 0.5; echo NESTLAB-ALIVE uptime=$i; done; printf 'done\nNESTLAB-EXIT=0\n'`,
			wantOut: "done\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			opts := Options{QEMU: fakeQEMU(t, tt.body), Output: &out, PayloadOnly: true, Stall: 2 * time.Second}
			opts.defaults()
			res, err := runQEMU(context.Background(), &Host{Kernel: "k"}, "i", opts)
			require.NotNil(t, res)
			assert.Equal(t, tt.wantOut, out.String())
			if tt.wantErr == nil {
				require.NoError(t, err)
				assert.Empty(t, res.CPU)
				return
			}
			require.ErrorIs(t, err, tt.wantErr)
			assert.Equal(t, ExitTimeout, ExitStatus(err))
			assert.Contains(t, err.Error(), "no console output")
			assert.Less(t, res.Wall, 20*time.Second)
			// The fake QEMU serves no monitor: every sample says so.
			require.Len(t, res.CPU, 3)
			assert.Contains(t, res.CPU[0], "QEMU monitor:")
		})
	}
}

func TestRunQEMUNudge(t *testing.T) {
	tests := []struct {
		mode       string
		nudges     int
		wantErr    error
		wantNudges int
		wantOut    string
	}{
		{mode: "wakes", nudges: 1, wantNudges: 1, wantOut: "after the nudge\n"},
		{mode: "wakes", nudges: 0, wantErr: ErrStalled},
		{mode: "dead", nudges: 2, wantErr: ErrStalled},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/nudges=%d", tt.mode, tt.nudges), func(t *testing.T) {
			var out bytes.Buffer
			opts := Options{QEMU: fakeQEMUBinary(t, tt.mode), Output: &out, PayloadOnly: true, Stall: time.Second, Nudges: tt.nudges}
			opts.defaults()
			res, err := runQEMU(context.Background(), &Host{Kernel: "k"}, "i", opts)
			require.NotNil(t, res)
			assert.Equal(t, tt.wantNudges, res.Nudges)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				require.NotEmpty(t, res.CPU)
				assert.Contains(t, res.CPU[1], "RIP=ffffffff81a17a0b", "registers read from the monitor")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, 0, res.ExitCode)
			assert.Contains(t, out.String(), "an NMI from the QEMU monitor woke it")
			assert.Contains(t, out.String(), tt.wantOut)
		})
	}
}
