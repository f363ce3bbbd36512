package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/isolation"
	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

// defaultGuest is the embedded guest `vmm run` boots without --image or
// --kernel.
const defaultGuest = guests.Hello64

// runFlags are the flags of `vmm run` (and `vmm receive`, which runs the
// incoming VM the same way).
type runFlags struct {
	image    string
	guest    string
	mode     string
	mem      string
	cpus     int
	kernel   string
	initrd   string
	cmdline  string
	stdinIn  bool
	onReset  string
	watchdog time.Duration
	noIRQ    bool
	control  string
	jail     jailFlags
	virtio   virtioFlags
}

func (f *runFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.image, "image", "", "flat bare-metal image to run (default: the embedded "+defaultGuest+" guest)")
	fl.StringVar(&f.guest, "guest", "", "run an embedded test guest by name (see vmm guests)")
	fl.StringVar(&f.mode, "mode", "long", "CPU mode of --image: long or real")
	fl.StringVar(&f.mem, "mem", "", "guest RAM size, e.g. 128M, 1G (default 128M; 256M with --kernel)")
	fl.IntVar(&f.cpus, "cpus", 1, "number of vCPUs")
	fl.StringVar(&f.kernel, "kernel", "", "Linux kernel to boot (bzImage, vmlinux ELF or PVH ELF)")
	fl.StringVar(&f.initrd, "initrd", "", "initial ramdisk for --kernel")
	fl.StringVar(&f.cmdline, "cmdline", "", "kernel command line for --kernel")
	fl.BoolVar(&f.stdinIn, "stdin", false, "feed standard input to COM1 (default: only when stdin is a terminal)")
	fl.StringVar(&f.onReset, "on-reset", "stop", "what a guest reset does: stop or restart")
	fl.DurationVar(&f.watchdog, "watchdog", 0, "report a crash when the guest makes no progress (exits, console output) for this long, e.g. 30s")
	fl.BoolVar(&f.noIRQ, "no-irqchip", false, "run without the in-kernel interrupt controllers and PIT")
	fl.StringVar(&f.control, "control", "", "serve the control API (HTTP/JSON) on this unix socket")
	f.jail.register(cmd)
	f.virtio.register(cmd)
}

func newRunCmd(env *cliEnv) *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run [flags]",
		Short: "Run a guest: a flat bare-metal image (default: an embedded demo) or a Linux kernel",
		Long: `Run a guest with COM1 on standard output. vmm exits with the code the guest
wrote to port 0xF4; 0 when the guest powers off; 120 with a one-line reason on
stderr when the guest crashes; 130/143 when stopped by SIGINT/SIGTERM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.validate(); err != nil {
				return &usageError{err}
			}
			if f.jail.enabled() && !env.jailed {
				return runJailed(cmd.Context(), env, &f)
			}
			return runGuest(cmd.Context(), env, &f)
		},
	}
	f.register(cmd)
	return cmd
}

func (f *runFlags) validate() error {
	n := 0
	for _, s := range []string{f.image, f.guest, f.kernel} {
		if s != "" {
			n++
		}
	}
	if n > 1 {
		return errors.New("--image, --guest and --kernel exclude each other")
	}
	if f.kernel == "" && (f.initrd != "" || f.cmdline != "") {
		return errors.New("--initrd and --cmdline need --kernel")
	}
	if _, err := machine.ParseMode(f.mode); err != nil {
		return fmt.Errorf("--mode: %w", err)
	}
	if f.mem != "" {
		if _, err := parseSize(f.mem); err != nil {
			return fmt.Errorf("--mem: %w", err)
		}
	}
	if f.cpus < 1 || f.cpus > 64 {
		return fmt.Errorf("--cpus %d: want 1..64", f.cpus)
	}
	if f.onReset != "stop" && f.onReset != "restart" {
		return fmt.Errorf("--on-reset %q: want stop or restart", f.onReset)
	}
	return f.virtio.validate()
}

func (f *runFlags) memSize() uint64 {
	if f.mem == "" {
		if f.kernel != "" {
			return 256 << 20
		}
		return machine.DefaultMemSize
	}
	n, _ := parseSize(f.mem)
	return n
}

// parseSize parses sizes like 4096, 64K, 128M, 1G, 2GiB (isolation's
// parser, which the jail flags use too); zero is refused.
func parseSize(s string) (uint64, error) {
	n, err := isolation.ParseSize(s)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix", s)
	}
	return uint64(n), nil
}

// buildMachine assembles a machine for f without loading a guest.
func buildMachine(env *cliEnv, f *runFlags) (*machine.Machine, error) {
	cfg := machine.Config{
		MemSize:      f.memSize(),
		CPUs:         f.cpus,
		Serial:       env.stdout,
		NoIRQChip:    f.noIRQ,
		WatchConsole: f.kernel != "",
		Watchdog:     f.watchdog,
	}
	if f.stdinIn || isTerminal(os.Stdin) {
		cfg.SerialIn = env.stdin
	}
	cfg.VCPUThreadInit = vcpuThreadInit(env, f)
	kvm.ReserveProcs(cfg.CPUs) // device goroutines must not wait for a vCPU's P
	m, err := machine.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := f.virtio.attach(env, m, f); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// guestFiles holds what the guest flags name, read before any VM exists
// so that a missing or unreadable file fails fast with its name.
type guestFiles struct {
	image          []byte
	mode           machine.Mode
	kernel, initrd []byte
}

func readGuest(f *runFlags) (*guestFiles, error) {
	g := &guestFiles{}
	var err error
	if f.kernel != "" {
		if g.kernel, err = os.ReadFile(f.kernel); err != nil {
			return nil, fmt.Errorf("--kernel: %w", err)
		}
		if f.initrd != "" {
			if g.initrd, err = os.ReadFile(f.initrd); err != nil {
				return nil, fmt.Errorf("--initrd: %w", err)
			}
		}
		return g, nil
	}
	g.image, g.mode, err = guestImage(f)
	return g, err
}

// load loads the guest into m.
func (g *guestFiles) load(m *machine.Machine, f *runFlags) error {
	if g.kernel == nil {
		if err := m.LoadFlat(g.image, g.mode); err != nil {
			return fmt.Errorf("guest image: %w", err)
		}
		return nil
	}
	cmdline := f.cmdline
	if extra := f.virtio.cmdline(); extra != "" {
		cmdline = strings.TrimSpace(cmdline + " " + extra)
	}
	if _, err := m.LoadLinux(g.kernel, g.initrd, cmdline, machine.LinuxOptions{}); err != nil {
		return fmt.Errorf("--kernel %s: %w", f.kernel, err)
	}
	return nil
}

func guestImage(f *runFlags) ([]byte, machine.Mode, error) {
	if f.image != "" {
		img, err := os.ReadFile(f.image)
		if err != nil {
			return nil, 0, fmt.Errorf("--image: %w", err)
		}
		mode, _ := machine.ParseMode(f.mode)
		return img, mode, nil
	}
	name := f.guest
	if name == "" {
		name = defaultGuest
	}
	img, gm, err := guests.Get(name)
	if err != nil {
		return nil, 0, fmt.Errorf("--guest: %w", err)
	}
	mode, _ := machine.ParseMode(gm.String())
	return img, mode, nil
}

// runGuest builds, loads and runs the guest until it stops, restarting it
// on reset when asked to.
func runGuest(ctx context.Context, env *cliEnv, f *runFlags) error {
	g, err := readGuest(f)
	if err != nil {
		return &exitError{code: exitFailure, msg: err.Error()}
	}
	for {
		m, err := buildMachine(env, f)
		if err != nil {
			return &exitError{code: exitFailure, msg: err.Error()}
		}
		if err := g.load(m, f); err != nil {
			m.Close()
			return &exitError{code: exitFailure, msg: err.Error()}
		}
		res, err := serveAndRun(ctx, env, f, m)
		m.Close()
		if res.Reason == kvm.StopReset && err == nil && f.onReset == "restart" {
			continue
		}
		return resultError(ctx, res, err)
	}
}

// resultError maps how a run ended to vmm's exit status.
func resultError(ctx context.Context, res kvm.Result, err error) error {
	if err != nil {
		var gc *kvm.GuestCrash
		switch {
		case errors.As(err, &gc):
			msg := gc.Error()
			if n := len(gc.Console); n > 0 {
				msg += fmt.Sprintf(" (last console line: %q)", gc.Console[n-1])
			}
			return &exitError{code: exitCrash, msg: msg}
		case errors.Is(err, context.Canceled):
			var se *signalError
			if errors.As(context.Cause(ctx), &se) {
				code := exitSIGINT
				if se.sig == syscall.SIGTERM {
					code = exitSIGTERM
				}
				return &exitError{code: code, msg: se.Error()}
			}
			return &exitError{code: exitFailure, msg: err.Error()}
		default:
			return &exitError{code: exitFailure, msg: err.Error()}
		}
	}
	switch res.Reason {
	case kvm.StopExitPort:
		if res.ExitCode == 0 {
			return nil
		}
		return &exitError{code: int(res.ExitCode)}
	case kvm.StopPowerOff, kvm.StopReset:
		return nil
	}
	return nil
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
