package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	vnet "github.com/kvmkit/kvmkit/virtio/net"
	"github.com/kvmkit/kvmkit/virtio/vswitch"
)

// The Linux guest tests boot the kvmkit test kernel (tools/testkernel) with
// `vmm run --kernel`, calling the CLI in-process. Its /init (init.sh) prints
// KVMKIT-INIT-OK and cpus=N, runs the test named by kvmkit.test= and
// reports `KVMKIT-TEST name=NAME result=PASS|FAIL ...` (the last such line
// wins), then powers off. Run them with
//
//	go run ./tools/nestlab gotest -v --testkernel --run 'TestLinux' ./examples/vmm

// linuxInitMarker is the first line init.sh prints.
const linuxInitMarker = "KVMKIT-INIT-OK"

// linuxTimeout bounds one guest run; a hung guest is stopped with SIGTERM.
const linuxTimeout = 90 * time.Second

// linuxKernelDir returns the test kernel directory, or skips the test when
// there is no /dev/kvm or no test kernel.
func linuxKernelDir(t testing.TB) string {
	t.Helper()
	if ok, why := kvm.Available(); !ok {
		t.Skipf("no /dev/kvm: %s", why)
	}
	dir := os.Getenv("KVMKIT_TEST_KERNEL_DIR")
	if dir == "" {
		t.Skip("no test kernel: KVMKIT_TEST_KERNEL_DIR is unset (build it with tools/testkernel/build.sh, or use nestlab --testkernel)")
	}
	for _, f := range []string{"bzImage", "vmlinux", "initramfs.cpio.gz"} {
		_, err := os.Stat(filepath.Join(dir, f))
		require.NoError(t, err, "KVMKIT_TEST_KERNEL_DIR=%s lacks %s", dir, f)
	}
	return dir
}

// linuxRun describes one `vmm run --kernel` of the test kernel.
type linuxRun struct {
	kernel  string      // file in the kernel directory (default bzImage)
	cpus    int         // --cpus (default 1)
	test    string      // kvmkit.test= (default boot)
	params  []string    // more kernel parameters
	args    []string    // more vmm flags
	steps   []linuxStep // input typed into COM1 (--stdin) as output appears
	timeout time.Duration
}

// linuxResult is how a run ended and what it printed.
type linuxResult struct {
	code           int
	stdout, stderr string
	// toInit is the wall time from the start of run() to the first
	// KVMKIT-INIT-OK on COM1 (0 if it never appeared); total is the
	// whole run.
	toInit, total time.Duration
	// rssAnonPeak and rssShmemPeak are the largest RssAnon and RssShmem of
	// this (test) process seen during the run, in KiB; guest RAM is a
	// memfd, so the guest pages it touched count as RssShmem.
	rssAnonPeak, rssShmemPeak int64
}

// linuxStep types input into COM1 when at first appears on it, as a user
// would: input piped in at once would reach the UART while the kernel
// probes it, which flushes the FIFO. If do is set it runs first (in its own
// goroutine) and what it returns is typed after input.
type linuxStep struct {
	at    string
	input string
	do    func() string
}

// markWriter is a goroutine-safe buffer that records when a marker first
// appears in what is written and runs the steps whose text appears.
type markWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	marker []byte
	start  time.Time
	seen   time.Duration
	steps  []linuxStep
	fired  []bool
	typeIn io.Writer
}

func (w *markWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.seen == 0 && bytes.Contains(w.tail(len(w.marker), len(p)), w.marker) {
		w.seen = time.Since(w.start)
	}
	for i, st := range w.steps {
		if w.fired[i] || !bytes.Contains(w.tail(len(st.at), len(p)), []byte(st.at)) {
			continue
		}
		w.fired[i] = true
		go func() {
			in := st.input
			if st.do != nil {
				in += st.do()
			}
			_, _ = io.WriteString(w.typeIn, in)
		}()
	}
	return len(p), nil
}

// tail returns the bytes in which a k-byte string that ends in the last n
// written bytes can start.
func (w *markWriter) tail(k, n int) []byte {
	b := w.buf.Bytes()
	return b[max(0, len(b)-n-k):]
}

func (w *markWriter) result() (string, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String(), w.seen
}

// procStatusKiB reads a "Name: N kB" field of /proc/self/status.
func procStatusKiB(name string) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// bootLinux runs vmm on the test kernel as r describes.
// bootLinux boots the test kernel once; a boot that dies of a triple fault
// or stalls (stopped by the timeout) before the kernel printed anything at
// all is booted once more (logged).
// In the nested lab such early triple faults happen in roughly one boot in
// ten, at random, for bzImage boots, and have not been seen on a second
// try; their cause (kvmkit's set-up or QEMU's emulated nested SVM) is
// still open. Any other failure, or a second early triple fault, stands.
func bootLinux(t testing.TB, dir string, r linuxRun) linuxResult {
	t.Helper()
	res := bootLinuxOnce(t, dir, r)
	silent := strings.TrimSpace(res.stdout) == "" && len(r.steps) == 0
	if silent && (res.code == exitCrash && strings.Contains(res.stderr, "triple fault") || res.code == exitSIGTERM) {
		t.Logf("KNOWN LAB FLAKE: early triple fault before any console output (%s); booting once more", strings.TrimSpace(res.stderr))
		res = bootLinuxOnce(t, dir, r)
	}
	return res
}

func bootLinuxOnce(t testing.TB, dir string, r linuxRun) linuxResult {
	t.Helper()
	if r.kernel == "" {
		r.kernel = "bzImage"
	}
	if r.cpus == 0 {
		r.cpus = 1
	}
	if r.test == "" {
		r.test = "boot"
	}
	if r.timeout == 0 {
		r.timeout = linuxTimeout
	}
	cmdline := append([]string{"console=ttyS0", "quiet", "kvmkit.test=" + r.test}, r.params...)
	args := []string{"run",
		"--kernel", filepath.Join(dir, r.kernel),
		"--initrd", filepath.Join(dir, "initramfs.cpio.gz"),
		"--cmdline", strings.Join(cmdline, " "),
		"--cpus", strconv.Itoa(r.cpus),
	}
	if len(r.steps) > 0 {
		args = append(args, "--stdin")
	}
	args = append(args, r.args...)

	// A hung guest is stopped the way a user would: SIGTERM, which vmm
	// turns into a clean stop with status 143. While the run lasts this
	// test also listens for SIGTERM, so the signal never kills the test
	// binary.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	defer signal.Stop(sigs)
	timedOut := make(chan struct{})
	watchdog := time.AfterFunc(r.timeout, func() {
		close(timedOut)
		_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
	})

	var res linuxResult
	done := make(chan struct{})
	var rssWG sync.WaitGroup
	rssWG.Add(1)
	go func() {
		defer rssWG.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			res.rssAnonPeak = max(res.rssAnonPeak, procStatusKiB("RssAnon"))
			res.rssShmemPeak = max(res.rssShmemPeak, procStatusKiB("RssShmem"))
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()

	start := time.Now()
	stdin, typeIn := io.Pipe()
	out := &markWriter{marker: []byte(linuxInitMarker), start: start, steps: r.steps, fired: make([]bool, len(r.steps)), typeIn: typeIn}
	var errb lockedBuffer
	res.code = run(args, stdin, out, &errb)
	_ = typeIn.Close() // ends the UART's input pump and any pending step
	res.total = time.Since(start)
	watchdog.Stop()
	close(done)
	rssWG.Wait()
	res.stdout, res.toInit = out.result()
	res.stderr = errb.String()
	select {
	case <-timedOut:
		t.Fatalf("vmm %s: guest still running after %v; COM1:\n%s\nstderr:\n%s", strings.Join(args, " "), r.timeout, res.stdout, res.stderr)
	default:
	}
	t.Logf("%s %s cpus=%d: status %d, KVMKIT-INIT-OK after %v, run %v, peak RssAnon %d KiB, RssShmem %d KiB",
		r.kernel, r.test, r.cpus, res.code, res.toInit.Round(time.Millisecond), res.total.Round(time.Millisecond), res.rssAnonPeak, res.rssShmemPeak)
	return res
}

// lockedBuffer is a goroutine-safe bytes.Buffer for stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// kvmkitTest is one `KVMKIT-TEST name=... result=...` line.
type kvmkitTest struct {
	name, result string
	fields       map[string]string
	line         string
}

var kvmkitTestRE = regexp.MustCompile(`KVMKIT-TEST name=(\S+) result=(PASS|FAIL)(.*)`)

// lastTestLine returns the last KVMKIT-TEST line of the console output.
func lastTestLine(out string) (kvmkitTest, bool) {
	ms := kvmkitTestRE.FindAllStringSubmatch(out, -1)
	if len(ms) == 0 {
		return kvmkitTest{}, false
	}
	m := ms[len(ms)-1]
	kt := kvmkitTest{name: m[1], result: m[2], fields: map[string]string{}, line: strings.TrimSpace(m[0])}
	for _, f := range strings.Fields(m[3]) {
		if k, v, ok := strings.Cut(f, "="); ok {
			kt.fields[k] = v
		}
	}
	return kt, true
}

// requireGuestTest checks that init ran test name and that its last result
// was want; it returns the parsed line.
func requireGuestTest(t *testing.T, res linuxResult, name, want string) kvmkitTest {
	t.Helper()
	require.Contains(t, res.stdout, linuxInitMarker, "init never ran; stderr: %s\nCOM1:\n%s", res.stderr, res.stdout)
	kt, ok := lastTestLine(res.stdout)
	require.True(t, ok, "no KVMKIT-TEST line; stderr: %s\nCOM1:\n%s", res.stderr, res.stdout)
	require.Equal(t, name, kt.name, kt.line)
	require.Equal(t, want, kt.result, "%s\nCOM1:\n%s", kt.line, res.stdout)
	return kt
}

func TestLinuxBoot(t *testing.T) {
	dir := linuxKernelDir(t)
	for _, tc := range []struct {
		kernel string
		cpus   int
	}{
		{"bzImage", 1},
		{"bzImage", 2},
		{"vmlinux", 1}, // ELF with a PVH note: the PVH entry
		{"vmlinux", 2},
	} {
		t.Run(fmt.Sprintf("%s/cpus=%d", tc.kernel, tc.cpus), func(t *testing.T) {
			res := bootLinux(t, dir, linuxRun{kernel: tc.kernel, cpus: tc.cpus})
			assert.Equal(t, 0, res.code, "power-off ends the run with status 0; stderr: %s", res.stderr)
			requireGuestTest(t, res, "boot", "PASS")
			assert.Regexp(t, fmt.Sprintf(`(?m)^cpus=%d\r?$`, tc.cpus), res.stdout, "every vCPU came up")
			assert.Empty(t, res.stderr)
		})
	}
}

func TestLinuxExitPort(t *testing.T) {
	dir := linuxKernelDir(t)
	for _, code := range []int{7, 42} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			var params []string
			if code != 7 {
				params = append(params, fmt.Sprintf("kvmkit.code=%d", code))
			}
			res := bootLinux(t, dir, linuxRun{test: "exitport", params: params})
			assert.Equal(t, code, res.code, "the byte written to port 0xf4 is vmm's status; stderr: %s", res.stderr)
			kt := requireGuestTest(t, res, "exitport", "PASS")
			assert.Equal(t, strconv.Itoa(code), kt.fields["code"])
		})
	}
}

func TestLinuxPanic(t *testing.T) {
	dir := linuxKernelDir(t)
	res := bootLinux(t, dir, linuxRun{test: "panic"})
	require.Equal(t, exitCrash, res.code, "a kernel panic is a guest crash; stderr: %s", res.stderr)
	requireGuestTest(t, res, "panic", "PASS")
	msg := strings.TrimSpace(res.stderr)
	assert.NotContains(t, msg, "\n", "one-line reason")
	assert.Contains(t, msg, "Kernel panic")
	assert.Contains(t, msg, "sysrq")
	// The host side is unharmed: the test process goes on and can run the
	// next guest.
	res = bootLinux(t, dir, linuxRun{})
	assert.Equal(t, 0, res.code, res.stderr)
}

func TestLinuxReboot(t *testing.T) {
	dir := linuxKernelDir(t)
	res := bootLinux(t, dir, linuxRun{test: "reboot"})
	assert.Equal(t, 0, res.code, "a reset stops the run with --on-reset stop; stderr: %s", res.stderr)
	requireGuestTest(t, res, "reboot", "PASS")
	assert.Equal(t, 1, strings.Count(res.stdout, linuxInitMarker), "the guest did not boot again")
}

// TestLinuxSerialInput drives the init shell through COM1's receive side.
func TestLinuxSerialInput(t *testing.T) {
	dir := linuxKernelDir(t)
	res := bootLinux(t, dir, linuxRun{test: "shell", steps: []linuxStep{{at: "action=shell", input: "echo sum=$((6*7))\npoweroff -f\n"}}, timeout: time.Minute})
	assert.Equal(t, 0, res.code, res.stderr)
	requireGuestTest(t, res, "shell", "PASS")
	assert.Contains(t, res.stdout, "sum=42", "the shell read and ran the command")
}

// diskImage writes a disk image of n random bytes and returns its path and
// SHA-256.
func diskImage(t *testing.T, n int) (string, string) {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(p, b, 0o644))
	sum := sha256.Sum256(b)
	return p, hex.EncodeToString(sum[:])
}

func TestLinuxVirtioDisk(t *testing.T) {
	dir := linuxKernelDir(t)
	const size = 4 << 20
	block := make([]byte, 4096) // what init.sh writes at offset 4096
	copy(block, "KVMKIT-DISK-BLOCK")

	t.Run("read-write", func(t *testing.T) {
		img, sum := diskImage(t, size)
		res := bootLinux(t, dir, linuxRun{test: "disk", params: []string{"kvmkit.sum=" + sum}, args: []string{"--disk", img}})
		assert.Equal(t, 0, res.code, res.stderr)
		kt := requireGuestTest(t, res, "disk", "PASS")
		assert.Equal(t, sum, kt.fields["sum"], "the guest read the image's exact content")
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		require.Len(t, got, size)
		assert.Equal(t, block, got[4096:8192], "the guest's flushed write reached the file")
	})
	t.Run("read-only", func(t *testing.T) {
		img, sum := diskImage(t, size)
		res := bootLinux(t, dir, linuxRun{test: "disk", params: []string{"kvmkit.sum=" + sum}, args: []string{"--disk", img + ",ro"}})
		assert.Equal(t, 0, res.code, res.stderr)
		kt := requireGuestTest(t, res, "disk", "FAIL")
		assert.Equal(t, "readback-mismatch", kt.fields["reason"], "the write was refused")
		assert.Equal(t, sum, kt.fields["sum"])
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		s := sha256.Sum256(got)
		assert.Equal(t, sum, hex.EncodeToString(s[:]), "a read-only image is unchanged")
	})
}

// TestLinuxVirtioPCI finds the devices by PCI probing instead of
// virtio-mmio command-line descriptors: with --transport pci the command
// line names no device, so the disk and the rng can only be reached
// through the host bridge, BAR0 and MSI-X.
func TestLinuxVirtioPCI(t *testing.T) {
	dir := linuxKernelDir(t)
	t.Run("disk", func(t *testing.T) {
		img, sum := diskImage(t, 4<<20)
		res := bootLinux(t, dir, linuxRun{test: "disk", params: []string{"kvmkit.sum=" + sum}, args: []string{"--transport", "pci", "--disk", img}})
		assert.Equal(t, 0, res.code, res.stderr)
		kt := requireGuestTest(t, res, "disk", "PASS")
		assert.Equal(t, sum, kt.fields["sum"], "the guest read the image's exact content over virtio-pci")
	})
	t.Run("rng", func(t *testing.T) {
		res := bootLinux(t, dir, linuxRun{test: "rng", args: []string{"--transport", "pci", "--rng"}})
		assert.Equal(t, 0, res.code, res.stderr)
		kt := requireGuestTest(t, res, "rng", "PASS")
		assert.Contains(t, kt.fields["rng"], "virtio")
	})
}

func TestLinuxVirtioRNG(t *testing.T) {
	dir := linuxKernelDir(t)
	res := bootLinux(t, dir, linuxRun{test: "rng", args: []string{"--rng"}})
	assert.Equal(t, 0, res.code, res.stderr)
	kt := requireGuestTest(t, res, "rng", "PASS")
	assert.Contains(t, kt.fields["rng"], "virtio", "the bytes came from virtio-rng")
}

// TestLinuxVirtioNetUser: the guest gets a DHCP lease from user-mode
// networking and fetches a body from an HTTP server on the host's loopback
// through the gateway (10.0.2.2). init.sh's own net test cannot be used:
// Debian's busybox 1.35 wget crashes with -T (SIGSEGV, also on the host),
// so the same steps are typed into the init shell, without -T.
func TestLinuxVirtioNetUser(t *testing.T) {
	dir := linuxKernelDir(t)
	body := make([]byte, 256<<10) // many segments, several receive buffers
	_, err := rand.Read(body)
	require.NoError(t, err)
	want := sha256.Sum256(body)
	var hits sync.Map
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Store(r.RemoteAddr, r.URL.Path)
		_, _ = w.Write(body)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	port := ln.Addr().(*net.TCPAddr).Port

	script := strings.Join([]string{
		"ip link set lo up; ip link set eth0 up",
		"udhcpc -i eth0 -n -q -t 5 -s /etc/udhcpc.script >/dev/null 2>&1",
		"echo NET-LEASE addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}') gw=$(cat /tmp/gateway)",
		fmt.Sprintf("wget -q -O /tmp/body http://$(cat /tmp/gateway):%d/ && echo NET-HTTP bytes=$(wc -c </tmp/body) sum=$(sha256sum </tmp/body | cut -c1-64)", port),
		"poweroff -f",
	}, "\n") + "\n"
	res := bootLinux(t, dir, linuxRun{test: "shell", steps: []linuxStep{{at: "action=shell", input: script}}, timeout: 2 * time.Minute, args: []string{"--net", "user"}})
	assert.Equal(t, 0, res.code, res.stderr)
	requireGuestTest(t, res, "shell", "PASS")
	lease := regexp.MustCompile(`NET-LEASE addr=(10\.0\.2\.\d+)/24 gw=(\S+)`).FindStringSubmatch(res.stdout)
	require.NotNil(t, lease, "no DHCP lease; COM1:\n%s", res.stdout)
	assert.Equal(t, "10.0.2.2", strings.TrimSpace(lease[2]), "DHCP named the gateway as router")
	got := regexp.MustCompile(`NET-HTTP bytes=(\d+) sum=([0-9a-f]{64})`).FindStringSubmatch(res.stdout)
	require.NotNil(t, got, "HTTP fetch failed; COM1:\n%s", res.stdout)
	assert.Equal(t, strconv.Itoa(len(body)), got[1], "the guest received the whole body")
	assert.Equal(t, hex.EncodeToString(want[:]), got[2], "and intact")
	n := 0
	hits.Range(func(_, _ any) bool { n++; return true })
	assert.Equal(t, 1, n, "the host server saw the guest's request")
}

// TestLinuxVirtioNetHostForward: a host port forward reaches an HTTP server
// in the guest (busybox httpd on port 8080).
func TestLinuxVirtioNetHostForward(t *testing.T) {
	dir := linuxKernelDir(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	hostPort := ln.Addr().(*net.TCPAddr).Port
	require.NoError(t, ln.Close())
	const page = "kvmkit-guest-page"
	type fetched struct {
		body string
		err  error
	}
	results := make(chan fetched, 1)
	fetch := func() string {
		c := &http.Client{Timeout: 20 * time.Second}
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", hostPort))
		if err != nil {
			results <- fetched{err: err}
			return "poweroff -f\n"
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		results <- fetched{string(b), err}
		return "poweroff -f\n"
	}
	script := strings.Join([]string{
		"ip link set lo up; ip link set eth0 up",
		"udhcpc -i eth0 -n -q -t 5 -s /etc/udhcpc.script >/dev/null 2>&1",
		"mkdir -p /tmp/www; echo " + page + " >/tmp/www/index.html",
		"httpd -p 8080 -h /tmp/www && echo FWD-$((40+2))-READY", // the echo of this line does not match
	}, "\n") + "\n"
	res := bootLinux(t, dir, linuxRun{
		test:    "shell",
		steps:   []linuxStep{{at: "action=shell", input: script}, {at: "FWD-42-READY", do: fetch}},
		timeout: 2 * time.Minute,
		args:    []string{"--net", fmt.Sprintf("user,hostfwd=tcp:127.0.0.1:%d-:8080", hostPort)},
	})
	assert.Equal(t, 0, res.code, res.stderr)
	require.Contains(t, res.stdout, "FWD-42-READY", "the guest server did not start; COM1:\n%s", res.stdout)
	select {
	case f := <-results:
		require.NoError(t, f.err)
		assert.Equal(t, page+"\n", f.body)
	default:
		t.Fatal("the host never fetched the page")
	}
}

// TestLinuxVirtioConsole boots with the console on virtio-console (hvc0):
// init's output reaches vmm's standard output through the virtio device.
func TestLinuxVirtioConsole(t *testing.T) {
	dir := linuxKernelDir(t)
	res := bootLinux(t, dir, linuxRun{args: []string{"--console", "virtio"}})
	assert.Equal(t, 0, res.code, res.stderr)
	out := res.stdout
	assert.Contains(t, out, linuxInitMarker, "init's console is hvc0")
	kt, ok := lastTestLine(out)
	require.True(t, ok, "no KVMKIT-TEST line on the console:\n%s", out)
	assert.Equal(t, "PASS", kt.result, kt.line)
}

// TestLinuxTwoVMsSwitch connects two guests, built with the library in this
// process, through a vswitch (a virtio-net device on one port each) and
// has one ping the other on static addresses. vmm has no switch flag yet.
func TestLinuxTwoVMsSwitch(t *testing.T) {
	dir := linuxKernelDir(t)
	kernel, err := os.ReadFile(filepath.Join(dir, "bzImage"))
	require.NoError(t, err)
	initrd, err := os.ReadFile(filepath.Join(dir, "initramfs.cpio.gz"))
	require.NoError(t, err)
	sw := vswitch.New(vswitch.Options{})

	type vm struct {
		m    *machine.Machine
		out  *markWriter
		in   *io.PipeWriter
		port *vswitch.Port
	}
	boot := func(name string, steps []linuxStep) *vm {
		inR, inW := io.Pipe()
		out := &markWriter{marker: []byte(linuxInitMarker), start: time.Now(), steps: steps, fired: make([]bool, len(steps)), typeIn: inW}
		m, err := machine.New(machine.Config{MemSize: 256 << 20, Serial: out, SerialIn: inR, WatchConsole: true})
		require.NoError(t, err)
		t.Cleanup(func() { m.Close(); inW.Close() })
		port, err := sw.AddPort(name, vswitch.LinkOptions{})
		require.NoError(t, err)
		nic, err := vnet.New(port, vnet.Options{})
		require.NoError(t, err)
		tr := mmio.New(nic, m.Mem(), m.IRQ(5), mmio.Options{})
		require.NoError(t, m.AddDevice("virtio-net0", true, machine.VirtioMMIOBase, mmio.Size, tr))
		m.AddCloser(nic)
		cmdline := "console=ttyS0 quiet kvmkit.test=shell " + mmio.CmdlineArg(machine.VirtioMMIOBase, 0x1000, 5)
		_, err = m.LoadLinux(kernel, initrd, cmdline, machine.LinuxOptions{})
		require.NoError(t, err)
		return &vm{m: m, out: out, in: inW, port: port}
	}
	// waitOutput polls v's console for s (the guests run concurrently).
	waitOutput := func(v **vm, s string) bool {
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if out, _ := (*v).out.result(); strings.Contains(out, s) {
				return true
			}
		}
		return false
	}
	up := func(ip, tag string) string {
		return fmt.Sprintf("ip link set eth0 up; ip addr add %s/24 dev eth0; echo %s-$((1+1))-UP\n", ip, tag)
	}
	var a, b *vm
	aDone := make(chan struct{})
	a = boot("a", []linuxStep{
		{at: "action=shell", input: up("10.0.3.1", "A")},
		{at: "A-2-UP", do: func() string {
			waitOutput(&b, "B-2-UP")
			return "ping -c 3 -W 10 10.0.3.2 && echo PING-$((6*7))-OK; poweroff -f\n"
		}},
	})
	b = boot("b", []linuxStep{
		{at: "action=shell", input: up("10.0.3.2", "B")},
		{at: "B-2-UP", do: func() string { <-aDone; return "poweroff -f\n" }},
	})

	ctx, cancel := context.WithTimeout(context.Background(), linuxTimeout)
	defer cancel()
	require.NoError(t, a.m.Start(ctx))
	require.NoError(t, b.m.Start(ctx))
	resA, errA := a.m.Wait()
	close(aDone)
	resB, errB := b.m.Wait()
	outA, _ := a.out.result()
	outB, _ := b.out.result()
	require.NoError(t, errA, "A:\n%s", outA)
	require.NoError(t, errB, "B:\n%s", outB)
	assert.Equal(t, kvm.StopPowerOff, resA.Reason, outA)
	assert.Equal(t, kvm.StopPowerOff, resB.Reason, outB)
	assert.Contains(t, outA, "PING-42-OK", "A pinged B through the switch; A:\n%s\nB:\n%s", outA, outB)
	assert.Contains(t, outA, "3 packets transmitted, 3 packets received")
	sa, sb := a.port.Stats(), b.port.Stats()
	t.Logf("switch ports: a %+v, b %+v", sa, sb)
	assert.GreaterOrEqual(t, sa.IngressFrames, uint64(3), "A's echo requests went through port a")
	assert.GreaterOrEqual(t, sb.IngressFrames, uint64(3), "B's echo replies went through port b")
}

// BenchmarkLinuxBoot measures a whole run of the test kernel (boot to init,
// power off) and reports the time to KVMKIT-INIT-OK.
func BenchmarkLinuxBoot(b *testing.B) {
	dir := linuxKernelDir(b)
	for _, kernel := range []string{"bzImage", "vmlinux"} {
		b.Run(kernel, func(b *testing.B) {
			var toInit time.Duration
			for b.Loop() {
				res := bootLinux(b, dir, linuxRun{kernel: kernel})
				if res.code != 0 || res.toInit == 0 {
					b.Fatalf("status %d, stderr %s", res.code, res.stderr)
				}
				toInit += res.toInit
			}
			b.ReportMetric(float64(toInit.Milliseconds())/float64(b.N), "ms-to-init/op")
		})
	}
}
