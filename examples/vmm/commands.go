package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/machinevm"
)

// serveAndRun runs m, with the control API when --control is set.
func serveAndRun(ctx context.Context, _ *cliEnv, f *runFlags, m *machine.Machine) (kvm.Result, error) {
	if err := m.Start(ctx); err != nil {
		return kvm.Result{}, err
	}
	return waitServing(ctx, f, m)
}

// waitServing serves --control for a started machine and waits for it.
func waitServing(ctx context.Context, f *runFlags, m *machine.Machine) (kvm.Result, error) {
	if f.control != "" {
		stop, err := serveControl(ctx, f.control, m)
		if err != nil {
			m.Stop(kvm.Result{Reason: kvm.StopCanceled})
			_, _ = m.Wait()
			return kvm.Result{}, err
		}
		defer stop()
	}
	return m.Wait()
}

func addMoreCommands(root *cobra.Command, env *cliEnv) {
	root.AddCommand(
		newSimpleControlCmd(env, "pause", "Pause a running VM's vCPUs and devices", http.MethodPost, "/v1/vm/pause"),
		newSimpleControlCmd(env, "resume", "Resume a paused VM", http.MethodPost, "/v1/vm/resume"),
		newSimpleControlCmd(env, "status", "Show a VM's state", http.MethodGet, "/v1/vm"),
		newSimpleControlCmd(env, "stop", "Stop a VM (its vmm exits 0)", http.MethodPost, "/v1/vm/stop"),
		newSnapshotCmd(env),
		newMigrateCmd(env),
		newReceiveCmd(env),
		newRestoreCmd(env),
	)
}

// controlClient talks HTTP to a control socket.
func controlClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
}

func controlCall(ctx context.Context, sock, method, path string, body any) (*http.Response, error) {
	if sock == "" {
		return nil, &usageError{errors.New("--control SOCK is required")}
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vmm"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := controlClient(sock).Do(req)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", sock, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var e struct{ Error string }
		_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&e)
		return nil, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, e.Error)
	}
	return resp, nil
}

// printControl makes one control call and copies its JSON answer to stdout.
func printControl(ctx context.Context, env *cliEnv, sock, method, path string, body any) error {
	resp, err := controlCall(ctx, sock, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(env.stdout, io.LimitReader(resp.Body, 1<<20))
	return err
}

func newSimpleControlCmd(env *cliEnv, name, short, method, path string) *cobra.Command {
	var sock string
	cmd := &cobra.Command{
		Use:   name + " --control SOCK",
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return printControl(cmd.Context(), env, sock, method, path, nil)
		},
	}
	cmd.Flags().StringVar(&sock, "control", "", "control socket of the VM")
	return cmd
}

func newSnapshotCmd(env *cliEnv) *cobra.Command {
	var sock, dir string
	cmd := &cobra.Command{
		Use:   "snapshot --control SOCK --to DIR",
		Short: "Write a snapshot of a running VM to a directory (the VM resumes after)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return &usageError{errors.New("--to DIR is required")}
			}
			return printControl(cmd.Context(), env, sock, http.MethodPost, "/v1/vm/snapshot", snapshotRequest{Dir: dir})
		},
	}
	cmd.Flags().StringVar(&sock, "control", "", "control socket of the VM")
	cmd.Flags().StringVar(&dir, "to", "", "snapshot directory (must not hold a snapshot)")
	return cmd
}

func newMigrateCmd(env *cliEnv) *cobra.Command {
	var (
		sock, to string
		downtime time.Duration
		bw       string
		asJSON   bool
	)
	cmd := &cobra.Command{
		Use:   "migrate --control SOCK --to HOST:PORT",
		Short: "Live-migrate a running VM to a `vmm receive` on another host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return &usageError{errors.New("--to HOST:PORT is required")}
			}
			var maxBW uint64
			if bw != "" {
				var err error
				if maxBW, err = parseSize(bw); err != nil {
					return &usageError{fmt.Errorf("--max-bandwidth: %w", err)}
				}
			}
			req := migrateRequest{To: to, DowntimeMs: float64(downtime) / float64(time.Millisecond), MaxBandwidth: int64(maxBW)}
			resp, err := controlCall(cmd.Context(), sock, http.MethodPost, "/v1/vm/migrate", req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			return followMigration(env, resp.Body, asJSON)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&sock, "control", "", "control socket of the VM")
	fl.StringVar(&to, "to", "", "address of the target's vmm receive --listen")
	fl.DurationVar(&downtime, "downtime", 50*time.Millisecond, "downtime budget for the switch-over")
	fl.StringVar(&bw, "max-bandwidth", "", "bandwidth cap in bytes per second, e.g. 100M (default unlimited)")
	fl.BoolVar(&asJSON, "json", false, "print one JSON object with the result instead of progress")
	return cmd
}

// followMigration reads the migrate stream, shows progress on a terminal
// and prints the result.
func followMigration(env *cliEnv, body io.Reader, asJSON bool) error {
	sc := bufio.NewScanner(io.LimitReader(body, 64<<20))
	tty := !asJSON && isTerminalWriter(env.stdout)
	for sc.Scan() {
		var l progressLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("migrate: bad progress line: %w", err)
		}
		switch {
		case l.Progress != nil:
			if !asJSON {
				p := l.Progress
				pct := 0.0
				if p.TotalPages > 0 {
					pct = 100 * float64(p.PagesSent) / float64(p.TotalPages)
				}
				line := fmt.Sprintf("%-10s round %2d  %6.1f%% of RAM sent  %8.1f MiB  %7.1f MiB/s  dirty %d pages  throttle %.0f%%",
					p.Phase, p.Round, pct, float64(p.BytesSent)/(1<<20), p.Bandwidth/(1<<20), p.DirtyPages, 100*p.Throttle)
				if tty {
					fmt.Fprintf(env.stdout, "\r%-110s", line)
				} else {
					fmt.Fprintln(env.stdout, line)
				}
			}
		case l.Error != "":
			if tty {
				fmt.Fprintln(env.stdout)
			}
			return &exitError{code: exitFailure, msg: "migration failed, the VM keeps running on the source: " + l.Error}
		case l.Result != nil:
			if tty {
				fmt.Fprintln(env.stdout)
			}
			if asJSON {
				return json.NewEncoder(env.stdout).Encode(l.Result)
			}
			r := l.Result
			fmt.Fprintf(env.stdout, "migrated: downtime %.1f ms, total %.0f ms, %d rounds, %d pages (%d zero), %.1f MiB sent\n",
				r.DowntimeMs, r.TotalMs, r.Rounds, r.PagesSent, r.ZeroPages, float64(r.BytesSent)/(1<<20))
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return errors.New("migrate: the source VMM closed the stream without a result")
}

func isTerminalWriter(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && isTerminal(f)
}

// targetFor returns a migration target that builds machines the way `vmm
// run` would with f's flags.
func targetFor(ctx context.Context, env *cliEnv, f *runFlags) *machinevm.Target {
	return &machinevm.Target{
		Ctx: ctx,
		Build: func(cfg machine.Config, _ json.RawMessage) (*machine.Machine, error) {
			cfg.Serial = env.stdout
			if f.stdinIn || isTerminal(os.Stdin) {
				cfg.SerialIn = env.stdin
			}
			kvm.ReserveProcs(cfg.CPUs)
			m, err := machine.New(cfg)
			if err != nil {
				return nil, err
			}
			if err := f.virtio.attach(env, m, f); err != nil {
				m.Close()
				return nil, err
			}
			return m, nil
		},
		OnAnnounce: announceNICs,
	}
}

func newReceiveCmd(env *cliEnv) *cobra.Command {
	var f runFlags
	var listen string
	cmd := &cobra.Command{
		Use:   "receive --listen HOST:PORT [run flags]",
		Short: "Wait for an incoming live migration, then run the VM as `vmm run` would",
		Long: `Wait for one incoming VM on --listen, then run it with COM1 on standard
output, the exit code from the exit port, and its own --control socket so it
can be migrated on. Device flags (--disk, --net, --rng, --console) must match
the source's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if listen == "" {
				return &usageError{errors.New("--listen HOST:PORT is required")}
			}
			if err := f.virtio.validate(); err != nil {
				return &usageError{err}
			}
			if f.jail.enabled() && !env.jailed {
				return runJailed(cmd.Context(), env, &f)
			}
			ctx := cmd.Context()
			// Build the VM while waiting: an incoming VM of the shape the
			// flags give (--mem, --cpus, --no-irqchip) starts in it.
			pool := standbyPool(&f)
			defer pool.Close()
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return &exitError{code: exitFailure, msg: err.Error()}
			}
			defer ln.Close()
			fmt.Fprintf(env.stderr, "vmm: waiting for a VM on %s\n", ln.Addr())
			stopAccept := context.AfterFunc(ctx, func() { ln.Close() })
			conn, err := ln.Accept()
			stopAccept()
			if err != nil {
				return resultError(ctx, kvm.Result{}, errors.Join(ctx.Err(), err))
			}
			defer conn.Close()
			tgt := targetFor(ctx, env, &f)
			tgt.Base.Pool = pool
			st, err := migration.Receive(ctx, conn, tgt, migration.ReceiveOptions{})
			if err != nil {
				return &exitError{code: exitFailure, msg: "receive: " + err.Error()}
			}
			fmt.Fprintf(env.stderr, "vmm: received a VM: downtime %.1f ms (target side), %d rounds%s\n", float64(st.Downtime)/1e6, st.Rounds, builtAhead(tgt.M))
			defer tgt.M.Close()
			res, err := waitServing(ctx, &f, tgt.M)
			return resultError(ctx, res, err)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&listen, "listen", "", "address to wait on for the incoming VM")
	return cmd
}

func newRestoreCmd(env *cliEnv) *cobra.Command {
	var f runFlags
	var from string
	var standby bool
	cmd := &cobra.Command{
		Use:   "restore --from DIR [--standby] [run flags]",
		Short: "Restore a snapshot and run it as `vmm run` would",
		Long: `Restore the snapshot in --from and run it with COM1 on standard output,
the exit code from the exit port, and --control if given. Device flags must
match the snapshot's.

With --standby, vmm first builds a VM of the shape the flags give (--mem,
--cpus, --no-irqchip), prints "vmm: standby", and restores only on SIGUSR1,
reading the snapshot then: a standby host keeps a failed guest's last
checkpoint a few milliseconds away from running again.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if from == "" {
				return &usageError{errors.New("--from DIR is required")}
			}
			if err := f.virtio.validate(); err != nil {
				return &usageError{err}
			}
			if f.jail.enabled() {
				// Refused rather than ignored: a restored guest would run
				// outside the jail the flag asked for.
				return &usageError{errors.New("--jail is not supported by vmm restore (run, receive: yes)")}
			}
			ctx := cmd.Context()
			tgt := targetFor(ctx, env, &f)
			if standby {
				pool := standbyPool(&f)
				defer pool.Close()
				if err := waitStandby(ctx, env, pool); err != nil {
					return resultError(ctx, kvm.Result{}, err)
				}
				tgt.Base.Pool = pool
			}
			t0 := time.Now()
			snap, err := migration.LoadSnapshot(from)
			if err != nil {
				return &exitError{code: exitFailure, msg: err.Error()}
			}
			if _, err := migration.Restore(ctx, snap, tgt); err != nil {
				return &exitError{code: exitFailure, msg: "restore: " + err.Error()}
			}
			took := time.Since(t0)
			defer tgt.M.Close()
			fmt.Fprintf(env.stderr, "vmm: restored %s in %.2f ms%s\n", from, float64(took)/1e6, builtAhead(tgt.M))
			res, err := waitServing(ctx, &f, tgt.M)
			return resultError(ctx, res, err)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&from, "from", "", "snapshot directory")
	cmd.Flags().BoolVar(&standby, "standby", false, "build the VM first, then restore on SIGUSR1")
	return cmd
}

// standbyPool starts building, in the background, one VM of the shape f
// gives, for a VM that arrives later (a migration, a snapshot). A VM of
// another shape is built when it arrives. Close the pool when done.
func standbyPool(f *runFlags) *machine.Pool {
	p, err := machine.NewPool(machine.Config{MemSize: f.memSize(), CPUs: f.cpus, NoIRQChip: f.noIRQ}, machine.PoolOptions{Size: 1, Limit: 1})
	if err != nil {
		// A shape machine.New refuses: the arriving VM's own build
		// reports it.
		return nil
	}
	return p
}

// waitStandby waits for the pool's VM, says so, then waits for SIGUSR1.
func waitStandby(ctx context.Context, env *cliEnv, pool *machine.Pool) error {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	if pool != nil {
		if err := pool.Wait(ctx, 1); err != nil {
			signal.Stop(usr1)
			return fmt.Errorf("standby: building the VM: %w", err)
		}
	}
	fmt.Fprintf(env.stderr, "vmm: standby (pid %d): the VM is built; send SIGUSR1 to restore\n", os.Getpid())
	select {
	case <-usr1:
		// A supervisor that signals twice must not kill the restored
		// guest (SIGUSR1's default action ends the process).
		signal.Ignore(syscall.SIGUSR1)
		return nil
	case <-ctx.Done():
		signal.Stop(usr1)
		return ctx.Err()
	}
}

// builtAhead notes a machine that started in a VM built ahead of need.
func builtAhead(m *machine.Machine) string {
	if m.FromShell() {
		return " (in the VM built while waiting)"
	}
	return ""
}

// announceNICs tells the network where a migrated guest's NICs are now.
func announceNICs(m *machine.Machine) error { return m.Announce() }
