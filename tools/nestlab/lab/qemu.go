package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Errors a boot can end with; a *BootError matches one of them with
// errors.Is.
var (
	ErrTimeout  = errors.New("nestlab: L1 timed out")
	ErrNoKVM    = errors.New("nestlab: L1 has no working /dev/kvm")
	ErrCrashed  = errors.New("nestlab: L1 ended without an exit marker")
	ErrQEMU     = errors.New("nestlab: QEMU failed")
	ErrCanceled = errors.New("nestlab: interrupted")
	ErrStalled  = errors.New("nestlab: L1 stalled")
)

// Exit statuses the nestlab command uses when the payload's own status is
// not available.
const (
	ExitTimeout = 124 // L1 hung past the timeout (like timeout(1))
	ExitCrashed = 125 // L1 or QEMU died without reporting the payload status
	ExitNoKVM   = 126 // kvm modules failed to load or /dev/kvm is missing
	ExitSignal  = 130 // interrupted (SIGINT/SIGTERM)
)

// BootError is a lab failure (not a payload failure).
type BootError struct {
	Kind   error  // one of ErrTimeout, ErrStalled, ErrNoKVM, ErrCrashed, ErrQEMU, ErrCanceled
	Reason string // one-line detail
}

func (e *BootError) Error() string { return e.Kind.Error() + ": " + e.Reason }

// Unwrap returns the kind so errors.Is works.
func (e *BootError) Unwrap() error { return e.Kind }

// ExitStatus maps a Boot error to the nestlab command's exit status.
func ExitStatus(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrTimeout), errors.Is(err, ErrStalled):
		return ExitTimeout
	case errors.Is(err, ErrNoKVM):
		return ExitNoKVM
	case errors.Is(err, ErrCanceled):
		return ExitSignal
	}
	return ExitCrashed
}

// Spec is what to run in one L1 boot.
type Spec struct {
	Payload      string            // payload shell script (see CommandPayload)
	Workdir      string            // payload working directory in the guest
	Env          []string          // K=V exported to the payload (KVMKIT_NESTLAB=1 is always added)
	Files        *Image            // extra files to pack (may be nil)
	ModuleParams map[string]string // module name -> parameters, e.g. "kvm-amd": "npt=1"
	Heartbeat    time.Duration     // ALIVE marker period while the payload runs; 0: none (Boot sets it from Options.Stall)
}

// Options control QEMU and output handling.
type Options struct {
	QEMU    string // QEMU binary; default "qemu-system-x86_64"
	Mem     string // guest memory, default "6G"
	CPUs    int    // L1 CPUs, default 1 (see nestlab --cpus)
	Machine string // QEMU machine, default "pc"
	// TCGThread is QEMU's -accel tcg,thread=: "multi" (default) or
	// "single".
	TCGThread string
	Timeout   time.Duration // whole-boot limit, default 20m
	// Stall, when positive, ends the boot with ErrStalled once L1 has
	// printed nothing, not even its heartbeat, for this long after /init
	// started: L1 itself has stopped (QEMU's emulation of nested SVM
	// has wedged it), which no test timeout inside L1 can report. The
	// L1 CPU registers are read from the QEMU monitor first (Result.CPU).
	Stall time.Duration
	// Nudges is how many times a stalled L1 is first sent an NMI through
	// the QEMU monitor: when its heartbeat comes back the boot goes on
	// (Result.Nudges counts them).
	Nudges      int
	Cmdline     string       // extra kernel parameters
	Output      io.Writer    // serial console lines; nil discards
	PayloadOnly bool         // forward only the payload's lines to Output
	OnMarker    func(Marker) // called for each marker line, in order
	OnLine      func(string) // called for each console line (markers included), in order
	TempDir     string       // where the initramfs is written; default os.TempDir()
	Logger      *slog.Logger // progress messages; nil discards
}

// Result describes a finished boot.
type Result struct {
	ExitCode   int           // payload exit status (valid when err == nil)
	BootAt     time.Duration // wall time from QEMU start to /init running
	StartAt    time.Duration // wall time from QEMU start to the payload starting
	Wall       time.Duration // total wall time of QEMU
	ImageBytes int64         // size of the initramfs
	Tail       []string      // last console lines (for diagnostics)
	CPU        []string      // on a stall: L1 CPU state from the QEMU monitor, two samples
	Nudges     int           // stalls that an NMI ended (see Options.Nudges)
}

const tailLines = 40

var ansiEscape = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|c)`)

func (o *Options) defaults() {
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Mem == "" {
		o.Mem = "6G"
	}
	if o.CPUs <= 0 {
		o.CPUs = 1
	}
	if o.Machine == "" {
		o.Machine = "pc"
	}
	if o.TCGThread == "" {
		o.TCGThread = "multi"
	}
	if o.Timeout <= 0 {
		o.Timeout = 20 * time.Minute
	}
	if o.Output == nil {
		o.Output = io.Discard
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
}

// BuildImage assembles the L1 initramfs: busybox with applet links, the
// decompressed modules, /init, the payload and spec.Files.
func BuildImage(ctx context.Context, host *Host, spec Spec) (*Image, error) {
	im := spec.Files
	if im == nil {
		im = NewImage()
	}
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/root", "/etc", "/lab"} {
		if err := im.AddDir(d); err != nil {
			return nil, err
		}
	}
	if err := im.AddHost("/bin/busybox", host.Busybox); err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, host.Busybox, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("nestlab: %s --list-full: %w", host.Busybox, err)
	}
	for _, a := range strings.Fields(string(out)) {
		if a == "bin/busybox" {
			continue
		}
		if err := im.AddSymlink("/"+a, "/bin/busybox"); err != nil {
			return nil, err
		}
	}
	var mods []InitModule
	for _, m := range host.Modules {
		data, err := ReadModule(ctx, m)
		if err != nil {
			return nil, err
		}
		p := path.Join(GuestModuleDir, m.Name+".ko")
		if err := im.AddFile(p, 0o644, data); err != nil {
			return nil, err
		}
		mods = append(mods, InitModule{Path: p, Params: spec.ModuleParams[m.Name]})
	}
	env := append([]string{"KVMKIT_NESTLAB=1"}, spec.Env...)
	initScript := InitScript(InitConfig{Modules: mods, Env: env, Workdir: spec.Workdir, Payload: GuestPayload, Heartbeat: spec.Heartbeat})
	if err := im.AddFile("/init", 0o755, []byte(initScript)); err != nil {
		return nil, err
	}
	if err := im.AddFile(GuestPayload, 0o755, []byte(spec.Payload)); err != nil {
		return nil, err
	}
	return im, nil
}

// Boot builds the initramfs, boots L1 under QEMU TCG with an emulated SVM
// CPU, streams the serial console and returns when QEMU exits. A nil error
// means the payload ran; its status is Result.ExitCode. The timeout and
// ctx both kill QEMU.
func Boot(ctx context.Context, host *Host, spec Spec, opts Options) (*Result, error) {
	opts.defaults()
	if opts.Stall > 0 && spec.Heartbeat <= 0 {
		spec.Heartbeat = max(opts.Stall/6, time.Second)
	}
	im, err := BuildImage(ctx, host, spec)
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(opts.TempDir, "nestlab-*.cpio")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	bw := bufio.NewWriterSize(f, 1<<20)
	n, err := im.WriteTo(bw)
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("nestlab: writing initramfs: %w", err)
	}
	res, err := runQEMU(ctx, host, f.Name(), opts)
	if res != nil {
		res.ImageBytes = n
	}
	return res, err
}

// QEMUArgs returns the QEMU command line for booting kernel with initrd.
// With monitor set, the human monitor listens on that unix socket.
func QEMUArgs(opts Options, kernel, initrd, monitor string) []string {
	opts.defaults()
	// nohz=off highres=off: L1 keeps a periodic tick and low-resolution
	// timers. With the defaults (tickless, one-shot LAPIC timer) L1 under
	// QEMU 7.2's emulated nested SVM stopped for good in 10 of 13 boots
	// that ran Linux guests: halted with interrupts enabled and its timer
	// vector pending in the LAPIC, or spinning in an L2 guest that waited
	// for a vCPU only an L1 timer interrupt would schedule (an NMI from the
	// monitor did not wake it either). With these two parameters it has not
	// happened since (see README.md).
	cmdline := "console=ttyS0 panic=-1 oops=panic quiet loglevel=3 mitigations=off nokaslr nohz=off highres=off"
	if opts.Cmdline != "" {
		cmdline += " " + opts.Cmdline
	}
	mon := "none"
	if monitor != "" {
		mon = "unix:" + monitor + ",server=on,wait=off"
	}
	return []string{
		"-accel", "tcg,thread=" + opts.TCGThread,
		"-cpu", "max",
		"-machine", opts.Machine,
		"-smp", fmt.Sprint(opts.CPUs),
		"-m", opts.Mem,
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-serial", "stdio",
		"-monitor", mon,
		"-no-reboot",
		"-kernel", kernel,
		"-initrd", initrd,
		"-append", cmdline,
	}
}

func runQEMU(ctx context.Context, host *Host, initrd string, opts Options) (*Result, error) {
	tctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	monitor := ""
	if opts.Stall > 0 {
		dir, err := os.MkdirTemp(opts.TempDir, "nestlab-mon-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		monitor = filepath.Join(dir, "monitor.sock")
	}
	args := QEMUArgs(opts, host.Kernel, initrd, monitor)
	opts.Logger.Info("booting L1", "qemu", opts.QEMU, "args", strings.Join(args, " "))
	cmd := exec.CommandContext(tctx, opts.QEMU, args...)
	// QEMU runs in its own process group; cancellation kills the group so
	// nothing it spawned keeps the console pipe open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &limitedBuffer{buf: &stderr, max: 64 << 10}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, &BootError{Kind: ErrQEMU, Reason: err.Error()}
	}
	res := &Result{}
	w := &watcher{opts: opts, res: res, start: start, last: start}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.read(stdout)
	}()
	stalled := false // set by the stall watcher, read after stallDone
	sctx, scancel := context.WithCancel(tctx)
	defer scancel()
	stallDone := make(chan struct{})
	if opts.Stall <= 0 {
		close(stallDone)
	} else {
		go func() {
			defer close(stallDone)
			for nudges := 0; w.waitStall(sctx); nudges++ {
				sample := monitorSample(monitor, host.SystemMap())
				if nudges < opts.Nudges && w.nudge(sctx, monitor) {
					w.print(fmt.Sprintf("nestlab: L1 was silent for %v; an NMI from the QEMU monitor woke it (nudge %d of %d)", opts.Stall, nudges+1, opts.Nudges))
					for _, l := range sample {
						w.print("nestlab:   | " + l)
					}
					res.Nudges++
					continue
				}
				if sctx.Err() != nil {
					return // the boot ended while L1 was being nudged
				}
				res.CPU = sample
				stalled = true
				_ = cmd.Cancel()
				return
			}
		}()
	}
	wg.Wait()
	werr := cmd.Wait()
	scancel()
	<-stallDone
	res.Wall = time.Since(start)
	res.Tail = w.tail

	switch {
	case ctx.Err() != nil:
		return res, &BootError{Kind: ErrCanceled, Reason: "QEMU killed: " + context.Cause(ctx).Error()}
	case stalled:
		return res, &BootError{Kind: ErrStalled, Reason: fmt.Sprintf("no console output, not even the heartbeat, for %v after %v; QEMU killed", opts.Stall, w.lastLine().Sub(start).Round(time.Second))}
	case tctx.Err() != nil:
		return res, &BootError{Kind: ErrTimeout, Reason: fmt.Sprintf("no exit after %v; QEMU killed", opts.Timeout)}
	case w.labErr != "":
		return res, &BootError{Kind: ErrNoKVM, Reason: w.labErr}
	case w.exited:
		res.ExitCode = w.code
		return res, nil
	case w.panic != "":
		return res, &BootError{Kind: ErrCrashed, Reason: w.panic}
	case werr != nil:
		return res, &BootError{Kind: ErrQEMU, Reason: fmt.Sprintf("%v: %s", werr, lastLine(stderr.String()))}
	}
	reason := "QEMU exited before the payload reported its status"
	if !w.booted {
		reason = "L1 never reached /init"
	}
	if s := lastLine(stderr.String()); s != "" {
		reason += ": " + s
	}
	return res, &BootError{Kind: ErrCrashed, Reason: reason}
}

// watcher consumes the serial console.
type watcher struct {
	opts    Options
	res     *Result
	start   time.Time
	mu      sync.Mutex // guards last, alive
	last    time.Time  // when the last line arrived
	alive   int        // ALIVE markers seen
	outMu   sync.Mutex // serializes writes to opts.Output
	tail    []string
	booted  bool // guarded by mu
	closed  bool // console ended; guarded by mu
	started bool
	exited  bool
	code    int
	labErr  string
	panic   string
}

func (w *watcher) read(r io.Reader) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			w.line(string(line))
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			w.mu.Lock()
			w.closed = true
			w.mu.Unlock()
			return
		}
	}
}

// lastLine returns when the last console line arrived.
func (w *watcher) lastLine() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last
}

// waitStall returns true once L1 has booted and then printed nothing for
// opts.Stall, false when ctx ends or the console closes first.
func (w *watcher) waitStall(ctx context.Context) bool {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
		w.mu.Lock()
		booted, done, last := w.booted, w.closed, w.last
		w.mu.Unlock()
		if done {
			return false
		}
		if booted && time.Since(last) > w.opts.Stall {
			return true
		}
	}
}

// nudge sends L1 an NMI through the QEMU monitor and reports whether a
// heartbeat arrived within opts.Stall afterwards.
func (w *watcher) nudge(ctx context.Context, monitor string) bool {
	w.mu.Lock()
	before := w.alive
	w.mu.Unlock()
	if _, err := monitorCommand(monitor, "nmi", 5*time.Second); err != nil {
		return false
	}
	woke := func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.alive > before
	}
	deadline := time.Now().Add(w.opts.Stall)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(200 * time.Millisecond)
		if woke() {
			return true
		}
	}
	return woke()
}

func (w *watcher) line(raw string) {
	w.mu.Lock()
	w.last = time.Now()
	w.mu.Unlock()
	s := ansiEscape.ReplaceAllString(strings.TrimRight(raw, "\r\n"), "")
	s = strings.ReplaceAll(s, "\r", "")
	w.tail = append(w.tail, s)
	if len(w.tail) > tailLines {
		w.tail = w.tail[1:]
	}
	if w.opts.OnLine != nil {
		w.opts.OnLine(s)
	}
	if i := strings.Index(s, "Kernel panic - not syncing"); i >= 0 {
		w.panic = strings.TrimSpace(s[i:])
	}
	m, isMarker := ParseMarker(s)
	if isMarker {
		switch m.Kind {
		case MarkerBoot:
			w.mu.Lock()
			w.booted = true
			w.mu.Unlock()
			w.res.BootAt = time.Since(w.start)
		case MarkerStart:
			w.started = true
			w.res.StartAt = time.Since(w.start)
		case MarkerExit:
			w.exited, w.code = true, m.Code
		case MarkerError:
			w.labErr = m.Value
		}
		if w.opts.OnMarker != nil {
			w.opts.OnMarker(m)
		}
	}
	if isMarker && m.Kind == MarkerAlive {
		w.mu.Lock()
		w.alive++
		w.mu.Unlock()
		return // heartbeats only feed the stall check
	}
	if w.opts.PayloadOnly && (isMarker || !w.started || w.exited) {
		return
	}
	w.print(s)
}

// print writes one line to opts.Output.
func (w *watcher) print(s string) {
	w.outMu.Lock()
	defer w.outMu.Unlock()
	fmt.Fprintln(w.opts.Output, s)
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// limitedBuffer keeps at most max bytes (the rest is dropped).
type limitedBuffer struct {
	buf *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.max - l.buf.Len(); room > 0 {
		if len(p) > room {
			l.buf.Write(p[:room])
		} else {
			l.buf.Write(p)
		}
	}
	return len(p), nil
}
