package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/kvm/guests"
)

func newGuestsCmd(env *cliEnv) *cobra.Command {
	return &cobra.Command{
		Use:   "guests",
		Short: "List the embedded test guests (for `vmm run --guest NAME`)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tMODE\tDESCRIPTION")
			for _, g := range guests.All() {
				fmt.Fprintf(w, "%s\t%s\t%s\n", g.Name, g.Mode, g.Description)
			}
			return w.Flush()
		},
	}
}
