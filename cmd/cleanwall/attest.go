package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/cleanwall/cleanwall/runtime/api"
)

func cmdAttest(args []string) error {
	if len(args) == 0 || args[0] != "status" {
		return fail("usage: cleanwall attest status [--socket PATH]")
	}
	fs := flag.NewFlagSet("cleanwall attest status", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := socketFlag(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return fail("usage: cleanwall attest status [--socket PATH]")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := api.NewClient(*socket).Attest(ctx)
	if err != nil {
		return fail("%v", err)
	}
	if !st.Configured {
		fmt.Println("attestation: no key broker configured (cleanwalld --keybroker); secure-mode rules cannot be admitted")
		return nil
	}
	fmt.Printf("evidence:     %s\n", st.Evidence)
	fmt.Printf("measurement:  %s\n", st.Measurement)
	fmt.Printf("key broker:   %s\n", st.Broker)
	if st.LastRelease != nil {
		fmt.Printf("last release: %s\n", st.LastRelease.Format(time.RFC3339))
	} else {
		fmt.Println("last release: never")
	}
	if st.LastError != "" {
		fmt.Printf("last error:   %s\n", st.LastError)
	}
	for _, k := range st.Keys {
		line := fmt.Sprintf("key %s: version %d, released %s, expires %s", k.ID, k.Version,
			k.ReleasedAt.Format(time.RFC3339), k.NotAfter.Format(time.RFC3339))
		if k.LastError != "" {
			line += " (last refresh failed: " + k.LastError + ")"
		}
		fmt.Println(line)
	}
	return nil
}
