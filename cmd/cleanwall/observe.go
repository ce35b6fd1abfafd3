package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/cleanwall/cleanwall/runtime/api"
)

// cmdObserve streams deny events until interrupted: what the datapath
// dropped and what the DNS and HTTP proxies refused.
func cmdObserve(args []string) error {
	fs := flag.NewFlagSet("cleanwall observe", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sandbox := fs.String("sandbox", "", "only this sandbox (its CNI container ID)")
	asJSON := fs.Bool("json", false, "one JSON object per line")
	socket := socketFlag(fs)
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		return fail("usage: cleanwall observe [--sandbox ID] [--json] [--socket PATH]")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	enc := json.NewEncoder(os.Stdout)
	err := api.NewClient(*socket).Events(ctx, *sandbox, func(ev api.DenyEvent) error {
		if *asJSON {
			return enc.Encode(ev)
		}
		_, err := fmt.Println(formatEvent(ev))
		return err
	})
	if ctx.Err() != nil {
		return nil
	}
	return fail("%v", err)
}

func formatEvent(ev api.DenyEvent) string {
	var what []string
	switch ev.Source {
	case "dns":
		what = append(what, "name="+ev.Name)
	case "http":
		what = append(what, fmt.Sprintf("%d %s %s", ev.Status, ev.Method, ev.Path))
	}
	if ev.Src != "" {
		what = append(what, ev.Src+" -> "+ev.Dst)
	} else if ev.Dst != "" {
		what = append(what, "-> "+ev.Dst)
	}
	return fmt.Sprintf("%s  %-30s %-8s %-4s %-22s %s", ev.Time.Format("15:04:05.000"), ev.Sandbox, ev.Source, ev.Proto, ev.Reason, strings.Join(what, " "))
}
