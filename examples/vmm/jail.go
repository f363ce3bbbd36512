package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/isolation"
	"github.com/kvmkit/kvmkit/isolation/jail"
	"github.com/kvmkit/kvmkit/isolation/seccomp"
)

// jailFlags are the isolation flags of `vmm run` and `vmm receive`.
type jailFlags struct {
	dir      string
	uid, gid int
	cpuQuota string
	memLimit string
	seccomp  string
	selinux  string
}

func (j *jailFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&j.dir, "jail", "", "run the VMM jailed (namespaces, pivot_root, no capabilities) in this directory")
	fl.IntVar(&j.uid, "uid", 65534, "with --jail: user id the VMM runs as")
	fl.IntVar(&j.gid, "gid", 65534, "with --jail: group id the VMM runs as")
	fl.StringVar(&j.cpuQuota, "cpu-quota", "", "with --jail: CPU quota of the VM's cgroup, e.g. 50%")
	fl.StringVar(&j.memLimit, "mem-limit", "", "with --jail: memory limit of the VM's cgroup, e.g. 256M")
	fl.StringVar(&j.seccomp, "seccomp", "enforce", "with --jail: seccomp filter mode: enforce, audit or off")
	fl.StringVar(&j.selinux, "selinux", "auto", "with --jail: SELinux sVirt labels: auto or off")
}

func (j *jailFlags) enabled() bool { return j.dir != "" }

// runJailed re-executes vmm inside a jail built from f.jail; the jailed
// copy runs the guest exactly as `vmm run` would and its exit status is
// passed through.
func runJailed(ctx context.Context, env *cliEnv, f *runFlags) error {
	cfg, err := isolation.ConfigFromFlags(isolation.Flags{
		Jail: f.jail.dir, UID: f.jail.uid, GID: f.jail.gid,
		CPUQuota: f.jail.cpuQuota, MemLimit: f.jail.memLimit,
		Seccomp: f.jail.seccomp, SELinux: f.jail.selinux,
	})
	if err != nil {
		return &usageError{err}
	}
	for _, p := range []string{f.image, f.kernel, f.initrd} {
		if p == "" {
			continue
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return err
		}
		cfg.Jail.Binds = append(cfg.Jail.Binds, jail.Bind{Source: abs})
	}
	for _, d := range f.virtio.disks {
		abs, err := filepath.Abs(d.path)
		if err != nil {
			return err
		}
		cfg.Images = append(cfg.Images, abs)
	}
	cfg.GuestMemory = int64(f.memSize())
	cfg.Args = jailedArgs(env.args)
	cfg.Stdin, cfg.Stdout, cfg.Stderr = env.stdin, env.stdout, env.stderr
	cfg.Logger = slog.Default()
	res, err := isolation.Launch(ctx, cfg)
	if err != nil {
		var mle *isolation.MemoryLimitError
		if errors.As(err, &mle) {
			return &exitError{code: exitFailure, msg: err.Error()}
		}
		return &exitError{code: exitFailure, msg: fmt.Sprintf("jail: %v", err)}
	}
	if res.ExitCode != 0 {
		return &exitError{code: res.ExitCode}
	}
	return nil
}

// jailedArgs rewrites paths in args to absolute ones: the jailed VMM sees
// its files at their host paths.
func jailedArgs(args []string) []string {
	out := make([]string, len(args))
	copy(out, args)
	for i := 0; i < len(out)-1; i++ {
		switch out[i] {
		case "--image", "--kernel", "--initrd":
			if abs, err := filepath.Abs(out[i+1]); err == nil {
				out[i+1] = abs
			}
		}
	}
	return out
}

// vcpuThreadInit returns, in the jailed VMM, the function that gives each
// vCPU thread the narrower vCPU seccomp filter on top of the process one.
func vcpuThreadInit(env *cliEnv, f *runFlags) func(int) error {
	if !env.jailed {
		return nil
	}
	mode, err := seccomp.ParseMode(f.jail.seccomp)
	if err != nil || mode == seccomp.ModeOff {
		return nil
	}
	return func(int) error { return seccomp.Install(seccomp.ClassVCPU, mode) }
}
