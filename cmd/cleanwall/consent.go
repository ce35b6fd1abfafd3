package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
)

// cmdConsent is `cleanwall consent refresh [--sandbox ID]`: the daemon
// drops its cached consent answers (of one sandbox, or all) and asks the
// consent service again now; a deny among the answers has closed what it
// covers when this returns (docs/consent.md).
func cmdConsent(args []string) error {
	const usage = "usage: cleanwall consent refresh [--sandbox ID] [--socket PATH]"
	if len(args) == 0 || args[0] != "refresh" {
		return fail("%s", usage)
	}
	fs := flag.NewFlagSet("cleanwall consent refresh", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := socketFlag(fs)
	id := fs.String("sandbox", "", "the sandbox (container ID) whose answers to refresh (default: every sandbox's)")
	if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 0 {
		return fail("%s", usage)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := api.NewClient(*socket).ConsentRefresh(ctx, *id)
	if err != nil {
		return fail("%v", err)
	}
	denied := 0
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	if len(res.Answers) > 0 {
		fmt.Fprintln(tw, "SANDBOX\tKIND\tRULE\tDECISION\tTTL\tREASON")
	}
	for _, a := range res.Answers {
		decision := a.Decision
		if a.Cause != "" {
			decision += " (" + a.Cause + ")"
		}
		if a.Decision != "allow" {
			denied++
		}
		rule := a.Rule
		if rule == "" {
			rule = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%gs\t%s\n", a.Sandbox, a.Kind, rule, decision, a.TTLSeconds, a.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Printf("refreshed %d answer(s): %d denied; %d flow(s) closed\n", len(res.Answers), denied, res.ClosedFlows)
	return nil
}
