package lab

import (
	"fmt"
	"path"
	"sort"
	"strings"
	"time"
)

// Guest paths used inside the L1 initramfs.
const (
	GuestModuleDir = "/lab/modules"    // decompressed kernel modules
	GuestPayload   = "/lab/payload.sh" // the script /init runs
)

// InitModule is one module /init loads with insmod.
type InitModule struct {
	Path   string // guest path of the .ko
	Params string // module parameters, e.g. "nested=1" (may be empty)
}

// InitConfig describes the generated L1 /init.
type InitConfig struct {
	Modules []InitModule // loaded in order; a failure ends the boot with NESTLAB-ERROR
	Env     []string     // K=V exported to the payload
	Workdir string       // payload working directory ("/" if empty)
	Payload string       // guest path of the payload script, run with sh
	// Heartbeat, when positive, makes /init print an ALIVE marker this
	// often (whole seconds) while the payload runs.
	Heartbeat time.Duration
}

// InitScript returns the L1 /init shell script: it mounts proc, sys,
// devtmpfs and /tmp, prints NESTLAB-BOOT, loads the modules, checks
// /dev/kvm, brings up lo, prints NESTLAB-START, starts the heartbeat (if
// any), runs the payload with stdin from /dev/null, prints NESTLAB-EXIT=<status> and powers off.
func InitScript(c InitConfig) string {
	var b strings.Builder
	wd := c.Workdir
	if wd == "" {
		wd = "/"
	}
	b.WriteString(`#!/bin/sh
# nestlab L1 /init (generated).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
echo "` + markerPrefix + `BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"
labfail() {
	echo "` + markerPrefix + `ERROR=$1"
	dmesg | tail -n 20
	sleep 0.2 2>/dev/null || sleep 1
	poweroff -f
	exit 1
}
`)
	for _, m := range c.Modules {
		name := strings.TrimSuffix(path.Base(m.Path), ".ko")
		fmt.Fprintf(&b, "insmod %s %s || labfail insmod-%s\n", ShellQuote(m.Path), m.Params, name)
	}
	b.WriteString("[ -c /dev/kvm ] || labfail no-dev-kvm\n")
	b.WriteString("ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up\n")
	env := append([]string(nil), c.Env...)
	sort.Strings(env)
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if !validEnvName(k) {
			continue
		}
		fmt.Fprintf(&b, "export %s=%s\n", k, ShellQuote(v))
	}
	fmt.Fprintf(&b, "echo \"%sSTART uptime=$(cut -d' ' -f1 /proc/uptime)\"\n", markerPrefix)
	if c.Heartbeat > 0 {
		// The heartbeat tells the host that L1 itself still runs (its
		// scheduler, timers and console), whatever the payload does.
		fmt.Fprintf(&b, "(while sleep %d; do echo \"%sALIVE uptime=$(cut -d' ' -f1 /proc/uptime)\"; done) </dev/null &\nhb=$!\n",
			int(c.Heartbeat.Round(time.Second)/time.Second), markerPrefix)
	}
	fmt.Fprintf(&b, "(cd %s && exec sh %s) </dev/null\n", ShellQuote(wd), ShellQuote(c.Payload))
	b.WriteString("rc=$?\n")
	if c.Heartbeat > 0 {
		b.WriteString("kill $hb 2>/dev/null\n")
	}
	fmt.Fprintf(&b, "echo \"%sEXIT=$rc\"\n", markerPrefix)
	// Give the UART a moment to drain before the power goes.
	b.WriteString("sleep 0.2 2>/dev/null || sleep 1\npoweroff -f\n")
	return b.String()
}

// CommandPayload returns a payload script that execs argv.
func CommandPayload(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = ShellQuote(a)
	}
	return "#!/bin/sh\nexec " + strings.Join(q, " ") + "\n"
}

// ShellQuote quotes s for POSIX sh as one word.
func ShellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// validEnvName reports whether k is a usable shell variable name.
func validEnvName(k string) bool {
	if k == "" || k[0] >= '0' && k[0] <= '9' {
		return false
	}
	for _, r := range k {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}
