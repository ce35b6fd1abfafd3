package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
)

func cmdPolicy(args []string) error {
	if len(args) == 0 {
		return fail("usage: cleanwall policy check FILE | hash FILE | apply --sandbox ID FILE | show --sandbox ID")
	}
	switch args[0] {
	case "check":
		return policyCheck(args[1:])
	case "hash":
		return policyHash(args[1:], os.Stdout)
	case "apply":
		return policyApply(args[1:])
	case "show":
		return policyShow(args[1:])
	}
	return fail("unknown policy command %q: check, hash, apply or show", args[0])
}

// policyCheck: exit 0 when valid (warnings printed), 1 with field-path
// errors otherwise.
func policyCheck(args []string) error {
	if len(args) != 1 {
		return fail("usage: cleanwall policy check FILE")
	}
	p, err := policy.LoadFile(args[0])
	if err == nil {
		var c *policy.Compiled
		if c, err = policy.Compile(p); err == nil {
			for _, w := range c.Warnings {
				fmt.Printf("warning: %s\n", w)
			}
			fmt.Printf("%s: valid: policy %q, %d egress rule(s), %d datapath entries\n", args[0], c.Name, len(c.Rules), len(c.Entries))
			return nil
		}
	}
	return policyErrors(args[0], err)
}

// policyErrors prints a policy's field-path errors and exits 1.
func policyErrors(file string, err error) error {
	var list policy.ErrorList
	if errors.As(err, &list) {
		for _, e := range list {
			fmt.Fprintf(os.Stderr, "%s: %v\n", file, e)
		}
		return &exitError{1}
	}
	fmt.Fprintln(os.Stderr, err)
	return &exitError{1}
}

// policyHash prints the canonical hash of the policy in a file: the SHA-256
// of its normal form (policy.Compiled.Hash, equal to Policy.Hash), which
// is the policyHash cleanwalld reports for a sandbox under that policy and
// what a release request's policySHA256 carries (docs/keybroker.md §5). It
// compiles the file exactly as the daemon does (parse, then compile), so an
// invalid policy, which no sandbox can run under, has no hash: its errors
// are printed as check prints them, with exit status 1.
func policyHash(args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return fail("usage: cleanwall policy hash FILE")
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return fail("%v", err)
	}
	p, err := policy.Parse(data)
	if err != nil {
		return policyErrors(args[0], err)
	}
	c, err := policy.Compile(p)
	if err != nil {
		return policyErrors(args[0], err)
	}
	fmt.Fprintln(stdout, c.Hash)
	return nil
}

func socketFlag(fs *flag.FlagSet) *string {
	return fs.String("socket", api.DefaultSocket, "cleanwalld's API socket")
}

func policyApply(args []string) error {
	fs := flag.NewFlagSet("cleanwall policy apply", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sandbox := fs.String("sandbox", "", "sandbox ID (its CNI container ID)")
	ifName := fs.String("ifname", "", "interface (default: every interface of the sandbox)")
	socket := socketFlag(fs)
	if err := fs.Parse(args); err != nil || *sandbox == "" || fs.NArg() != 1 {
		return fail("usage: cleanwall policy apply --sandbox ID FILE")
	}
	data, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := api.NewClient(*socket).ApplyPolicy(ctx, *sandbox, *ifName, api.ApplyRequest{Policy: data, PolicySource: fs.Arg(0)})
	if err != nil {
		return fail("applying %s to %s: %v", fs.Arg(0), *sandbox, err)
	}
	for _, w := range res.Warnings {
		fmt.Printf("warning: %s\n", w)
	}
	fmt.Printf("sandbox %s: policy %q is generation %d (%d datapath entries); %d established flow(s) closed\n",
		*sandbox, res.Sandbox.PolicyName, res.Sandbox.Generation, res.Sandbox.Rules, res.ClosedFlows)
	return nil
}

// policyShow prints what the kernel holds for a sandbox, read back from the
// datapath maps by the daemon.
func policyShow(args []string) error {
	fs := flag.NewFlagSet("cleanwall policy show", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sandbox := fs.String("sandbox", "", "sandbox ID (its CNI container ID)")
	ifName := fs.String("ifname", "", "interface")
	socket := socketFlag(fs)
	if err := fs.Parse(args); err != nil || *sandbox == "" {
		return fail("usage: cleanwall policy show --sandbox ID")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := api.NewClient(*socket).Policy(ctx, *sandbox, *ifName)
	if err != nil {
		return fail("%v", err)
	}
	fmt.Printf("sandbox %s: policy %q, generation %d (datapath slot %d), %d entries in the kernel\n",
		v.Sandbox, v.PolicyName, v.Generation, v.Slot, len(v.Rules))
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RULE\tID\tMODE\tPROTO\tPORT\tDESTINATION\tEXPIRES")
	for _, r := range v.Rules {
		exp := "-"
		if r.Expires != nil {
			exp = r.Expires.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%s\t%s\n", r.Rule, r.RuleID, r.Mode, r.Protocol, r.Port, r.Prefix, exp)
	}
	return tw.Flush()
}
