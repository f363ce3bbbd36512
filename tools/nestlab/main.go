// Command nestlab runs commands and Go tests inside the nested lab: an L1
// Linux guest under QEMU TCG (emulated AMD SVM) that has a real /dev/kvm.
//
//	nestlab run [flags] -- CMD ARGS...   run one command in L1
//	nestlab gotest [flags] PKG...        run Go test binaries in one L1 boot
//	nestlab exec BINARY ARGS...          for `go test -exec`
//	nestlab selftest [flags]             check /dev/kvm in L1 with kvmcheck
//	nestlab vmm VMM-ARGS...              build examples/vmm and run it: on this
//	                                     host's /dev/kvm if there is one, else in L1
//
// Exit status: the payload's, or 124 (timeout), 125 (L1/QEMU crashed),
// 126 (kvm modules / /dev/kvm failed), 130 (interrupted), 2 (usage).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/kvmkit/kvmkit/tools/nestlab/lab"
)

const usage = `usage:
  nestlab run [flags] -- CMD ARGS...
  nestlab gotest [flags] [--run RE] [--bench RE] [--benchtime D] PKG...
  nestlab exec BINARY ARGS...        (go test -exec 'go run github.com/kvmkit/kvmkit/tools/nestlab exec')
  nestlab selftest [flags] [--exits N]
  nestlab vmm VMM-ARGS...            (examples/vmm on /dev/kvm, or in L1 without one)
common flags: --mem 6G --cpus 1 --timeout 20m --stall 3m --file HOST:GUEST --env K=V --testkernel -v
`

// TestKernelGuestDir is where --testkernel packs the test kernel in L1.
const TestKernelGuestDir = "/lab/testkernel"

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// common holds the flags every subcommand takes.
type common struct {
	mem        string
	cpus       int
	timeout    time.Duration
	files      stringList
	env        stringList
	testkernel bool
	verbose    bool
	qemu       string
	machine    string
	kvmAMD     string
	cmdline    string
	stall      time.Duration
	nudges     int
	tcgThread  string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.mem, "mem", "6G", "L1 memory (QEMU -m)")
	fs.IntVar(&c.cpus, "cpus", 1, "L1 CPUs (more than one has wedged L1 under QEMU TCG when VMs are created and destroyed quickly)")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Minute, "kill L1 after this long")
	fs.DurationVar(&c.stall, "stall", 3*time.Minute, "kill L1 when its console, heartbeat included, is silent this long (0: never); the L1 CPU registers are printed first")
	fs.IntVar(&c.nudges, "nudges", 0, "before killing a stalled L1, send it an NMI (QEMU monitor) up to this many times per boot and go on when its heartbeat returns (it has not woken one yet)")
	fs.Var(&c.files, "file", "HOST:GUESTPATH to pack into L1 (file or directory; repeatable)")
	fs.Var(&c.env, "env", "K=V exported to the payload (repeatable)")
	fs.BoolVar(&c.testkernel, "testkernel", false, "build or reuse tools/testkernel and pack it at "+TestKernelGuestDir)
	fs.BoolVar(&c.verbose, "v", false, "log lab progress")
	fs.StringVar(&c.qemu, "qemu", "qemu-system-x86_64", "QEMU binary")
	fs.StringVar(&c.machine, "machine", "pc", "QEMU machine type")
	fs.StringVar(&c.tcgThread, "tcg-thread", "multi", "QEMU TCG threading: multi or single")
	fs.StringVar(&c.kvmAMD, "kvm-amd-params", "", "parameters for insmod kvm-amd.ko (e.g. nested=0)")
	fs.StringVar(&c.cmdline, "append", "", "extra L1 kernel parameters")
}

// app carries what the subcommands share.
type app struct {
	stdout, stderr io.Writer
	log            *slog.Logger
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	a := &app{stdout: stdout, stderr: stderr}
	var err error
	code := 0
	switch args[0] {
	case "run":
		code, err = a.cmdRun(ctx, args[1:])
	case "gotest":
		code, err = a.cmdGotest(ctx, args[1:])
	case "exec":
		code, err = a.cmdExec(ctx, args[1:])
	case "selftest":
		code, err = a.cmdSelftest(ctx, args[1:])
	case "vmm":
		code, err = a.cmdVMM(ctx, args[1:])
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "nestlab: unknown command %q\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "nestlab: %v\n%s", err, usage)
			return 2
		}
		fmt.Fprintln(stderr, oneLine(err.Error()))
		if code == 0 {
			code = lab.ExitStatus(err)
		}
	}
	return code
}

type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func oneLine(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", " | ") }

func (a *app) parse(name string, args []string, c *common, extra func(*flag.FlagSet)) ([]string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(a.stderr)
	c.register(fs)
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(args); err != nil {
		return nil, usageError{err.Error()}
	}
	if c.tcgThread != "multi" && c.tcgThread != "single" {
		return nil, usageError{fmt.Sprintf("--tcg-thread %q: want multi or single", c.tcgThread)}
	}
	level := slog.LevelWarn
	if c.verbose {
		level = slog.LevelInfo
	}
	a.log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
	return fs.Args(), nil
}

// prepare finds the host parts and packs --file and --testkernel.
func (a *app) prepare(ctx context.Context, c *common) (*lab.Host, *lab.Image, []string, error) {
	host, err := lab.FindHost("/")
	if err != nil {
		return nil, nil, nil, err
	}
	if _, err := exec.LookPath(c.qemu); err != nil {
		return nil, nil, nil, &lab.MissingError{What: "QEMU", Path: c.qemu, Package: "qemu-system-x86"}
	}
	im := lab.NewImage()
	for _, f := range c.files {
		h, g, ok := strings.Cut(f, ":")
		if !ok || h == "" || !strings.HasPrefix(g, "/") {
			return nil, nil, nil, usageError{fmt.Sprintf("--file %q: want HOST:/GUEST/PATH", f)}
		}
		if err := im.AddHost(g, h); err != nil {
			return nil, nil, nil, err
		}
	}
	env := append([]string(nil), c.env...)
	for _, kv := range env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return nil, nil, nil, usageError{fmt.Sprintf("--env %q: want K=V", kv)}
		}
	}
	if c.testkernel {
		dir, err := a.testKernel(ctx)
		if err != nil {
			return nil, nil, nil, err
		}
		for _, f := range []string{"bzImage", "vmlinux", "initramfs.cpio.gz"} {
			if err := im.AddHost(path.Join(TestKernelGuestDir, f), filepath.Join(dir, f)); err != nil {
				return nil, nil, nil, err
			}
		}
		env = append(env, "KVMKIT_TEST_KERNEL_DIR="+TestKernelGuestDir)
	}
	return host, im, env, nil
}

// testKernel returns the host directory of the test kernel: the one named
// by $KVMKIT_TEST_KERNEL_DIR, or the output of tools/testkernel/build.sh
// (which reuses its cache).
func (a *app) testKernel(ctx context.Context) (string, error) {
	if d := os.Getenv("KVMKIT_TEST_KERNEL_DIR"); d != "" {
		return d, nil
	}
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("nestlab: --testkernel: cannot find the kvmkit module root (go env GOMOD): run inside the repository")
	}
	script := filepath.Join(filepath.Dir(gomod), "tools", "testkernel", "build.sh")
	a.log.Info("building or reusing the test kernel", "script", script)
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Stderr = a.stderr
	out, err = cmd.Output()
	if err != nil {
		return "", fmt.Errorf("nestlab: %s: %w", script, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1], nil
}

func (a *app) options(c *common) lab.Options {
	return lab.Options{
		QEMU: c.qemu, Mem: c.mem, CPUs: c.cpus, Machine: c.machine, TCGThread: c.tcgThread,
		Timeout: c.timeout, Stall: c.stall, Nudges: c.nudges, Cmdline: c.cmdline, Output: a.stdout, Logger: a.log,
	}
}

func (a *app) spec(c *common, im *lab.Image, env []string, payload, workdir string) lab.Spec {
	s := lab.Spec{Payload: payload, Workdir: workdir, Env: env, Files: im}
	if c.kvmAMD != "" {
		s.ModuleParams = map[string]string{"kvm-amd": c.kvmAMD}
	}
	return s
}

func (a *app) summary(res *lab.Result, err error) {
	if res == nil {
		return
	}
	status := "exit " + fmt.Sprint(res.ExitCode)
	if err != nil {
		status = "lab failure"
	}
	fmt.Fprintf(a.stderr, "nestlab: L1 /init at %.1fs, payload start %.1fs, total %.1fs (initramfs %d MiB), %s\n",
		res.BootAt.Seconds(), res.StartAt.Seconds(), res.Wall.Seconds(), res.ImageBytes>>20, status)
	if err != nil && len(res.Tail) > 0 {
		fmt.Fprintln(a.stderr, "nestlab: last L1 console lines:")
		for _, l := range res.Tail {
			fmt.Fprintln(a.stderr, "  | "+l)
		}
	}
	if len(res.CPU) > 0 {
		fmt.Fprintln(a.stderr, "nestlab: L1 CPU when it stalled (QEMU monitor):")
		for _, l := range res.CPU {
			fmt.Fprintln(a.stderr, "  | "+l)
		}
	}
}

func (a *app) cmdRun(ctx context.Context, args []string) (int, error) {
	var c common
	rest, err := a.parse("run", args, &c, nil)
	if err != nil {
		return 0, err
	}
	if len(rest) == 0 {
		return 0, usageError{"run: missing command (nestlab run [flags] -- CMD ARGS...)"}
	}
	host, im, env, err := a.prepare(ctx, &c)
	if err != nil {
		return 0, err
	}
	// A relative host path (./prog) is packed and run from /lab/bin.
	if strings.Contains(rest[0], "/") && !strings.HasPrefix(rest[0], "/") {
		g := path.Join(lab.GuestBinDir, filepath.Base(rest[0]))
		if err := lab.AddExecutable(ctx, im, g, rest[0]); err != nil {
			return 0, err
		}
		rest = append([]string{g}, rest[1:]...)
	}
	res, err := lab.Boot(ctx, host, a.spec(&c, im, env, lab.CommandPayload(rest), "/"), a.options(&c))
	a.summary(res, err)
	if err != nil {
		return 0, err
	}
	return res.ExitCode, nil
}

// cmdVMM builds examples/vmm and runs it with args: directly where this
// host has /dev/kvm, otherwise inside L1. The exit status is vmm's.
func (a *app) cmdVMM(ctx context.Context, args []string) (int, error) {
	tmp, err := os.MkdirTemp("", "nestlab-vmm-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "vmm")
	g := lab.GoTool{Stderr: a.stderr}
	if err := g.Build(ctx, "github.com/kvmkit/kvmkit/examples/vmm", bin); err != nil {
		return 0, err
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, a.stdout, a.stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), nil
		}
		return 0, err
	}
	fmt.Fprintln(a.stderr, "nestlab: no /dev/kvm on this host: running vmm in the nested lab (QEMU TCG, emulated SVM)")
	var c common
	if _, err := a.parse("vmm", []string{"--mem", "2G", "--timeout", "10m"}, &c, nil); err != nil {
		return 0, err
	}
	host, im, env, err := a.prepare(ctx, &c)
	if err != nil {
		return 0, err
	}
	if err := lab.AddExecutable(ctx, im, "/lab/bin/vmm", bin); err != nil {
		return 0, err
	}
	payload := lab.CommandPayload(append([]string{"/lab/bin/vmm"}, args...))
	res, err := lab.Boot(ctx, host, a.spec(&c, im, env, payload, "/"), a.options(&c))
	a.summary(res, err)
	if err != nil {
		return 0, err
	}
	return res.ExitCode, nil
}

func (a *app) cmdSelftest(ctx context.Context, args []string) (int, error) {
	var c common
	exits := 0
	rest, err := a.parse("selftest", args, &c, func(fs *flag.FlagSet) {
		fs.IntVar(&exits, "exits", 20000, "time this many L2 port-I/O exits")
	})
	if err != nil {
		return 0, err
	}
	if len(rest) != 0 {
		return 0, usageError{"selftest takes no arguments"}
	}
	host, im, env, err := a.prepare(ctx, &c)
	if err != nil {
		return 0, err
	}
	tmp, err := os.MkdirTemp("", "nestlab-selftest-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "kvmcheck")
	g := lab.GoTool{Stderr: a.stderr}
	if err := g.Build(ctx, "github.com/kvmkit/kvmkit/tools/nestlab/kvmcheck", bin); err != nil {
		return 0, err
	}
	if err := lab.AddExecutable(ctx, im, "/lab/bin/kvmcheck", bin); err != nil {
		return 0, err
	}
	payload := lab.CommandPayload([]string{"/lab/bin/kvmcheck", "-exits", fmt.Sprint(exits)})
	res, err := lab.Boot(ctx, host, a.spec(&c, im, env, payload, "/"), a.options(&c))
	a.summary(res, err)
	if err != nil {
		return 0, err
	}
	return res.ExitCode, nil
}

func (a *app) cmdExec(ctx context.Context, args []string) (int, error) {
	// go test -exec passes the binary and its -test.* flags; nestlab's own
	// flags come from NESTLAB_FLAGS (e.g. "--mem 4G --testkernel").
	var c common
	if _, err := a.parse("exec", strings.Fields(os.Getenv("NESTLAB_FLAGS")), &c, nil); err != nil {
		return 0, err
	}
	if len(args) == 0 {
		return 0, usageError{"exec: missing BINARY"}
	}
	host, im, env, err := a.prepare(ctx, &c)
	if err != nil {
		return 0, err
	}
	bin := path.Join(lab.GuestBinDir, filepath.Base(args[0]))
	if err := lab.AddExecutable(ctx, im, bin, args[0]); err != nil {
		return 0, err
	}
	wd, err := os.Getwd()
	if err != nil {
		return 0, err
	}
	if err := lab.AddPackageDir(im, "/lab/work", wd); err != nil {
		return 0, err
	}
	opts := a.options(&c)
	opts.PayloadOnly = !c.verbose
	payload := lab.CommandPayload(append([]string{bin}, args[1:]...))
	res, err := lab.Boot(ctx, host, a.spec(&c, im, env, payload, "/lab/work"), opts)
	if err != nil {
		a.summary(res, err)
		return 0, err
	}
	return res.ExitCode, nil
}

func (a *app) cmdGotest(ctx context.Context, args []string) (int, error) {
	var c common
	var runRE, benchRE, benchtime, count string
	var pkgTimeout time.Duration
	var resume int
	rest, err := a.parse("gotest", args, &c, func(fs *flag.FlagSet) {
		fs.DurationVar(&pkgTimeout, "pkgtimeout", 0, "-test.timeout for every package (default: --timeout); a hung package then panics with its goroutines' stacks and the next package runs")
		fs.StringVar(&runRE, "run", "", "-test.run for every package")
		fs.StringVar(&benchRE, "bench", "", "-test.bench for every package")
		fs.StringVar(&benchtime, "benchtime", "", "-test.benchtime for every package")
		fs.StringVar(&count, "count", "", "-test.count for every package")
		fs.IntVar(&resume, "resume", 2, "when L1 itself hangs, stalls or dies, boot a fresh one up to this many times to run the unfinished packages (skipping the top-level tests they finished)")
	})
	if err != nil {
		return 0, err
	}
	if len(rest) == 0 {
		return 0, usageError{"gotest: no packages"}
	}
	for _, re := range []string{runRE, benchRE} {
		if _, err := regexp.Compile(re); err != nil {
			return 0, usageError{fmt.Sprintf("bad regexp %q: %v", re, err)}
		}
	}
	host, im, env, err := a.prepare(ctx, &c)
	if err != nil {
		return 0, err
	}
	g := lab.GoTool{Stderr: a.stderr}
	listed, err := g.ListPackages(ctx, rest)
	if err != nil {
		return 0, err
	}
	tmp, err := os.MkdirTemp("", "nestlab-gotest-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(tmp)
	var pkgs []lab.TestPackage
	buildFailed := false
	for _, p := range listed {
		if p.TestFiles == 0 {
			fmt.Fprintf(a.stdout, "?   \t%s\t[no test files]\n", p.ImportPath)
			continue
		}
		bin := filepath.Join(tmp, fmt.Sprintf("%d.test", len(pkgs)))
		if err := g.BuildTest(ctx, p.ImportPath, bin); err != nil {
			fmt.Fprintf(a.stdout, "FAIL\t%s [build failed]\n", p.ImportPath)
			buildFailed = true
			continue
		}
		if _, err := os.Stat(bin); err != nil { // e.g. only test files without tests
			fmt.Fprintf(a.stdout, "?   \t%s\t[no test files]\n", p.ImportPath)
			continue
		}
		i := len(pkgs)
		if err := lab.AddExecutable(ctx, im, fmt.Sprintf("%s/%d.test", lab.GuestBinDir, i), bin); err != nil {
			return 0, err
		}
		if err := lab.AddPackageDir(im, fmt.Sprintf("%s/%d", lab.GuestPkgDir, i), p.Dir); err != nil {
			return 0, err
		}
		pkgs = append(pkgs, lab.TestPackage{ImportPath: p.ImportPath, Dir: p.Dir, Binary: bin})
	}
	if len(pkgs) == 0 {
		if buildFailed {
			return 1, nil
		}
		return 0, nil
	}
	var targs []string
	for _, f := range []struct{ name, val string }{{"run", runRE}, {"bench", benchRE}, {"benchtime", benchtime}, {"count", count}} {
		if f.val != "" {
			targs = append(targs, "-test."+f.name+"="+f.val)
		}
	}
	if pkgTimeout <= 0 {
		pkgTimeout = c.timeout
	}
	targs = append(targs, "-test.timeout="+pkgTimeout.String())

	opts := a.options(&c)
	rep := newPkgReporter(a.stdout, pkgs)
	opts.OnMarker = rep.marker
	opts.OnLine = rep.line
	var res *lab.Result
	for attempt := 0; ; attempt++ {
		runs := rep.remaining(targs)
		if len(runs) == 0 {
			// Every package reported its end before L1 was lost (at power
			// off, say): the packages' own results stand.
			err = nil
			break
		}
		res, err = lab.Boot(ctx, host, a.spec(&c, im, env, lab.GoTestRunsPayload(runs), "/"), opts)
		a.summary(res, err)
		if err == nil || !resumable(err) || attempt >= resume {
			break
		}
		runs = rep.remaining(targs)
		fmt.Fprintf(a.stderr, "nestlab: LAB RESUME %d/%d: %v; a fresh L1 runs the %d unfinished package(s), skipping the %d top-level test(s) they already finished\n",
			attempt+1, resume, err, len(runs), rep.skipped())
	}
	rep.unfinished()
	if err != nil {
		return 0, err
	}
	if buildFailed || rep.failed || (res != nil && res.ExitCode != 0) {
		return 1, nil
	}
	return 0, nil
}

// resumable reports whether a gotest boot that ended with err is worth
// continuing in a fresh L1: L1 itself hung, stalled or died (QEMU's
// emulated nested SVM is not perfectly stable), as opposed to an
// interrupt or a QEMU that cannot start.
func resumable(err error) bool {
	return errors.Is(err, lab.ErrTimeout) || errors.Is(err, lab.ErrStalled) ||
		errors.Is(err, lab.ErrCrashed) || errors.Is(err, lab.ErrNoKVM)
}
