// Command benchtool is the in-lab helper of the bench/*.sh scripts: it
// times a VMM process to a console marker and samples its memory, drives
// a QEMU live migration over QMP, and prints labelled results as one
// side-by-side table. It is built static so it runs in the nested lab's
// busybox userland.
//
//	benchtool run -label L -marker S [-ram SIZE] [-timeout D] [-log F] -- CMD ARGS...
//	benchtool waitfor -file F -string S [-timeout D]
//	benchtool qmp -sock S [-timeout D] JSON...
//	benchtool qmp-migrate -label L -src S -dst S -uri U [-downtime-limit-ms N] [-max-bandwidth N]
//	benchtool table -cols a,b,c [-title T] < rows
//	benchtool sink -listen ADDR [-n N] [-label L] [-timeout D]
//
// Every measuring subcommand prints one result row,
//
//	ROW <label> <JSON object>
//
// which `table` reads together with `go test -bench` output lines
// (metrics become columns, named by their unit).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `usage:
  benchtool run -label L -marker S [-ram SIZE] [-timeout D] [-log F] -- CMD ARGS...
  benchtool waitfor -file F -string S [-timeout D]
  benchtool qmp -sock S [-timeout D] JSON...
  benchtool qmp-migrate -label L -src SOCK -dst SOCK -uri URI [-downtime-limit-ms N] [-max-bandwidth N]
  benchtool table -cols a,b,c [-title T] < rows
  benchtool sink -listen ADDR [-n N] [-label L] [-timeout D]
`

// errUsage marks command-line mistakes (exit status 2).
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		fmt.Fprintf(os.Stderr, "benchtool: %v\n%s", err, usage)
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "benchtool: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no subcommand", errUsage)
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	switch args[0] {
	case "run":
		return cmdRun(ctx, fs, args[1:], stdout, stderr)
	case "waitfor":
		return cmdWaitFor(ctx, fs, args[1:])
	case "qmp":
		return cmdQMP(ctx, fs, args[1:], stdout)
	case "qmp-migrate":
		return cmdQMPMigrate(ctx, fs, args[1:], stdout, stderr)
	case "table":
		return cmdTable(fs, args[1:], stdin, stdout)
	case "sink":
		return cmdSink(ctx, fs, args[1:], stdout)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("%w: unknown subcommand %q", errUsage, args[0])
}

// parseFlags parses args and wraps flag errors as usage errors.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %s: %v", errUsage, fs.Name(), err)
	}
	return nil
}
