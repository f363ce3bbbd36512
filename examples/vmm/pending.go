package main

// Scaffolding replaced as the migration parts are wired in.

import (
	"context"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

func serveAndRun(ctx context.Context, _ *cliEnv, _ *runFlags, m *machine.Machine) (kvm.Result, error) {
	return m.Run(ctx)
}

func addMoreCommands(*cobra.Command, *cliEnv) {}
