// Command vmm is kvmkit's example hypervisor: it assembles the library's
// parts into a VMM that runs bare-metal images and Linux kernels, and
// (with the other subcommands) snapshots, restores and migrates them.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/isolation"
)

// Exit statuses of vmm besides the guest's own exit code.
const (
	exitUsage   = 2   // bad flags or arguments
	exitFailure = 1   // the VMM could not run the guest (no KVM, bad image, ...)
	exitCrash   = 120 // the guest crashed (triple fault, panic, ...)
	exitSIGINT  = 130 // stopped by SIGINT
	exitSIGTERM = 143 // stopped by SIGTERM
)

// exitError carries an exit status out of a command.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes vmm with args and returns the process exit status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	// In a jailed re-execution this installs the process seccomp filter and
	// reports jailed; in the jail's set-up stage it never returns.
	jailed, err := isolation.Child()
	if err != nil {
		fmt.Fprintln(stderr, "vmm: jail:", err)
		return exitFailure
	}
	ctx, stop := signalContext()
	defer stop()
	root := newRoot(stdin, stdout, stderr, jailed, args)
	root.SetArgs(args)
	err = root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(stderr, "vmm:", ee.msg)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "vmm:", err)
	if isUsage(err) {
		return exitUsage
	}
	return exitFailure
}

type usageError struct{ error }

func isUsage(err error) bool {
	var u *usageError
	return errors.As(err, &u)
}

// signalContext is canceled by SIGINT or SIGTERM; the cause records which.
func signalContext() (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		select {
		case s := <-ch:
			cancel(&signalError{sig: s.(syscall.Signal)})
		case <-ctx.Done():
		}
	}()
	return ctx, func() { signal.Stop(ch); cancel(nil) }
}

type signalError struct{ sig syscall.Signal }

func (e *signalError) Error() string { return "stopped by " + e.sig.String() }

func newRoot(stdin io.Reader, stdout, stderr io.Writer, jailed bool, args []string) *cobra.Command {
	var verbose bool
	root := &cobra.Command{
		Use:           "vmm",
		Short:         "kvmkit's example hypervisor",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelDebug
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})))
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })
	root.PersistentFlags().BoolVarP(&verbose, "verbose", "v", false, "log debug messages to stderr")
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	env := &cliEnv{stdin: stdin, stdout: stdout, stderr: stderr, jailed: jailed, args: args}
	root.AddCommand(newRunCmd(env), newGuestsCmd(env))
	addMoreCommands(root, env)
	return root
}

// cliEnv is what commands need from the process.
type cliEnv struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	// jailed is true in the VMM re-executed inside its jail.
	jailed bool
	// args are vmm's arguments (without the program name), re-used by
	// the jailed re-execution.
	args []string
}
