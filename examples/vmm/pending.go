package main

// Scaffolding replaced as the isolation, virtio, boot and migration parts
// are wired in.

import (
	"context"
	"errors"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

type jailFlags struct{}

func (j *jailFlags) register(*cobra.Command) {}
func (j *jailFlags) enabled() bool           { return false }

func runJailed(context.Context, *cliEnv, *runFlags) error { return errors.New("jail: not wired") }
func maybeJailedChild() (int, bool)                       { return 0, false }

type virtioFlags struct{}

func (v *virtioFlags) register(*cobra.Command)                  {}
func (v *virtioFlags) validate() error                          { return nil }
func (v *virtioFlags) attach(*machine.Machine, *runFlags) error { return nil }

func loadKernel(*machine.Machine, *runFlags) error { return errors.New("--kernel: not wired") }

func serveAndRun(ctx context.Context, _ *cliEnv, _ *runFlags, m *machine.Machine) (kvm.Result, error) {
	return m.Run(ctx)
}

func addMoreCommands(*cobra.Command, *cliEnv) {}
