// Command testlab runs scripted regression tests over many guest images in
// parallel, each in its own VM, and reports the results: the dev-and-test
// lab of kvmkit's mission. A guest that crashes, hangs or misbehaves fails
// its case only; the other VMs and the host process carry on.
//
//	testlab [-spec FILE] [-parallel N] [-json]
//
// Without -spec it runs a built-in suite over the embedded test guests.
// The VMs are built ahead of the cases (a machine.Pool per VM shape), so a
// case's time is its guest's; the summary says how many were.
// A spec is a JSON array of cases:
//
//	[{"name": "hello", "guest": "hello64", "expect": {"exit_code": 0, "output": "Hello"}},
//	 {"name": "boot", "image": "boot.bin", "mode": "real", "timeout": "5s"},
//	 {"name": "linux", "kernel": "bzImage", "initrd": "initrd.gz", "cmdline": "console=ttyS0",
//	  "mem": "256M", "cpus": 2, "expect": {"output": "KVMKIT-INIT-OK"}},
//	 {"name": "must crash", "guest": "triple", "expect": {"crash": "triple fault"}}]
//
// Exit status: 0 when every case passed, 1 when any failed, 2 for a bad
// spec or flags.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("testlab", flag.ContinueOnError)
	fs.SetOutput(stderr)
	spec := fs.String("spec", "", "JSON file with the test cases (default: the built-in suite)")
	parallel := fs.Int("parallel", 4, "VMs run at once")
	asJSON := fs.Bool("json", false, "print the results as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 || *parallel < 1 {
		fmt.Fprintln(stderr, "testlab: usage: testlab [-spec FILE] [-parallel N] [-json]")
		return 2
	}
	cases := BuiltinSuite()
	if *spec != "" {
		f, err := os.Open(*spec)
		if err != nil {
			fmt.Fprintln(stderr, "testlab:", err)
			return 2
		}
		cases, err = ParseSpec(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(stderr, "testlab: %s: %v\n", *spec, err)
			return 2
		}
	}
	start := time.Now()
	most := 1
	for _, c := range cases {
		most = max(most, c.CPUs)
	}
	kvm.ReserveProcs(*parallel * most) // vCPU threads sit in KVM_RUN
	results := RunAll(ctx, cases, *parallel)
	failed := 0
	for _, r := range results {
		if !r.Passed {
			failed++
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(results)
	} else {
		w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "CASE\tRESULT\tTIME\tOUTCOME")
		for _, r := range results {
			res := "PASS"
			if !r.Passed {
				res = "FAIL"
			}
			fmt.Fprintf(w, "%s\t%s\t%v\t%s\n", r.Name, res, r.Duration.Round(time.Millisecond), r.Outcome)
		}
		w.Flush()
		for _, r := range results {
			if !r.Passed {
				fmt.Fprintf(stdout, "\n--- %s: %s\n", r.Name, r.Reason)
			}
		}
		prebuilt := 0
		for _, r := range results {
			if r.PrebuiltVM {
				prebuilt++
			}
		}
		fmt.Fprintf(stdout, "\n%d passed, %d failed (%d VMs, %d built ahead, %d at a time, %v)\n",
			len(results)-failed, failed, len(results), prebuilt, *parallel, time.Since(start).Round(time.Millisecond))
	}
	if failed > 0 {
		return 1
	}
	return 0
}
