package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kvmkit/kvmkit/isolation"
	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

// Case is one test: a guest, how to run it and what to expect.
type Case struct {
	Name    string `json:"name"`
	Guest   string `json:"guest,omitempty"`   // an embedded guest
	Image   string `json:"image,omitempty"`   // a flat image file
	Mode    string `json:"mode,omitempty"`    // long (default) or real, for Image
	Kernel  string `json:"kernel,omitempty"`  // a Linux kernel
	Initrd  string `json:"initrd,omitempty"`  // with Kernel
	Cmdline string `json:"cmdline,omitempty"` // with Kernel
	Mem     string `json:"mem,omitempty"`     // RAM, e.g. 64M (default 64M, 256M for Kernel)
	CPUs    int    `json:"cpus,omitempty"`
	Input   string `json:"input,omitempty"` // fed to COM1
	// Timeout bounds the run (default 30s); past it the case fails.
	Timeout Duration `json:"timeout,omitempty"`
	// Watchdog, if set, fails a guest that makes no progress that long.
	Watchdog Duration `json:"watchdog,omitempty"`
	Expect   Expect   `json:"expect"`
}

// Expect is what a passing run looks like.
type Expect struct {
	ExitCode int    `json:"exit_code"`        // the exit-port code
	Output   string `json:"output,omitempty"` // a substring of COM1 output
	// Crash, if set, expects a guest crash whose reason contains it.
	Crash string `json:"crash,omitempty"`
}

// Duration is a time.Duration written as "5s" in JSON.
type Duration time.Duration

// UnmarshalJSON parses "5s" or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		*d = Duration(v)
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("duration: want a string like \"5s\"")
	}
	*d = Duration(n)
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// Result is the outcome of one case.
type Result struct {
	Name     string        `json:"name"`
	Passed   bool          `json:"passed"`
	Duration time.Duration `json:"duration_ns"`
	// Outcome says how the guest ended: "exit 0", "crash: ...", "timeout".
	Outcome string `json:"outcome"`
	// Reason explains a failure.
	Reason string `json:"reason,omitempty"`
	// Output is the tail of COM1 output.
	Output string `json:"output,omitempty"`
	// PrebuiltVM reports that the case ran in a VM built before it
	// started (see RunAll).
	PrebuiltVM bool `json:"prebuilt_vm"`
}

// maxSpecCases bounds a spec.
const maxSpecCases = 10000

// ParseSpec reads a JSON array of cases and checks each one.
func ParseSpec(r io.Reader) ([]Case, error) {
	dec := json.NewDecoder(io.LimitReader(r, 16<<20))
	dec.DisallowUnknownFields()
	var cases []Case
	if err := dec.Decode(&cases); err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	if len(cases) == 0 || len(cases) > maxSpecCases {
		return nil, fmt.Errorf("spec: %d cases, want 1..%d", len(cases), maxSpecCases)
	}
	seen := map[string]bool{}
	for i := range cases {
		c := &cases[i]
		if c.Name == "" {
			c.Name = "case" + strconv.Itoa(i+1)
		}
		if seen[c.Name] {
			return nil, fmt.Errorf("spec: case %q appears twice", c.Name)
		}
		seen[c.Name] = true
		if err := c.check(); err != nil {
			return nil, fmt.Errorf("spec: case %q: %w", c.Name, err)
		}
	}
	return cases, nil
}

func (c *Case) check() error {
	n := 0
	for _, s := range []string{c.Guest, c.Image, c.Kernel} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return errors.New("give exactly one of guest, image, kernel")
	}
	if c.Guest != "" {
		if _, err := guests.Lookup(c.Guest); err != nil {
			return err
		}
	}
	if _, err := machine.ParseMode(c.Mode); err != nil {
		return err
	}
	if c.Mem != "" {
		if _, err := parseSize(c.Mem); err != nil {
			return err
		}
	}
	if c.CPUs < 0 || c.CPUs > 64 {
		return fmt.Errorf("cpus %d: want 1..64", c.CPUs)
	}
	if c.Expect.ExitCode < 0 || c.Expect.ExitCode > 255 {
		return fmt.Errorf("expect.exit_code %d: want 0..255", c.Expect.ExitCode)
	}
	return nil
}

// BuiltinSuite is a regression suite over the embedded guests.
func BuiltinSuite() []Case {
	return []Case{
		{Name: "hello64", Guest: guests.Hello64, Expect: Expect{Output: "Hello from a kvmkit long-mode guest!"}},
		{Name: "hello16", Guest: guests.Hello16, Expect: Expect{Output: "Hello from a kvmkit real-mode guest!"}},
		{Name: "exit42", Guest: guests.Exit42, Expect: Expect{ExitCode: 42}},
		{Name: "exit42 real mode", Guest: guests.Exit42x16, Expect: Expect{ExitCode: 42}},
		{Name: "smp x4", Guest: guests.SMP, CPUs: 4, Expect: Expect{Output: "smp: 4 vCPUs up"}},
		{Name: "echo", Guest: guests.Echo, Input: "regression q", Expect: Expect{Output: "regression q"}},
		{Name: "triple fault is caught", Guest: guests.Triple, Expect: Expect{Crash: "triple fault"}},
		{Name: "hung guest is caught", Guest: guests.Idle, Watchdog: Duration(time.Second), Expect: Expect{Crash: "no progress"}},
	}
}

// RunAll runs cases, at most parallel at a time, and returns the results
// in the order of cases. The VMs are built ahead of the cases: a
// machine.Pool per VM shape (memory size, vCPUs) keeps up to parallel of
// them ready, builds no more than that shape's cases need, and is filled
// before the first case starts, so a case's time is its guest's. A case
// that finds no ready VM builds its own.
func RunAll(ctx context.Context, cases []Case, parallel int) []Result {
	pools := startPools(ctx, cases, parallel)
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	results := make([]Result, len(cases))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i] = runCase(ctx, cases[i], pools)
		}()
	}
	wg.Wait()
	return results
}

// vmShape is what a case's VM is built for.
type vmShape struct {
	mem  uint64
	cpus int
}

// machineConfig is the machine a case runs in, without its console.
func machineConfig(c Case) machine.Config {
	cfg := machine.Config{CPUs: c.CPUs, MemSize: 64 << 20, Watchdog: time.Duration(c.Watchdog), WatchConsole: c.Kernel != ""}
	if c.Kernel != "" {
		cfg.MemSize = 256 << 20
	}
	if c.Mem != "" {
		cfg.MemSize, _ = parseSize(c.Mem)
	}
	return cfg
}

func shapeOf(c Case) vmShape {
	cfg := machineConfig(c)
	return vmShape{mem: cfg.MemSize, cpus: max(cfg.CPUs, 1)}
}

// startPools starts a pool per shape and waits until each has its first
// VMs (or ctx ends: the cases then build their own).
func startPools(ctx context.Context, cases []Case, parallel int) map[vmShape]*machine.Pool {
	count := map[vmShape]int{}
	for _, c := range cases {
		count[shapeOf(c)]++
	}
	pools := map[vmShape]*machine.Pool{}
	quiet := slog.New(slog.DiscardHandler) // a failed build shows as the case's own error
	for sh, n := range count {
		p, err := machine.NewPool(machine.Config{MemSize: sh.mem, CPUs: sh.cpus, Logger: quiet},
			machine.PoolOptions{Size: min(n, parallel), Limit: n})
		if err == nil {
			pools[sh] = p
		}
	}
	for sh, p := range pools {
		_ = p.Wait(ctx, min(count[sh], parallel))
	}
	return pools
}

// outputBuffer keeps the first MiB of a guest's console output.
type outputBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

const maxOutput = 1 << 20

func (o *outputBuffer) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if room := maxOutput - o.buf.Len(); room > 0 {
		o.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (o *outputBuffer) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// Tail returns the last n bytes kept.
func (o *outputBuffer) Tail(n int) string {
	s := o.String()
	return s[max(0, len(s)-n):]
}

// RunCase runs one case in its own VM. It never panics: any failure of
// the guest or the VMM becomes a failed Result.
func RunCase(ctx context.Context, c Case) Result { return runCase(ctx, c, nil) }

// runCase runs c in a VM from its shape's pool when one is ready.
func runCase(ctx context.Context, c Case, pools map[vmShape]*machine.Pool) (res Result) {
	res.Name = c.Name
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			res.Passed, res.Outcome, res.Reason = false, "vmm error", fmt.Sprintf("panic: %v", p)
		}
		res.Duration = time.Since(start)
	}()
	timeout := time.Duration(c.Timeout)
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	out := &outputBuffer{}
	cfg := machineConfig(c)
	cfg.Serial = out
	cfg.Pool = pools[shapeOf(c)]
	if c.Input != "" {
		cfg.SerialIn = strings.NewReader(c.Input)
	}
	m, err := machine.New(cfg)
	if err != nil {
		res.Outcome, res.Reason = "vmm error", err.Error()
		return res
	}
	defer m.Close()
	res.PrebuiltVM = m.FromShell()
	if err := load(m, c); err != nil {
		res.Outcome, res.Reason = "load error", err.Error()
		return res
	}
	r, err := m.Run(ctx)
	res.Output = out.Tail(2048)
	var gc *kvm.GuestCrash
	switch {
	case errors.As(err, &gc):
		res.Outcome = "crash: " + gc.Error()
	case errors.Is(err, context.DeadlineExceeded):
		res.Outcome = fmt.Sprintf("timeout after %v", timeout)
	case err != nil:
		res.Outcome = "vmm error: " + err.Error()
	case r.Reason == kvm.StopExitPort:
		res.Outcome = fmt.Sprintf("exit %d", r.ExitCode)
	default:
		res.Outcome = r.Reason.String()
	}
	res.Passed, res.Reason = judge(c.Expect, r, err, gc, out.String())
	return res
}

func judge(e Expect, r kvm.Result, err error, gc *kvm.GuestCrash, output string) (bool, string) {
	if e.Crash != "" {
		if gc == nil {
			return false, "expected a guest crash (" + e.Crash + "), got none"
		}
		if !strings.Contains(gc.Error(), e.Crash) {
			return false, fmt.Sprintf("crash %q does not mention %q", gc.Error(), e.Crash)
		}
		return true, ""
	}
	if err != nil {
		return false, err.Error()
	}
	code := -1
	if r.Reason == kvm.StopExitPort {
		code = int(r.ExitCode)
	} else if r.Reason == kvm.StopPowerOff {
		code = 0
	}
	if code != e.ExitCode {
		return false, fmt.Sprintf("exit code %d, want %d", code, e.ExitCode)
	}
	if e.Output != "" && !strings.Contains(output, e.Output) {
		return false, fmt.Sprintf("output lacks %q", e.Output)
	}
	return true, ""
}

func load(m *machine.Machine, c Case) error {
	switch {
	case c.Guest != "":
		img, gm, err := guests.Get(c.Guest)
		if err != nil {
			return err
		}
		mode, _ := machine.ParseMode(gm.String())
		return m.LoadFlat(img, mode)
	case c.Image != "":
		img, err := os.ReadFile(c.Image)
		if err != nil {
			return err
		}
		mode, _ := machine.ParseMode(c.Mode)
		return m.LoadFlat(img, mode)
	default:
		k, err := os.ReadFile(c.Kernel)
		if err != nil {
			return err
		}
		var initrd []byte
		if c.Initrd != "" {
			if initrd, err = os.ReadFile(c.Initrd); err != nil {
				return err
			}
		}
		_, err = m.LoadLinux(k, initrd, c.Cmdline, machine.LinuxOptions{})
		return err
	}
}

// parseSize parses 4096, 64K, 128M, 1G; zero is refused.
func parseSize(s string) (uint64, error) {
	n, err := isolation.ParseSize(s)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("size %q: want e.g. 64M", s)
	}
	return uint64(n), nil
}
