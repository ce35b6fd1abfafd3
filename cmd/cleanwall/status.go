package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
)

// cmdStatus reports whether cleanwalld is ready: exit 0 when it is, 1 when
// it is starting or does not answer. With --live, exit 0 as soon as it
// answers at all (a Kubernetes liveness probe: a daemon re-adopting many
// sandboxes is alive, not ready).
func cmdStatus(args []string) error {
	fs := flag.NewFlagSet("cleanwall status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fs.SetOutput(os.Stderr)
		fmt.Fprintln(os.Stderr, "usage: cleanwall status [--socket PATH] [--live] [--json] [--timeout D]")
		fs.PrintDefaults()
	}
	socket := socketFlag(fs)
	live := fs.Bool("live", false, "succeed when the daemon answers, ready or not")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for the daemon's answer")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fail("cleanwall status: %v", err)
	}
	if fs.NArg() > 0 {
		return fail("cleanwall status: unexpected argument %q", fs.Arg(0))
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	st, err := api.NewClient(*socket).Status(ctx)
	if err != nil {
		if *live && !errors.Is(err, api.ErrUnreachable) {
			fmt.Println("alive, not ready:", err)
			return nil
		}
		return fmt.Errorf("not ready: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(os.Stdout).Encode(st)
	}
	fmt.Printf("ready: cleanwalld %s, %d sandboxes, pins at %s, up since %s\n", st.Version, st.Sandboxes, st.PinRoot, st.Started.Format(time.RFC3339))
	return nil
}
